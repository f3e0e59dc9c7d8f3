//! [`SessionClient`]: `mesh.session.v1.SessionService`.

use mesh_proto::session::{
    CreateSessionRequest, CreateSessionResponse, ListUserSessionsRequest, ListUserSessionsResponse,
    RefreshSessionRequest, RefreshSessionResponse, RevokeSessionRequest, RevokeSessionResponse,
    RevokeUserSessionsRequest, RevokeUserSessionsResponse, ValidateSessionRequest, ValidateSessionResponse,
    session_service_client::SessionServiceClient,
};
use mesh_runtime::ConfigError;
use mesh_tower::ClientMetrics;
use tonic::{IntoRequest, Status};

use crate::{Channel, ClientConfig, config::keys};

/// Client of the session service.
///
/// `ValidateSession`, `ListUserSessions` and the revocations are repeated on
/// UNAVAILABLE (a revocation done twice is done once: the second finds the
/// session gone, and the service answers UNAVAILABLE when it cannot confirm
/// one); creating and refreshing (it rotates the token) are repeated only
/// when they never reached a server.
#[derive(Debug, Clone)]
pub struct SessionClient {
    channel: Channel,
}

impl SessionClient {
    /// Methods safe to repeat after they reached a server.
    pub const IDEMPOTENT: &[&str] = &[
        "/mesh.session.v1.SessionService/ValidateSession",
        "/mesh.session.v1.SessionService/ListUserSessions",
        "/mesh.session.v1.SessionService/RevokeSession",
        "/mesh.session.v1.SessionService/RevokeUserSessions",
    ];

    /// A client for `MESH_SESSION_ADDR` (required), recording into `metrics`.
    /// Call inside a Tokio runtime.
    pub fn from_config(config: &ClientConfig, metrics: &ClientMetrics) -> Result<Self, ConfigError> {
        Ok(Self::new(config.channel(
            "session",
            &config.session,
            keys::SESSION_ADDR,
            metrics,
            Self::IDEMPOTENT,
        )?))
    }

    /// A client over an existing channel.
    pub fn new(channel: Channel) -> Self {
        Self { channel }
    }

    /// The channel (endpoints and their breakers' states).
    pub fn channel(&self) -> &Channel {
        &self.channel
    }

    /// The generated client, for response metadata or options.
    pub fn raw(&self) -> SessionServiceClient<Channel> {
        SessionServiceClient::new(self.channel.clone())
    }

    /// `CreateSession`: the response holds the token, shown only once.
    pub async fn create_session(
        &self,
        request: impl IntoRequest<CreateSessionRequest>,
    ) -> Result<CreateSessionResponse, Status> {
        Ok(self.raw().create_session(request).await?.into_inner())
    }

    /// `ValidateSession`: the session of a token, or UNAUTHENTICATED.
    pub async fn validate_session(
        &self,
        request: impl IntoRequest<ValidateSessionRequest>,
    ) -> Result<ValidateSessionResponse, Status> {
        Ok(self.raw().validate_session(request).await?.into_inner())
    }

    /// `RefreshSession`: rotates the token.
    pub async fn refresh_session(
        &self,
        request: impl IntoRequest<RefreshSessionRequest>,
    ) -> Result<RefreshSessionResponse, Status> {
        Ok(self.raw().refresh_session(request).await?.into_inner())
    }

    /// `RevokeSession`: by id or token.
    pub async fn revoke_session(
        &self,
        request: impl IntoRequest<RevokeSessionRequest>,
    ) -> Result<RevokeSessionResponse, Status> {
        Ok(self.raw().revoke_session(request).await?.into_inner())
    }

    /// `RevokeUserSessions`: every session of a user, optionally but one.
    pub async fn revoke_user_sessions(
        &self,
        request: impl IntoRequest<RevokeUserSessionsRequest>,
    ) -> Result<RevokeUserSessionsResponse, Status> {
        Ok(self.raw().revoke_user_sessions(request).await?.into_inner())
    }

    /// `ListUserSessions`: a user's live sessions.
    pub async fn list_user_sessions(
        &self,
        request: impl IntoRequest<ListUserSessionsRequest>,
    ) -> Result<ListUserSessionsResponse, Status> {
        Ok(self.raw().list_user_sessions(request).await?.into_inner())
    }
}

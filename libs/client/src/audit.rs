//! [`AuditClient`]: `mesh.audit.v1.AuditService`.

use mesh_proto::audit::{
    AppendRequest, AppendResponse, AuditEvent, QueryRequest, QueryResponse, TailRequest, VerifyRequest,
    VerifyResponse, audit_service_client::AuditServiceClient,
};
use mesh_runtime::ConfigError;
use mesh_tower::{ClientMetrics, Idempotency, NoDefaultTimeout};
use tonic::{IntoRequest, Status, Streaming};

use crate::{Channel, ClientConfig, config::keys};

/// Client of the audit service.
///
/// `Append` with an idempotency key is repeated on UNAVAILABLE (the service
/// returns the first result for a repeated key); without one, only when it
/// never reached a server. `Query`, `Tail` and `Verify` only read.
#[derive(Debug, Clone)]
pub struct AuditClient {
    channel: Channel,
}

impl AuditClient {
    /// Methods safe to repeat after they reached a server (`Append` too, per
    /// call, when it carries an idempotency key).
    pub const IDEMPOTENT: &[&str] = &[
        "/mesh.audit.v1.AuditService/Query",
        "/mesh.audit.v1.AuditService/Tail",
        "/mesh.audit.v1.AuditService/Verify",
    ];

    /// A client for `MESH_AUDIT_ADDR` (required), recording into `metrics`.
    /// Call inside a Tokio runtime.
    pub fn from_config(config: &ClientConfig, metrics: &ClientMetrics) -> Result<Self, ConfigError> {
        Ok(Self::new(config.channel("audit", &config.audit, keys::AUDIT_ADDR, metrics, Self::IDEMPOTENT)?))
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
    pub fn raw(&self) -> AuditServiceClient<Channel> {
        AuditServiceClient::new(self.channel.clone())
    }

    /// `Append`: returns once the event is committed.
    pub async fn append(&self, request: impl IntoRequest<AppendRequest>) -> Result<AppendResponse, Status> {
        let mut request = request.into_request();
        if !request.get_ref().idempotency_key.is_empty() {
            request.extensions_mut().insert(Idempotency::Idempotent);
        }
        Ok(self.raw().append(request).await?.into_inner())
    }

    /// This client as the sink of refused admin RPCs' audit events
    /// ([`mesh_runtime::authz`]): each is one `Append` (with its
    /// idempotency key, so retried on UNAVAILABLE).
    pub fn denial_sink(&self) -> mesh_runtime::AuditSink {
        let client = self.clone();
        std::sync::Arc::new(move |req| {
            let client = client.clone();
            Box::pin(async move { client.append(req).await.map(|_| ()) })
        })
    }

    /// `Query`: a page of events matching a filter.
    pub async fn query(&self, request: impl IntoRequest<QueryRequest>) -> Result<QueryResponse, Status> {
        Ok(self.raw().query(request).await?.into_inner())
    }

    /// `Tail`: replays events after a sequence, then streams new ones. The
    /// stream gets no default deadline (its own, or the handler's, still applies).
    pub async fn tail(
        &self,
        request: impl IntoRequest<TailRequest>,
    ) -> Result<Streaming<AuditEvent>, Status> {
        let mut request = request.into_request();
        request.extensions_mut().insert(NoDefaultTimeout);
        Ok(self.raw().tail(request).await?.into_inner())
    }

    /// `Verify`: recomputes the hash chain over a range.
    pub async fn verify(&self, request: impl IntoRequest<VerifyRequest>) -> Result<VerifyResponse, Status> {
        Ok(self.raw().verify(request).await?.into_inner())
    }
}

//! [`RateLimitClient`]: `mesh.ratelimit.v1.RateLimitService`.

use mesh_proto::ratelimit::{
    CheckRequest, CheckResponse, GetRulesRequest, GetRulesResponse, ResetRequest, ResetResponse,
    rate_limit_service_client::RateLimitServiceClient,
};
use mesh_runtime::ConfigError;
use mesh_tower::ClientMetrics;
use tonic::{IntoRequest, Status};

use crate::{Channel, ClientConfig, config::keys};

/// Client of the rate-limit service.
///
/// `Check` consumes hits, so it is repeated only when it never reached a
/// server; `Reset` and `GetRules` are repeated on UNAVAILABLE too.
#[derive(Debug, Clone)]
pub struct RateLimitClient {
    channel: Channel,
}

impl RateLimitClient {
    /// Methods safe to repeat after they reached a server.
    pub const IDEMPOTENT: &[&str] =
        &["/mesh.ratelimit.v1.RateLimitService/Reset", "/mesh.ratelimit.v1.RateLimitService/GetRules"];

    /// A client for `MESH_RATELIMIT_ADDR` (required), recording into `metrics`.
    /// Call inside a Tokio runtime.
    pub fn from_config(config: &ClientConfig, metrics: &ClientMetrics) -> Result<Self, ConfigError> {
        Ok(Self::new(config.channel(
            "ratelimit",
            &config.ratelimit,
            keys::RATELIMIT_ADDR,
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
    pub fn raw(&self) -> RateLimitServiceClient<Channel> {
        RateLimitServiceClient::new(self.channel.clone())
    }

    /// `Check`: counts hits against the matching limits, all or nothing.
    pub async fn check(&self, request: impl IntoRequest<CheckRequest>) -> Result<CheckResponse, Status> {
        Ok(self.raw().check(request).await?.into_inner())
    }

    /// `Reset`: clears the counters of one descriptor.
    pub async fn reset(&self, request: impl IntoRequest<ResetRequest>) -> Result<ResetResponse, Status> {
        Ok(self.raw().reset(request).await?.into_inner())
    }

    /// `GetRules`: the rules loaded for a domain.
    pub async fn get_rules(
        &self,
        request: impl IntoRequest<GetRulesRequest>,
    ) -> Result<GetRulesResponse, Status> {
        Ok(self.raw().get_rules(request).await?.into_inner())
    }
}

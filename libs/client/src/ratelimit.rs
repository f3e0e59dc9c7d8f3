//! [`RateLimitClient`]: `mesh.ratelimit.v1.RateLimitService`, and
//! [`RateLimitClient::admit`], how a mesh service turns one Check into a
//! decision about its own call.

use std::time::Duration;

use mesh_proto::ratelimit::{
    CheckRequest, CheckResponse, Code, GetRulesRequest, GetRulesResponse, ResetRequest, ResetResponse,
    rate_limit_service_client::RateLimitServiceClient,
};
use mesh_runtime::{ConfigError, Lookup, LookupExt};
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

/// Used when the rate-limit service says "over" without saying until when.
pub const DEFAULT_RETRY_AFTER: Duration = Duration::from_secs(1);

/// What a caller does with its own call when the rate-limit service cannot
/// decide (unreachable, too slow, failing).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureMode {
    /// Refuse the call with UNAVAILABLE (retryable): for limits that protect
    /// against abuse, which must not vanish when the limiter is overloaded.
    FailClosed,
    /// Let the call through unlimited: for limits that protect capacity,
    /// where availability matters more.
    FailOpen,
}

impl FailureMode {
    /// `fail_closed` or `fail_open` (also the metric label).
    pub fn label(self) -> &'static str {
        match self {
            Self::FailClosed => "fail_closed",
            Self::FailOpen => "fail_open",
        }
    }

    /// Reads `key` (`fail_closed` or `fail_open`), `default` when unset.
    pub fn from_lookup(l: &impl Lookup, key: &'static str, default: Self) -> Result<Self, ConfigError> {
        match l.string(key).as_deref() {
            None => Ok(default),
            Some("fail_closed") => Ok(Self::FailClosed),
            Some("fail_open") => Ok(Self::FailOpen),
            Some(other) => {
                Err(ConfigError::new(key, format!("expected fail_closed or fail_open, got {other:?}")))
            }
        }
    }
}

/// What [`RateLimitClient::admit`] decided for the caller's call.
#[derive(Debug)]
pub enum Admission {
    /// Within every limit (shadow-mode limits never refuse).
    Allowed,
    /// Over a limit: refuse with RESOURCE_EXHAUSTED and a `RetryInfo` of
    /// `retry_after` (the longest wait any refusing limit asks for).
    OverLimit {
        /// When the same call can go through.
        retry_after: Duration,
    },
    /// The rate-limit service could not decide (unreachable, overloaded,
    /// too slow, failing); apply the caller's [`FailureMode`].
    Undecided(Status),
    /// The rate-limit service refused the Check itself (INVALID_ARGUMENT and
    /// the like): a fault of the caller's request that no failure mode may
    /// paper over — failing open here would let such calls bypass every limit.
    Refused(Status),
}

/// The longest wait of the limits that refused (not in shadow mode):
/// `retry_after`, else `duration_until_reset`, else [`DEFAULT_RETRY_AFTER`].
pub fn retry_after(resp: &CheckResponse) -> Duration {
    resp.statuses
        .iter()
        .filter(|s| s.code() == Code::OverLimit && !s.shadow_mode)
        .filter_map(|s| s.retry_after.or(s.duration_until_reset))
        .filter_map(|d| Duration::try_from(d).ok())
        .max()
        .unwrap_or(DEFAULT_RETRY_AFTER)
}

impl RateLimitClient {
    /// One Check for the caller's call, with at most `timeout` (or the
    /// handler's own deadline, whichever is sooner): allowed, over a limit
    /// with when to retry, or undecided with the status that says why.
    pub async fn admit(&self, request: CheckRequest, timeout: Duration) -> Admission {
        let mut req = tonic::Request::new(request);
        req.set_timeout(timeout);
        match self.check(req).await {
            Ok(resp) if resp.overall_code() == Code::OverLimit => {
                Admission::OverLimit { retry_after: retry_after(&resp) }
            }
            Ok(_) => Admission::Allowed,
            Err(status) => match status.code() {
                tonic::Code::InvalidArgument
                | tonic::Code::FailedPrecondition
                | tonic::Code::OutOfRange
                | tonic::Code::NotFound
                | tonic::Code::PermissionDenied
                | tonic::Code::Unauthenticated
                | tonic::Code::Unimplemented => Admission::Refused(status),
                _ => Admission::Undecided(status),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use mesh_proto::ratelimit::DescriptorStatus;

    use super::*;

    fn status(code: Code, shadow: bool, retry: Option<u64>, reset: Option<u64>) -> DescriptorStatus {
        let d = |s| prost_types::Duration { seconds: s, nanos: 0 };
        DescriptorStatus {
            code: code as i32,
            shadow_mode: shadow,
            retry_after: retry.map(|s| d(s as i64)),
            duration_until_reset: reset.map(|s| d(s as i64)),
            ..Default::default()
        }
    }

    #[test]
    fn retry_after_is_the_longest_wait_of_the_enforced_refusals() {
        let resp = CheckResponse {
            overall_code: Code::OverLimit as i32,
            statuses: vec![
                status(Code::OverLimit, false, Some(3), Some(60)),
                status(Code::OverLimit, true, Some(90), None),
                status(Code::OverLimit, false, None, Some(7)),
                status(Code::Ok, false, Some(100), None),
            ],
        };
        assert_eq!(retry_after(&resp), Duration::from_secs(7));
        assert_eq!(retry_after(&CheckResponse::default()), DEFAULT_RETRY_AFTER);
    }

    #[test]
    fn failure_modes_parse_and_name_their_key() {
        let l: HashMap<&'static str, String> = [("K", "fail_open".to_owned())].into();
        assert_eq!(
            FailureMode::from_lookup(&l, "K", FailureMode::FailClosed).unwrap(),
            FailureMode::FailOpen
        );
        assert_eq!(
            FailureMode::from_lookup(&l, "J", FailureMode::FailClosed).unwrap(),
            FailureMode::FailClosed
        );
        let l: HashMap<&'static str, String> = [("K", "sometimes".to_owned())].into();
        assert_eq!(FailureMode::from_lookup(&l, "K", FailureMode::FailOpen).unwrap_err().key, "K");
    }
}

//! CreateSession's rate limits, decided by the rate-limit service: one Check
//! with a `user_id` and a `client_ip` descriptor (all-or-nothing), in the
//! configured domain. Over a limit: RESOURCE_EXHAUSTED with RetryInfo. The
//! rate-limit service unreachable or too slow: the configured failure mode
//! (see [`FailureMode`]).

use std::{sync::Arc, time::Duration};

use mesh_client::{Admission, FailureMode, RateLimitClient};
use mesh_proto::ratelimit::{CheckRequest, Descriptor, Entry};
use mesh_runtime::Throttle;

use crate::{
    config::SessionConfig,
    error::Error,
    metrics::{Metrics, ModeLabels},
    request::UserId,
};

/// See the module docs.
#[derive(Debug, Clone)]
pub(crate) struct Limiter {
    client: Option<RateLimitClient>,
    domain: String,
    mode: FailureMode,
    timeout: Duration,
    metrics: Arc<Metrics>,
    warnings: Arc<Throttle>,
}

fn descriptor(key: &str, value: &str) -> Descriptor {
    Descriptor { entries: vec![Entry { key: key.to_owned(), value: value.to_owned() }], hits_addend: None }
}

impl Limiter {
    /// `client` `None`: no rate limiting.
    pub(crate) fn new(client: Option<RateLimitClient>, c: &SessionConfig, metrics: Arc<Metrics>) -> Self {
        let _ = metrics
            .ratelimit_unavailable
            .get_or_create(&ModeLabels { mode: c.ratelimit_failure_mode.label() });
        Self {
            client,
            domain: c.ratelimit_domain.clone(),
            mode: c.ratelimit_failure_mode,
            timeout: c.ratelimit_timeout,
            metrics,
            warnings: Arc::new(Throttle::new(Duration::from_secs(10))),
        }
    }

    /// Counts one CreateSession for `user` from `ip` (empty: unknown).
    pub(crate) async fn check(&self, user: &UserId, ip: &str) -> Result<(), Error> {
        let Some(client) = &self.client else { return Ok(()) };
        let mut descriptors = vec![descriptor("user_id", user.as_str())];
        if !ip.is_empty() {
            descriptors.push(descriptor("client_ip", ip));
        }
        let req = CheckRequest { domain: self.domain.clone(), descriptors, hits_addend: 0 };
        match client.admit(req, self.timeout).await {
            Admission::OverLimit { retry_after } => {
                self.metrics.ratelimited.inc();
                Err(Error::RateLimited { retry_after })
            }
            Admission::Allowed => Ok(()),
            Admission::Refused(status) => {
                tracing::error!(code = ?status.code(), error = %status.message(), "the rate-limit service refused the check of a session creation");
                Err(Error::Unavailable("rate limiting refused this request, try again later".to_owned()))
            }
            Admission::Undecided(status) => {
                self.metrics
                    .ratelimit_unavailable
                    .get_or_create(&ModeLabels { mode: self.mode.label() })
                    .inc();
                if let Some(suppressed) = self.warnings.ready() {
                    tracing::warn!(
                        code = ?status.code(),
                        error = %status.message(),
                        mode = self.mode.label(),
                        suppressed,
                        "rate-limit service could not decide a session creation"
                    );
                }
                match self.mode {
                    FailureMode::FailClosed => {
                        Err(Error::Unavailable("rate limiting is unavailable, try again later".to_owned()))
                    }
                    FailureMode::FailOpen => Ok(()),
                }
            }
        }
    }
}

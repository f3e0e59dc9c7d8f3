//! The mesh on every call, before any document is touched: the caller's
//! session token is validated by the session service, then the call is
//! counted against the `data` rate-limit domain by the rate-limit service.
//!
//! - **Authentication.** `authorization: Bearer <token>` (the scheme is
//!   case-insensitive, RFC 7235). Missing: UNAUTHENTICATED saying how to send
//!   one. Refused by the session service (malformed, unknown, revoked,
//!   expired): UNAUTHENTICATED with one message for all. The session service
//!   unreachable: UNAVAILABLE (a call is never let through unauthenticated).
//!   Calls slide the session's idle expiry unless `MESH_DATA_SESSION_TOUCH`
//!   is false. Nothing is cached here: a revoked session is refused on its
//!   very next call.
//! - **Rate limits.** One Check per call, all-or-nothing, with descriptors
//!   `[user_id]` and `[user_id, collection]` for each collection the call
//!   touches; a Batch counts one hit per operation. Over a limit:
//!   RESOURCE_EXHAUSTED with `RetryInfo`. The rate-limit service unable to
//!   decide: `MESH_DATA_RATELIMIT_FAILURE_MODE` (fail open by default: data
//!   limits protect capacity, and the database is not at risk from the
//!   limiter being away).

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use mesh_client::{Admission, FailureMode, RateLimitClient, SessionClient};
use mesh_proto::{
    ratelimit::{CheckRequest, Descriptor, Entry},
    session::ValidateSessionRequest,
};
use mesh_runtime::Throttle;
use tonic::{Code, metadata::MetadataMap};

use crate::{
    config::DataConfig,
    error::{Error, MISSING_TOKEN, UNAUTHENTICATED},
    metrics::{Metrics, ModeLabels},
};

/// Who is calling, from their session.
#[derive(Debug, Clone)]
pub(crate) struct Caller {
    pub(crate) user_id: String,
    pub(crate) session_id: String,
}

/// See the module docs.
#[derive(Debug, Clone)]
pub(crate) struct Guard {
    session: SessionClient,
    ratelimit: Option<RateLimitClient>,
    touch: bool,
    session_timeout: Duration,
    domain: String,
    mode: FailureMode,
    ratelimit_timeout: Duration,
    metrics: Arc<Metrics>,
    warnings: Arc<Throttle>,
}

/// The token of `authorization: Bearer <token>`.
fn bearer(metadata: &MetadataMap) -> Option<&str> {
    let v = metadata.get("authorization")?.to_str().ok()?.trim();
    let (scheme, token) = v.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// Whether the call being handled has (all but) no time left: a downstream
/// DEADLINE_EXCEEDED is then the caller's budget, not the downstream's fault.
fn caller_out_of_time() -> bool {
    mesh_runtime::grpc::CallContext::current()
        .and_then(|c| c.remaining())
        .is_some_and(|left| left < Duration::from_millis(10))
}

fn descriptor(entries: &[(&str, &str)], hits: u32) -> Descriptor {
    Descriptor {
        entries: entries
            .iter()
            .map(|(k, v)| Entry { key: (*k).to_owned(), value: (*v).to_owned() })
            .collect(),
        hits_addend: Some(hits),
    }
}

impl Guard {
    pub(crate) fn new(
        session: SessionClient,
        ratelimit: Option<RateLimitClient>,
        c: &DataConfig,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            session,
            ratelimit,
            touch: c.session_touch,
            session_timeout: c.session_timeout,
            domain: c.ratelimit_domain.clone(),
            mode: c.ratelimit_failure_mode,
            ratelimit_timeout: c.ratelimit_timeout,
            metrics,
            warnings: Arc::new(Throttle::new(Duration::from_secs(10))),
        }
    }

    /// The caller behind the call's session token.
    pub(crate) async fn authenticate(&self, metadata: &MetadataMap) -> Result<Caller, Error> {
        let Some(token) = bearer(metadata) else { return Err(Error::Unauthenticated(MISSING_TOKEN)) };
        let mut req =
            tonic::Request::new(ValidateSessionRequest { token: token.to_owned(), touch: self.touch });
        req.set_timeout(self.session_timeout);
        match self.session.validate_session(req).await {
            Ok(resp) => {
                let s =
                    resp.session.ok_or(Error::Internal("the session service answered without a session"))?;
                if s.user_id.trim().is_empty() {
                    // Sessions made before blank ids were refused: the audit
                    // log cannot record their changes (its actor must not be blank).
                    return Err(Error::Unauthenticated(
                        "the session's user id is blank; create a new session",
                    ));
                }
                Ok(Caller { user_id: s.user_id, session_id: s.id })
            }
            Err(s) if matches!(s.code(), Code::Unauthenticated | Code::InvalidArgument) => {
                Err(Error::Unauthenticated(UNAUTHENTICATED))
            }
            // The caller's own deadline ran out (not our session timeout): its
            // budget, not the session service, was too short.
            Err(s) if s.code() == Code::DeadlineExceeded && caller_out_of_time() => {
                Err(Error::DeadlineExceeded("the deadline passed while the session was being validated"))
            }
            Err(s) => {
                self.metrics.session_unavailable.inc();
                if let Some(suppressed) = self.warnings.ready() {
                    tracing::warn!(code = ?s.code(), error = %s.message(), suppressed, "session service could not validate a token");
                }
                Err(Error::Unavailable("cannot validate the session now, try again later".to_owned()))
            }
        }
    }

    /// Counts `hits` (collection → operations) for `caller`.
    pub(crate) async fn admit(&self, caller: &Caller, hits: &BTreeMap<&str, u32>) -> Result<(), Error> {
        let Some(client) = &self.ratelimit else { return Ok(()) };
        let user = caller.user_id.as_str();
        let total = hits.values().sum();
        let mut descriptors = vec![descriptor(&[("user_id", user)], total)];
        descriptors.extend(hits.iter().map(|(c, n)| descriptor(&[("user_id", user), ("collection", c)], *n)));
        let req = CheckRequest { domain: self.domain.clone(), descriptors, hits_addend: 0 };
        match client.admit(req, self.ratelimit_timeout).await {
            Admission::Allowed => Ok(()),
            Admission::Refused(status) => {
                tracing::error!(code = ?status.code(), error = %status.message(), "the rate-limit service refused the check of a data call");
                Err(Error::Internal("the rate-limit check of this call was refused"))
            }
            Admission::OverLimit { retry_after } => {
                self.metrics.ratelimited.inc();
                Err(Error::RateLimited { retry_after })
            }
            Admission::Undecided(status) => {
                self.metrics.ratelimit_undecided.get_or_create(&ModeLabels { mode: self.mode.label() }).inc();
                if let Some(suppressed) = self.warnings.ready() {
                    tracing::warn!(
                        code = ?status.code(),
                        error = %status.message(),
                        mode = self.mode.label(),
                        suppressed,
                        "rate-limit service could not decide a data call"
                    );
                }
                match self.mode {
                    FailureMode::FailOpen => Ok(()),
                    FailureMode::FailClosed => {
                        Err(Error::Unavailable("rate limiting is unavailable, try again later".to_owned()))
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn md(v: &str) -> MetadataMap {
        let mut m = MetadataMap::new();
        m.insert("authorization", v.parse().unwrap());
        m
    }

    #[test]
    fn bearer_tokens_are_found_case_insensitively() {
        assert_eq!(bearer(&md("Bearer abc")), Some("abc"));
        assert_eq!(bearer(&md("bearer   abc ")), Some("abc"));
        assert_eq!(bearer(&md("Basic abc")), None);
        assert_eq!(bearer(&md("Bearer ")), None);
        assert_eq!(bearer(&MetadataMap::new()), None);
    }
}

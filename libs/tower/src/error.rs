//! The errors the layers raise themselves, and how every error a call can end
//! with becomes the `tonic::Status` the caller sees.

use std::{error::Error as StdError, sync::Arc, time::Duration};

use tonic::{Code, Status};

/// Boxed error flowing between layers (what tonic's transport uses).
pub type BoxError = Box<dyn StdError + Send + Sync>;

/// Failures decided by the client stack itself, before or instead of an answer.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// Every endpoint's circuit breaker is open: failed at once, nothing was sent.
    #[error("{upstream}: circuit breaker open on all {endpoints} endpoints, not calling")]
    AllOpen {
        /// The upstream service (e.g. `ratelimit`).
        upstream: Arc<str>,
        /// How many endpoints it has.
        endpoints: usize,
    },
    /// No endpoint is known (nothing resolved yet, or DNS returned nothing).
    #[error("{upstream}: no endpoints ({reason})")]
    NoEndpoints {
        /// The upstream service.
        upstream: Arc<str>,
        /// Why, e.g. the last resolution error.
        reason: Arc<str>,
    },
    /// This endpoint's circuit breaker is open: nothing was sent to it.
    #[error("{endpoint}: circuit breaker open, not calling")]
    EndpointOpen {
        /// The endpoint (`ip:port`).
        endpoint: Arc<str>,
    },
    /// The caller's deadline leaves no time for this call: nothing was sent.
    #[error("deadline exceeded: the caller's budget was spent before calling {method}")]
    BudgetExhausted {
        /// `/package.Service/Method`.
        method: Arc<str>,
    },
    /// No answer before the deadline.
    #[error("deadline exceeded after {0:?}")]
    Timeout(Duration),
}

impl Error {
    /// The gRPC code the caller sees.
    pub fn code(&self) -> Code {
        match self {
            Error::AllOpen { .. } | Error::NoEndpoints { .. } | Error::EndpointOpen { .. } => {
                Code::Unavailable
            }
            Error::BudgetExhausted { .. } | Error::Timeout(_) => Code::DeadlineExceeded,
        }
    }
}

impl From<Error> for Status {
    fn from(e: Error) -> Self {
        Status::new(e.code(), e.to_string())
    }
}

/// The status a failed call reports: the stack's own errors by their code,
/// a `Status` as is, transport errors as tonic maps them (a refused
/// connection is UNAVAILABLE).
pub fn into_status(err: BoxError) -> Status {
    match err.downcast::<Error>() {
        Ok(e) => (*e).into(),
        Err(err) => match err.downcast::<Status>() {
            Ok(s) => *s,
            // tonic's channel enforces `grpc-timeout` itself and calls that
            // CANCELLED; to the caller it is the deadline it set running out.
            Err(err) if timed_out(&*err) => Status::deadline_exceeded("deadline exceeded"),
            Err(err) => Status::from_error(err),
        },
    }
}

/// How a failed attempt failed, for retry and breaker decisions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Failure {
    /// Nothing reached the server (refused connection, open breaker): always safe to repeat.
    NotSent,
    /// Failing again would fail the same way at once (all breakers open, budget spent).
    FailFast,
    /// The attempt timed out.
    Timeout,
    /// The connection broke while the call was in flight: the server may have acted.
    Transport,
}

/// Classifies an error from the layers below.
pub(crate) fn failure_of(err: &(dyn StdError + 'static)) -> Failure {
    let mut source = Some(err);
    while let Some(e) = source {
        if let Some(e) = e.downcast_ref::<Error>() {
            return match e {
                Error::EndpointOpen { .. } => Failure::NotSent,
                Error::AllOpen { .. } | Error::NoEndpoints { .. } | Error::BudgetExhausted { .. } => {
                    Failure::FailFast
                }
                Error::Timeout(_) => Failure::Timeout,
            };
        }
        if e.downcast_ref::<tonic::ConnectError>().is_some() {
            return Failure::NotSent;
        }
        if e.downcast_ref::<tonic::TimeoutExpired>().is_some() {
            return Failure::Timeout;
        }
        source = e.source();
    }
    Failure::Transport
}

/// Whether `err` is, or is caused by, tonic's own `grpc-timeout` expiring.
fn timed_out(err: &(dyn StdError + 'static)) -> bool {
    let mut source = Some(err);
    while let Some(e) = source {
        if e.downcast_ref::<tonic::TimeoutExpired>().is_some() {
            return true;
        }
        source = e.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tonics_own_timeout_is_a_deadline_not_a_cancellation() {
        let err: BoxError = Box::new(tonic::TimeoutExpired(()));
        assert!(matches!(failure_of(&*err), Failure::Timeout));
        assert_eq!(into_status(err).code(), Code::DeadlineExceeded);
    }

    #[test]
    fn stack_errors_keep_their_code_and_message() {
        let s = into_status(Box::new(Error::AllOpen { upstream: "audit".into(), endpoints: 2 }));
        assert_eq!(s.code(), Code::Unavailable);
        assert_eq!(s.message(), "audit: circuit breaker open on all 2 endpoints, not calling");
        let s = into_status(Box::new(Error::BudgetExhausted { method: "/a.B/C".into() }));
        assert_eq!(s.code(), Code::DeadlineExceeded);
        let s = into_status(Box::new(Status::not_found("no such key")));
        assert_eq!((s.code(), s.message()), (Code::NotFound, "no such key"));
    }

    #[test]
    fn failures_are_classified_through_the_source_chain() {
        let refused = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        let connect = tonic::ConnectError(Box::new(refused));
        assert_eq!(failure_of(&connect), Failure::NotSent);
        assert_eq!(failure_of(&Error::EndpointOpen { endpoint: "127.0.0.1:1".into() }), Failure::NotSent);
        assert_eq!(failure_of(&Error::Timeout(Duration::from_millis(5))), Failure::Timeout);
        assert_eq!(failure_of(&Error::AllOpen { upstream: "x".into(), endpoints: 1 }), Failure::FailFast);
        let reset = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset");
        assert_eq!(failure_of(&reset), Failure::Transport);
    }
}

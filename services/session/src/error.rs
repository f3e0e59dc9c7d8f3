//! The service's errors and their one mapping to gRPC statuses.

use std::time::Duration;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, FieldViolation, StatusExt};

/// The one message of every refused token: malformed, unknown, revoked and
/// expired tokens must be indistinguishable.
pub const UNAUTHENTICATED: &str = "session token is invalid or expired";

/// What went wrong in a call. Messages never carry tokens.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Error {
    /// Bad input, one violation per field.
    #[error("invalid request")]
    InvalidArgument(Vec<FieldViolation>),
    /// No live session for the token.
    #[error("{UNAUTHENTICATED}")]
    Unauthenticated,
    /// CreateSession over a rate limit.
    #[error("too many sessions created for this user or client ip")]
    RateLimited {
        /// When the same call can go through.
        retry_after: Duration,
    },
    /// A dependency (Redis, the rate-limit service) cannot answer now.
    #[error("{0}")]
    Unavailable(String),
}

impl From<Error> for Status {
    fn from(e: Error) -> Self {
        match e {
            Error::InvalidArgument(violations) => mesh_runtime::grpc::invalid_argument(violations),
            Error::Unauthenticated => Status::unauthenticated(UNAUTHENTICATED),
            e @ Error::RateLimited { retry_after } => Status::with_error_details(
                Code::ResourceExhausted,
                e.to_string(),
                ErrorDetails::with_retry_info(Some(retry_after)),
            ),
            Error::Unavailable(m) => Status::unavailable(m),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_carry_their_details() {
        let s =
            Status::from(Error::InvalidArgument(vec![FieldViolation::new("user_id", "must not be empty")]));
        assert_eq!(s.code(), Code::InvalidArgument);
        assert_eq!(s.message(), "invalid request: user_id: must not be empty");
        let v = &s.get_details_bad_request().unwrap().field_violations;
        assert_eq!((v[0].field.as_str(), v.len()), ("user_id", 1));

        let s = Status::from(Error::RateLimited { retry_after: Duration::from_secs(7) });
        assert_eq!(s.code(), Code::ResourceExhausted);
        assert_eq!(s.get_details_retry_info().unwrap().retry_delay, Some(Duration::from_secs(7)));

        assert_eq!(Status::from(Error::Unauthenticated).message(), UNAUTHENTICATED);
    }
}

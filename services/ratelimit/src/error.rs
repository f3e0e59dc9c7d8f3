//! The service's errors and their one mapping to gRPC statuses.

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

/// What went wrong in a call.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Error {
    /// Bad input: `(field, description)` violations.
    #[error("invalid request")]
    InvalidArgument(Vec<(String, String)>),
    /// No such domain or rule.
    #[error("{0}")]
    NotFound(String),
    /// Redis could not do what was asked (Reset only: Check never fails on Redis).
    #[error("{0}")]
    Unavailable(String),
}

impl From<Error> for Status {
    fn from(e: Error) -> Self {
        match e {
            Error::InvalidArgument(violations) => {
                let mut details = ErrorDetails::new();
                for (field, description) in &violations {
                    details.add_bad_request_violation(field.clone(), description.clone());
                }
                let summary =
                    violations.iter().map(|(f, d)| format!("{f}: {d}")).collect::<Vec<_>>().join("; ");
                Status::with_error_details(
                    Code::InvalidArgument,
                    format!("invalid request: {summary}"),
                    details,
                )
            }
            Error::NotFound(m) => Status::not_found(m),
            Error::Unavailable(m) => Status::unavailable(m),
        }
    }
}

//! The service's errors and their one mapping to gRPC statuses.

use tonic::Status;

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
            Error::InvalidArgument(violations) => mesh_runtime::grpc::invalid_argument(
                violations.into_iter().map(|(f, d)| tonic_types::FieldViolation::new(f, d)).collect(),
            ),
            Error::NotFound(m) => Status::not_found(m),
            Error::Unavailable(m) => Status::unavailable(m),
        }
    }
}

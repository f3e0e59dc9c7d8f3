//! The service's errors and their one mapping to gRPC statuses.

use std::{collections::HashMap, time::Duration};

use mesh_db::DbError;
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, FieldViolation, StatusExt};

/// The message of every refused session token: malformed, unknown, revoked
/// and expired tokens are one and the same to a caller.
pub const UNAUTHENTICATED: &str = "session token is invalid or expired";

/// The message of a call without a bearer token.
pub const MISSING_TOKEN: &str = "missing session token: send `authorization: Bearer <session token>`";

/// `google.rpc.ErrorInfo.domain` of this service's errors.
pub const ERROR_DOMAIN: &str = "data.mesh";

/// `google.rpc.ErrorInfo.reason` of a failed precondition.
pub const VERSION_MISMATCH: &str = "VERSION_MISMATCH";

/// A precondition that did not hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Conflict {
    /// The operation's index in a Batch; `None` for Put and Delete.
    pub(crate) op: Option<usize>,
    pub(crate) collection: String,
    pub(crate) key: String,
    pub(crate) expected: u64,
    /// The document's version; `None` when it does not exist.
    pub(crate) actual: Option<u64>,
}

impl Conflict {
    fn message(&self) -> String {
        let at = match self.op {
            Some(i) => format!("ops[{i}] ({}/{})", self.collection, self.key),
            None => format!("{}/{}", self.collection, self.key),
        };
        let expected = match self.expected {
            0 => "no document (expected_version 0)".to_owned(),
            n => format!("version {n}"),
        };
        let actual = match self.actual {
            None => "the document does not exist".to_owned(),
            Some(v) => format!("it is at version {v}"),
        };
        format!("version conflict on {at}: expected {expected}, {actual}")
    }
}

/// What went wrong in a call. Messages never carry tokens.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Error {
    /// Bad input, one violation per field; nothing was read or written.
    #[error("invalid request")]
    InvalidArgument(Vec<FieldViolation>),
    /// No usable session token.
    #[error("{0}")]
    Unauthenticated(&'static str),
    /// Over a rate limit.
    #[error("rate limit exceeded, retry after the delay in RetryInfo")]
    RateLimited {
        /// When the same call can go through.
        retry_after: Duration,
    },
    /// No such document.
    #[error("document {collection}/{key} not found")]
    NotFound { collection: String, key: String },
    /// A precondition (expected_version) did not hold; nothing was written.
    #[error("{}", .0.message())]
    Conflict(Conflict),
    /// A dependency (the database, the session service) cannot answer now.
    #[error("{0}")]
    Unavailable(String),
    /// The call's deadline passed before it was done.
    #[error("{0}")]
    DeadlineExceeded(&'static str),
    /// A fault of ours; the details are logged, not sent.
    #[error("{0}")]
    Internal(&'static str),
}

impl From<DbError> for Error {
    fn from(e: DbError) -> Self {
        // statement_timeout (or a cancel by an operator): the database's own deadline.
        if matches!(&e, DbError::Sqlx(sqlx::Error::Database(d)) if d.code().as_deref() == Some("57014")) {
            tracing::warn!(error = %e, "a statement ran out of time");
            return Self::DeadlineExceeded("the database statement timed out");
        }
        if e.is_unavailable() {
            tracing::debug!(error = %e, "database unavailable");
            Self::Unavailable(
                match e {
                    DbError::PoolTimedOut { .. } => "database busy: no connection within the acquire timeout",
                    _ => "database unavailable",
                }
                .to_owned(),
            )
        } else {
            tracing::error!(error = %e, "database error");
            Self::Internal("database error")
        }
    }
}

impl From<sqlx::Error> for Error {
    fn from(e: sqlx::Error) -> Self {
        DbError::from(e).into()
    }
}

impl From<Error> for Status {
    fn from(e: Error) -> Self {
        match e {
            Error::InvalidArgument(violations) => mesh_runtime::grpc::invalid_argument(violations),
            Error::Unauthenticated(m) => Status::unauthenticated(m),
            e @ Error::RateLimited { retry_after } => Status::with_error_details(
                Code::ResourceExhausted,
                e.to_string(),
                ErrorDetails::with_retry_info(Some(retry_after)),
            ),
            e @ Error::NotFound { .. } => Status::not_found(e.to_string()),
            Error::Conflict(c) => {
                let mut metadata = HashMap::from([
                    ("collection".to_owned(), c.collection.clone()),
                    ("key".to_owned(), c.key.clone()),
                    ("expected_version".to_owned(), c.expected.to_string()),
                    (
                        "actual_version".to_owned(),
                        c.actual.map_or_else(|| "none".to_owned(), |v| v.to_string()),
                    ),
                ]);
                if let Some(i) = c.op {
                    metadata.insert("op_index".to_owned(), i.to_string());
                }
                Status::with_error_details(
                    Code::Aborted,
                    c.message(),
                    ErrorDetails::with_error_info(VERSION_MISMATCH, ERROR_DOMAIN, metadata),
                )
            }
            Error::Unavailable(m) => Status::unavailable(m),
            Error::DeadlineExceeded(m) => Status::deadline_exceeded(m),
            Error::Internal(m) => Status::internal(m),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conflicts_name_the_op_and_both_versions() {
        let c = Conflict {
            op: Some(2),
            collection: "orders".into(),
            key: "o-17".into(),
            expected: 3,
            actual: Some(5),
        };
        let s = Status::from(Error::Conflict(c.clone()));
        assert_eq!(s.code(), Code::Aborted);
        assert_eq!(
            s.message(),
            "version conflict on ops[2] (orders/o-17): expected version 3, it is at version 5"
        );
        let info = s.get_details_error_info().unwrap();
        assert_eq!((info.reason.as_str(), info.metadata["op_index"].as_str()), (VERSION_MISMATCH, "2"));
        let s =
            Status::from(Error::Conflict(Conflict { op: None, expected: 0, actual: Some(1), ..c.clone() }));
        assert_eq!(
            s.message(),
            "version conflict on orders/o-17: expected no document (expected_version 0), it is at version 1"
        );
        let s = Status::from(Error::Conflict(Conflict { op: None, actual: None, ..c }));
        assert!(s.message().ends_with("expected version 3, the document does not exist"));
    }

    #[test]
    fn rate_limits_carry_retry_info_and_bad_input_its_fields() {
        let s = Status::from(Error::RateLimited { retry_after: Duration::from_secs(2) });
        assert_eq!(s.code(), Code::ResourceExhausted);
        assert_eq!(s.get_details_retry_info().unwrap().retry_delay, Some(Duration::from_secs(2)));
        let s = Status::from(Error::InvalidArgument(vec![FieldViolation::new("key", "must not be empty")]));
        assert_eq!(s.message(), "invalid request: key: must not be empty");
        assert_eq!(s.get_details_bad_request().unwrap().field_violations[0].field, "key");
    }
}

//! The service's errors and their one mapping to gRPC statuses.

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, FieldViolation, StatusExt};

/// Everything that can go wrong inside the audit service.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request is malformed; nothing was written.
    #[error("invalid request")]
    InvalidArgument(Vec<FieldViolation>),
    /// A sequence range outside what exists (or is still retained).
    #[error("{0}")]
    OutOfRange(String),
    /// The append queue is full.
    #[error("append queue is full, retry later")]
    Overloaded,
    /// The idempotency key was first used, by the same source service, for
    /// a different event; nothing was written.
    #[error(
        "idempotency_key was first used by this source.service for a different event (sequence \
         {first_sequence}); a new event needs a new key"
    )]
    KeyReused {
        /// The event it was first used for.
        first_sequence: u64,
    },
    /// This instance serves as many Tail streams as it may.
    #[error("this instance already serves {max} tail streams, the most it may; retry later or elsewhere")]
    TooManySubscribers {
        /// The cap.
        max: usize,
    },
    /// The service is stopping and takes no new appends.
    #[error("the audit service is shutting down")]
    ShuttingDown,
    /// The database could not be reached; nothing was committed.
    #[error("database unavailable: {0}")]
    Unavailable(String),
    /// The connection failed around COMMIT: the batch may or may not be
    /// committed. A retry with the same idempotency key resolves it.
    #[error("commit outcome unknown ({0}), retry with the same idempotency key")]
    CommitUnknown(String),
    /// A Tail subscriber did not keep up with the live events.
    #[error(
        "tail subscriber fell more than {buffered} events behind the live head; \
         resume with after_sequence={resume_after}"
    )]
    SlowSubscriber {
        /// The last sequence the subscriber was sent.
        resume_after: u64,
        /// How far behind counts as too slow.
        buffered: usize,
    },
    /// The server is draining; long-lived streams end so clients reconnect elsewhere.
    #[error("the audit service is draining; resume with after_sequence={resume_after}")]
    Draining {
        /// The last sequence the subscriber was sent.
        resume_after: u64,
    },
    /// A stored event cannot be read back as an event: only a row altered
    /// behind the service's back (the service writes none such). Names it,
    /// so one damaged row is found, not taken for an outage.
    #[error("event {sequence} cannot be read ({why}); run Verify over it")]
    Unreadable {
        /// Its sequence.
        sequence: i64,
        /// What is wrong with the row.
        why: String,
    },
    /// The database said no.
    #[error("database error: {0}")]
    Db(#[from] sqlx::Error),
    /// Something that should not happen; logged where it happened.
    #[error("{0}")]
    Internal(String),
}

impl Error {
    /// One bad field.
    pub(crate) fn field(field: impl Into<String>, description: impl Into<String>) -> Self {
        Self::InvalidArgument(vec![FieldViolation::new(field, description)])
    }
}

/// Whether a database error means the server could not be reached (or went
/// away), as opposed to refusing the statement.
pub(crate) fn is_connection_error(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        // 08: connection exception; 57P: operator intervention (shutdown, crash)
        sqlx::Error::Database(d) => d.code().is_some_and(|c| c.starts_with("08") || c.starts_with("57P")),
        _ => false,
    }
}

fn sqlstate(e: &sqlx::Error) -> Option<String> {
    e.as_database_error().and_then(|d| d.code()).map(|c| c.into_owned())
}

impl From<Error> for Status {
    fn from(e: Error) -> Self {
        match e {
            Error::InvalidArgument(violations) => mesh_runtime::grpc::invalid_argument(violations),
            Error::OutOfRange(m) => Status::out_of_range(m),
            e @ (Error::Overloaded
            | Error::ShuttingDown
            | Error::Unavailable(_)
            | Error::CommitUnknown(_)
            | Error::Draining { .. }) => Status::unavailable(e.to_string()),
            e @ Error::KeyReused { first_sequence, .. } => {
                let mut details = ErrorDetails::new();
                details.set_error_info(
                    "IDEMPOTENCY_KEY_REUSED",
                    "mesh.audit.v1",
                    [("first_sequence".to_owned(), first_sequence.to_string())],
                );
                Status::with_error_details(Code::AlreadyExists, e.to_string(), details)
            }
            e @ Error::TooManySubscribers { .. } => {
                let mut details = ErrorDetails::new();
                details.set_error_info(
                    "TAIL_SUBSCRIBERS_EXHAUSTED",
                    "mesh.audit.v1",
                    std::collections::HashMap::<String, String>::new(),
                );
                Status::with_error_details(Code::ResourceExhausted, e.to_string(), details)
            }
            e @ Error::SlowSubscriber { resume_after, .. } => {
                let mut details = ErrorDetails::new();
                details.set_error_info(
                    "TAIL_SUBSCRIBER_TOO_SLOW",
                    "mesh.audit.v1",
                    [("resume_after_sequence".to_owned(), resume_after.to_string())],
                );
                Status::with_error_details(Code::ResourceExhausted, e.to_string(), details)
            }
            Error::Db(e) if is_connection_error(&e) => {
                Status::unavailable(format!("database unavailable: {e}"))
            }
            Error::Db(e) if sqlstate(&e).as_deref() == Some("57014") => {
                Status::deadline_exceeded("the database statement timed out")
            }
            // 40001 also covers a replica cancelling a long read that
            // conflicts with recovery; a retry is the answer to both
            Error::Db(e) if matches!(sqlstate(&e).as_deref(), Some("40001" | "40P01")) => {
                Status::aborted(format!("the read was cancelled by the database, retry: {e}"))
            }
            Error::Db(e) => {
                tracing::error!(error = %e, "database error");
                Status::internal("database error")
            }
            e @ Error::Unreadable { .. } => {
                tracing::error!(error = %e, "unreadable audit event");
                Status::data_loss(e.to_string())
            }
            Error::Internal(m) => Status::internal(m),
        }
    }
}

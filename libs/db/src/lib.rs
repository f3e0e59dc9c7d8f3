//! PostgreSQL for mesh services: a write pool on the primary, read pools on
//! streaming replicas, and read routing that respects replication lag.
//!
//! - Writes go to [`Db::primary`].
//! - [`Db::reader`] picks a healthy replica (round-robin) or falls back to the
//!   primary; [`Db::reader_at`] additionally requires the replica to have
//!   replayed a given WAL position (a consistency token), so a caller reads
//!   its own writes.
//! - A monitor task polls each replica's replay LSN and the primary's current
//!   LSN; a replica that fails or lags past `max_replica_lag_bytes` is left
//!   out until it is healthy again.
//! - Every routing decision is counted in `mesh_db_reads_total{served_by, reason}`.
//!
//! # Layout
//! - `config`: [`DbConfig`] from the environment.
//! - `lsn`: [`Lsn`], a WAL position (`16/B374D848`).
//! - `pools`: [`Db`], connection, routing, monitor, readiness checks, migrations.

mod config;
mod lsn;
mod pools;

pub use config::{DbConfig, keys};
pub use lsn::Lsn;
pub use pools::{Db, DbError, Reader, ServedBy};
pub use sqlx;

/// A client span for one PostgreSQL statement, with the OpenTelemetry
/// database semantic-convention attributes: `db.system.name = "postgresql"`,
/// `db.operation.name` (e.g. `INSERT`), `db.collection.name` (the table) and
/// `db.query.text`, the parameterised statement (`$1` placeholders, never
/// values). Instrument the future of the statement with it.
pub fn span(operation: &'static str, table: &'static str, statement: &'static str) -> tracing::Span {
    tracing::info_span!(
        "postgres",
        otel.name = %format_args!("{operation} {table}"),
        otel.kind = "client",
        otel.status_code = tracing::field::Empty,
        db.system = "postgresql",
        db.system.name = "postgresql",
        db.operation.name = operation,
        db.collection.name = table,
        db.query.text = statement,
    )
}

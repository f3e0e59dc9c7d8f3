//! PostgreSQL for mesh services: a write pool on the primary, read pools on
//! streaming replicas, and read routing that respects replication lag and
//! the caller's own writes.
//!
//! - Writes go to [`Db::write`] (fails fast while the primary is down).
//! - [`Db::read`] runs a read on a healthy replica or the primary; with a
//!   consistency token (an [`Lsn`], from [`Db::current_lsn`] after a commit)
//!   only where that position has been replayed, checked on the very
//!   connection that runs the read, so a caller always reads its own writes.
//! - A monitor polls the primary and each replica on connections of its own:
//!   a replica that fails, or lags past `max_replica_lag_bytes` or
//!   `max_replica_delay`, is left out until it is healthy again.
//! - A pooled connection that died while idle costs no caller an error: the
//!   ones older than the server's last outage are dropped, and the ones idle
//!   past [`PING_IDLE_AFTER`] are pinged before they are handed out. Nothing
//!   is ever re-sent: a statement that fails on a connection fails.
//! - Every routing decision is counted in `mesh_db_reads_total{served_by,
//!   reason}`; every pool exports the OpenTelemetry connection-pool metrics
//!   (`db_client_connection_*`, see `metrics`).
//!
//! # Layout
//! - `config`: [`DbConfig`] from the environment (every key in [`keys`]).
//! - `lsn`: [`Lsn`], a WAL position (`16/B374D848`).
//! - `pools`: [`Db`], [`Conn`], routing, the monitor, readiness checks, migrations.
//! - `metrics`: the Prometheus families and the pool collector.

mod config;
mod lsn;
mod metrics;
mod pools;

pub use config::{DbConfig, MigrateMode, keys};
pub use lsn::Lsn;
pub use pools::{
    Conn, Db, DbError, PING_IDLE_AFTER, Read, Reader, ServedBy, alive_after_idle, is_connection_error,
    migrate_command,
};
pub use sqlx;

/// A client span for one PostgreSQL statement, with the OpenTelemetry
/// database semantic-convention attributes: `db.system.name = "postgresql"`,
/// `db.operation.name` (e.g. `INSERT`), `db.collection.name` (the table),
/// `db.query.text`, the parameterised statement (`$1` placeholders, never
/// values), and `server.address` / `server.port` when recorded (as
/// [`span_on`], [`span_for`] and [`Conn::span`] do: use one of them).
/// Instrument the future of the statement with it.
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
        server.address = tracing::field::Empty,
        server.port = tracing::field::Empty,
    )
}

/// [`span`] for a statement run on `pool`, with `server.address` and
/// `server.port` of the server the pool connects to (for a statement run
/// on a [`Conn`], use [`Conn::span`]).
pub fn span_on(
    pool: &sqlx::PgPool,
    operation: &'static str,
    table: &'static str,
    statement: &'static str,
) -> tracing::Span {
    span_for(&pool.connect_options(), operation, table, statement)
}

/// [`span`] for a statement run on a connection made from `options` (a
/// lone `PgConnection`, or one taken from a pool built with them), with
/// `server.address` (the host, or the Unix socket directory) and
/// `server.port` from `options`; nothing else of `options` (user,
/// password, database) is recorded.
pub fn span_for(
    options: &sqlx::postgres::PgConnectOptions,
    operation: &'static str,
    table: &'static str,
    statement: &'static str,
) -> tracing::Span {
    let span = span(operation, table, statement);
    span.record("server.address", options.get_host());
    span.record("server.port", i64::from(options.get_port()));
    span
}

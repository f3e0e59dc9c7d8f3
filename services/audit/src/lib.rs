//! The mesh audit-log service (`mesh.audit.v1.AuditService`): an
//! append-only, hash-chained audit trail in PostgreSQL that loses nothing.
//!
//! - **Append** is acknowledged only after its event is committed on the
//!   primary and the WAL holding it is flushed. Concurrent appends are
//!   group-committed: one multi-row statement per batch (usually one round
//!   trip), then one WAL flush for every batch committed meanwhile
//!   (module `appender` explains why it is split so). An
//!   idempotency key (per source service) returns the first result, across
//!   instances too.
//! - **The chain**: `hash = SHA-256(prev_hash || canonical(event))`, the
//!   encoding specified in [`chain`]. Sequences are gapless and strictly
//!   increasing across every instance because each batch holds the chain
//!   head row for its transaction.
//! - **Append-only storage**: the service serves as `mesh_audit_writer`,
//!   which may only SELECT and INSERT events; triggers refuse UPDATE, DELETE
//!   and TRUNCATE for everyone; monthly partitions are dropped whole by
//!   `mesh-audit retention`, which checkpoints the chain at each boundary so
//!   [`verify`] still anchors what remains. See `migrations/0001_events.sql`.
//! - **Query** reads a replica (else the primary) with keyset pages;
//!   **Tail** replays then streams live events from one listener per
//!   instance; **Export** streams JSON lines ([`export`]); **Verify**
//!   recomputes a range, also offline (`mesh-audit verify`, [`cli`]).
//!
//! # Layout
//! - `config`: [`Config`] from the environment (`MESH_AUDIT_*` documented there), [`Clock`].
//! - `domain`: requests validated into [`domain::NewEvent`], [`domain::Filter`], page tokens.
//! - [`chain`]: the event, its canonical encoding and hash.
//! - `store`: every SQL statement.
//! - `appender`: the group-commit and flush tasks behind Append (on a thread of their own).
//! - `tail`: the per-instance listener, its ring of recent events, subscribers.
//! - [`verify`]: recomputing the chain over a range.
//! - [`export`]: JSON lines, out and back in.
//! - [`checkpoint`]: signed checkpoints of the chain head, published outside the database.
//! - `api`: the gRPC service; `error`: [`Error`] and its mapping to `tonic::Status`.
//! - `app`: [`App`]: migrates as the owner, serves as the writer role.
//! - [`cli`]: `mesh-audit verify | export | retention | keygen`.

mod api;
mod app;
mod appender;
pub mod chain;
pub mod checkpoint;
pub mod cli;
mod config;
pub mod domain;
mod error;
pub mod export;
mod store;
mod tail;
pub mod verify;

pub use app::{App, StartError};
pub use config::{AuditConfig, Clock, Config, DEFAULT_PORT, ManualClock, keys};
pub use error::Error;
pub use store::{Dropped, WRITER_ROLE};

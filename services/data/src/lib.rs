//! The mesh data service (`mesh.data.v1.DataService`): a versioned JSON
//! document store on PostgreSQL, on the mesh's main path.
//!
//! - **Every call** is authenticated through the session service and rate
//!   limited through the rate-limit service (`guard`) before a document is
//!   touched.
//! - **Documents** are JSON objects per collection and key, with a version
//!   for optimistic concurrency: `expected_version` absent is unconditional,
//!   0 means "must not exist", n means "must be at version n"; a mismatch is
//!   ABORTED naming both versions (and the operation, in a Batch). Values
//!   round-trip bit for bit (`document`).
//! - **Writes** go to the primary, each Put, Delete or Batch as one
//!   all-or-nothing statement that also writes the change's audit events to
//!   an outbox: the change and its audit record are committed together or
//!   not at all (`store`, `outbox`). Every write returns a consistency token.
//! - **Reads** go to a replica that has replayed the caller's consistency
//!   token, else the primary (`mesh_db::Db::read`); responses say where in
//!   `x-mesh-served-by`. Queries are JSON containment (`@>`) with keyset
//!   pages and opaque page tokens bound to their query (`token`).
//!
//! Configuration: [`config`] lists every variable.
//!
//! # Layout
//! - [`config`]: [`Config`] from the environment.
//! - `app`: [`App`]: connects to PostgreSQL and the other services, migrates, serves.
//! - `api`: the gRPC service.
//! - `guard`: session validation and rate limits.
//! - `request`: requests validated into domain types.
//! - `document`: Struct ↔ stored forms, and what cannot be stored.
//! - `token`: consistency and page tokens.
//! - `store`: the SQL (and `migrations/`).
//! - `outbox`: audit delivery.
//! - `error`: the service's errors and their mapping to gRPC statuses.
//! - `metrics`: Prometheus metrics.
//! - `fuzz`: entry points for the fuzz targets in `fuzz/` (hidden, not an API).

mod api;
mod app;
pub mod config;
mod document;
mod error;
#[doc(hidden)]
pub mod fuzz;
mod guard;
mod metrics;
mod outbox;
mod request;
mod store;
mod token;

pub use api::SERVED_BY;
pub use app::{App, StartError};
pub use config::{Config, DEFAULT_PORT, DataConfig};
pub use document::{MAX_DEPTH, MAX_DOCUMENT_BYTES};
pub use error::{ERROR_DOMAIN, MISSING_TOKEN, UNAUTHENTICATED, VERSION_MISMATCH};
pub use outbox::SOURCE_SERVICE;
pub use request::{DEFAULT_PAGE_SIZE, MAX_BATCH_COLLECTIONS, MAX_NAME, MAX_PAGE_SIZE};

//! The mesh session service (`mesh.session.v1.SessionService`): sessions in
//! the Redis Cluster, shared by every instance.
//!
//! - **Tokens** are 256 random bits from the OS, shown once
//!   (`msess_<bucket>_<secret><check>`, see `token`); Redis holds only their
//!   SHA-256. Malformed, unknown, revoked and expired tokens are one and the
//!   same UNAUTHENTICATED. Tokens appear in no log, span, error or metric.
//! - **Storage** is designed for the cluster: a user's sessions, the token
//!   pointers, the user's index, the audit outbox and the invalidation
//!   channel share the user's bucket's hash tag, so every operation is one
//!   atomic Lua script in one slot, and a token carries its bucket, so
//!   validation is one round trip. Idle and absolute expiry are enforced
//!   together in the scripts; every key expires with what it belongs to.
//! - **Durability**: changes wait for a replica (`WAIT`), so a master
//!   failover loses no acknowledged session or revocation (`store`).
//! - **Validation cache**, invalidated across instances through sharded
//!   pub/sub published by the same scripts; a revocation returns once every
//!   instance that received it has confirmed its cache dropped the token; the
//!   cache is used only while every channel is subscribed (`cache`, `pubsub`).
//! - **CreateSession is rate limited** per user and client IP through the
//!   rate-limit service (`limiter`).
//! - **Audit**: create, refresh, revoke, revoke-all and cap evictions are
//!   written to an outbox with the change itself and delivered to the audit
//!   service in the background, with retries and idempotency keys (`outbox`).
//!
//! Configuration: [`config`] lists every variable.
//!
//! # Layout
//! - [`config`]: [`Config`] from the environment.
//! - `app`: [`App`]: connects to the Redis Cluster and the other services, serves.
//! - `api`: the gRPC service.
//! - [`authz`]: Envoy's external authorization API (ext_authz) on the same validation path.
//! - `request`: requests validated into domain types.
//! - `error`: the service's errors and their mapping to gRPC statuses.
//! - [`token`]: tokens, session ids, buckets, the audit hash.
//! - `store`: Redis keys and scripts (`lua/`), replica waits.
//! - `cache`: the validation cache.
//! - `pubsub`: the subscriptions that keep the cache right and wake the drainer.
//! - `limiter`: CreateSession's rate limits.
//! - `outbox`: audit delivery.
//! - `metrics`: Prometheus metrics.
//! - `fuzz`: entry points for the fuzz targets in `fuzz/` (hidden, not an API).

mod api;
mod app;
pub mod authz;
mod cache;
pub mod config;
mod error;
#[doc(hidden)]
pub mod fuzz;
mod limiter;
mod metrics;
mod outbox;
mod pubsub;
mod request;
mod store;
pub mod token;

pub use app::{App, StartError};
pub use config::{Config, DEFAULT_PORT, DEFAULT_REDIS_POOL_SIZE, SessionConfig};
pub use error::UNAUTHENTICATED;
pub use mesh_client::FailureMode;
pub use outbox::SOURCE_SERVICE;

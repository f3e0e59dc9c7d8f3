//! The mesh rate-limit service (`mesh.ratelimit.v1.RateLimitService`).
//!
//! # Layout
//! - `config`: [`Config`] from the environment.
//! - `app`: [`App`]: connects to the Redis Cluster and serves.
//! - `api`: the gRPC service.

mod api;
mod app;
mod config;

pub use app::{App, StartError};
pub use config::{Config, DEFAULT_PORT, keys};

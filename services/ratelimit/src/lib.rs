//! The mesh rate-limit service (`mesh.ratelimit.v1.RateLimitService`, and
//! Envoy's `envoy.service.ratelimit.v3.RateLimitService` on the same port).
//!
//! Rules are Envoy ratelimit's YAML (domains, nested descriptors, wildcard
//! values, `unlimited`, `shadow_mode`, `replaces`) plus `algorithm`
//! (`fixed_window`, `sliding_window` — the default — or `token_bucket`),
//! `burst` and a per-domain `failure_mode`. Counters live in the Redis
//! Cluster, decided by Lua scripts that take every descriptor of a call
//! all-or-nothing, across hash slots too (see `store`). Redis trouble never
//! hangs a caller: a hard deadline, a circuit breaker, then the domain's
//! failure mode.
//!
//! # Layout
//! - `config`: [`Config`] from the environment (deadline, breaker, caches, reload period).
//! - `app`: [`App`]: loads the rules, connects to the Redis Cluster and serves.
//! - `api`: both gRPC APIs, translating to and from the engine.
//! - `request`: requests validated into domain types ([`request::CheckCall`]).
//! - `error`: the service's errors and their mapping to gRPC statuses.
//! - `rules`: the rule model, Envoy's matching, YAML parsing, files and hot reload.
//! - `engine`: one decision — rules, over-limit cache, Redis, failure mode, metrics.
//! - `store`: Redis keys, the cross-slot protocol, deadline and circuit breaker.
//! - `algo`: the three algorithms in Rust (the fallback limiter; `lua/` holds Redis's copy).
//! - `local`: the over-limit cache and the in-memory fallback limiter.
//! - `fuzz`: entry points for the fuzz targets in `fuzz/` (hidden, not an API).
//! - `metrics`: Prometheus metrics per rule, Redis, breaker, fallback, reloads.

mod algo;
mod api;
mod app;
mod config;
mod engine;
mod error;
#[doc(hidden)]
pub mod fuzz;
mod local;
mod metrics;
mod request;
mod rules;
mod store;

pub use api::DECIDED_BY;
pub use app::{App, StartError};
pub use config::{Config, DEFAULT_PORT, DEFAULT_REDIS_POOL_SIZE, EngineConfig, RateLimitHeaders, keys};

//! The one way a mesh service starts: configuration from the environment,
//! telemetry (logs + OTLP traces), the gRPC server with health, reflection
//! and per-RPC metrics, readiness driven by dependency checks, the Redis
//! Cluster connection, and draining shutdown.
//!
//! # Layout
//! - [`config`]: `Lookup` over the environment (or a map in tests), typed reads.
//! - [`admission`]: calls in flight (shed past a short queue), message size, streams, connections.
//! - [`authz`]: who may call admin RPCs (`MESH_ADMIN_IDENTITIES`); refusals counted and audited.
//! - [`telemetry`]: tracing subscriber + OpenTelemetry OTLP exporter.
//! - [`trace_context`]: W3C `traceparent` in gRPC metadata.
//! - [`grpc`]: the server layer (span, request id, metrics) on every RPC.
//! - [`health`]: liveness/readiness semantics, dependency checks and their health names.
//! - [`identity`]: the caller's identity from its TLS client certificate.
//! - [`server`]: listeners, health + reflection, serve and drain.
//! - [`tls`]: mutual TLS (reloaded certificate files), the server's TLS accept loop, the client connector.
//! - [`redis`]: the Redis Cluster pool and its readiness check.
//! - [`main_loop`]: the body of every service's `main` (exit codes included).
//! - `metrics`: the Prometheus registry and `/metrics` endpoint.
//! - [`throttle`]: warnings that could repeat on every call, logged once in a while.
//!
//! # Allocator
//! Every program that links this crate (the services, their tests and tools)
//! allocates with [mimalloc](https://github.com/microsoft/mimalloc) instead of
//! glibc's malloc. A call allocates many short-lived buffers (HTTP/2 frames,
//! protobuf messages, Redis commands) across Tokio's worker threads, and
//! glibc's arenas spent about 15 % of a rate-limit service's CPU on them
//! (`perf`, issue 15); with mimalloc a Check costs the service about 11 %
//! less CPU (`libs/bench/results/ratelimit.md`, 2026-12-01).

pub mod admission;
pub mod authz;
pub mod config;
pub mod grpc;
pub mod health;
pub mod identity;
mod killable;
pub mod main_loop;
mod metrics;
pub mod redis;
pub mod server;
pub mod telemetry;
pub mod throttle;
pub mod tls;
pub mod trace_context;

pub use admission::Limits;
pub use authz::{AdminGuard, AdminIdentities, AuditSink};
pub use config::{ConfigError, Env, Lookup, LookupExt, ServerConfig};
pub use health::{
    Check, DEPENDENCY_PREFIX, Health, LIVENESS, Need, READINESS, dependency_name, remote_check,
};
pub use identity::{CallerIdentity, caller};
pub use main_loop::{StartFailure, run_service};
pub use metrics::{latency_buckets, latency_histogram};
pub use prometheus_client;
pub use server::{ServeError, Server, shutdown_signal};
pub use telemetry::{Roots, Telemetry, TelemetryConfig};
pub use throttle::Throttle;

// Not in this crate's own unit tests: they link a second copy of the crate
// (through `mesh-testkit`), whose allocator they use.
#[cfg(not(test))]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Exit code for a bad configuration (`EX_CONFIG` is 78; sysexits' `EX_USAGE`, 64, is what operators expect here).
pub const EXIT_CONFIG: u8 = 64;

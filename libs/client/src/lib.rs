//! Typed clients for the mesh services — session, rate-limit, audit and data —
//! with the mesh client stack built in: what a Rust service depends on to
//! call mesh.
//!
//! Every call goes through, outermost first: trace propagation (client span,
//! W3C `traceparent`/`tracestate`, `x-request-id`) → deadline (the caller's,
//! or the remaining budget of the call being handled less a margin; a spent
//! budget fails fast) → retry (only when safe, jittered backoff, a retry
//! budget) → p2c/PeakEWMA balancing over the service's instances (from
//! config, or DNS re-resolved) → a circuit breaker per instance → an attempt
//! timeout → the connection. The layers live in `mesh-tower`.
//!
//! ```no_run
//! # async fn example(server: &mut mesh_runtime::Server) -> Result<(), Box<dyn std::error::Error>> {
//! use mesh_client::{AuditClient, ClientConfig, ClientMetrics, RateLimitClient};
//!
//! let config = ClientConfig::from_env()?; // MESH_RATELIMIT_ADDR, MESH_AUDIT_ADDR, MESH_CLIENT_*
//! let metrics = ClientMetrics::register(server.registry()); // once per registry
//! let ratelimit = RateLimitClient::from_config(&config, &metrics)?;
//! let audit = AuditClient::from_config(&config, &metrics)?;
//! // Inside a handler, calls inherit its deadline, request id and trace.
//! let verdict = ratelimit.check(mesh_proto::ratelimit::CheckRequest::default()).await?;
//! # let _ = (verdict, audit);
//! # Ok(()) }
//! ```
//!
//! A library user without a Prometheus registry passes
//! `&ClientMetrics::default()`. Any other gRPC service can be called through
//! the same stack with a [`Channel`] and its tonic-generated client.
//!
//! Deadlines and request ids are inherited through a task-local the server
//! layer sets around each handler; work spawned onto other tasks keeps them
//! with `mesh_runtime::grpc::CallContext::current()` and `.scope(…)`.
//!
//! # Layout
//! - [`config`]: `ClientConfig` (addresses) and `StackConfig` (`MESH_CLIENT_*` tuning).
//! - `channel`: [`Channel`], the assembled stack for one upstream service.
//! - `session`, `ratelimit`, `audit`, `data`: one typed client each; `ratelimit`
//!   also holds [`RateLimitClient::admit`], the one way a service rate limits its calls.

pub mod config;

mod audit;
mod channel;
mod data;
mod ratelimit;
mod session;

pub use audit::AuditClient;
pub use channel::{Channel, ChannelBuilder};
pub use config::{ClientConfig, StackConfig};
pub use data::{DataClient, InvalidToken};
pub use mesh_tower::{ClientMetrics, EndpointStatus, Idempotency, Target};
pub use ratelimit::{Admission, DEFAULT_RETRY_AFTER, FailureMode, RateLimitClient, retry_after};
pub use session::SessionClient;

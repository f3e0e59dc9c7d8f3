//! The tower layers of the mesh client stack. Every outbound gRPC call of a
//! mesh service goes through them, in this order (outermost first):
//!
//! 1. [`TraceLayer`]: client span with the OpenTelemetry RPC attributes, W3C
//!    `traceparent`/`tracestate` and `x-request-id` in the metadata,
//!    `grpc_client_*` metrics; errors become the `Status` the caller sees.
//! 2. [`DeadlineLayer`]: one deadline for the whole call, inherited from the
//!    call being handled (less a margin) or the caller's own; a spent budget
//!    fails fast with DEADLINE_EXCEEDED.
//! 3. [`RetryLayer`]: only safe cases and retryable codes, jittered
//!    exponential backoff, a [`tower::retry::budget::TpsBudget`], replayable
//!    request bodies.
//! 4. [`Balance`]: power of two choices over PeakEWMA load across the
//!    endpoints [`discover`] keeps current (config or DNS), skipping
//!    endpoints whose breaker is open, failing fast when all are.
//! 5. Per endpoint, [`CircuitBreakerLayer`] (failsafe's state machine and
//!    policies), then [`AttemptTimeoutLayer`] so slow calls count as
//!    failures, then the HTTP/2 connection.
//!
//! `mesh-client` assembles them; each layer also works on its own.
//!
//! # Layout
//! - `trace`, `deadline`, `retry`, `breaker`, `timeout`, `balance`, `discover`:
//!   one layer (or helper) each.
//! - `backoff`: the one exponential backoff (retries, breaker open times,
//!   services' own redelivery loops).
//! - `status`: where a gRPC status comes from (headers, trailers, errors).
//! - `error`: the stack's own errors and their mapping to `tonic::Status`.
//! - `metrics`: the Prometheus families, registered once per registry.

mod backoff;
mod balance;
mod breaker;
mod deadline;
mod discover;
mod error;
mod metrics;
mod retry;
mod status;
mod timeout;
mod trace;

pub use backoff::{Backoff, BackoffIter};
pub use balance::{Balance, BalanceConfig, EndpointAddr, EndpointStatus};
pub use breaker::{
    Breaker, BreakerConfig, BreakerState, CircuitBreaker, CircuitBreakerLayer, Permit, Verdict,
};
pub use deadline::{
    Deadline, DeadlineConfig, DeadlineLayer, EnforceDeadline, NoDefaultTimeout, effective_deadline,
};
pub use discover::{Authority, Resolve, SystemResolver, Target, discover};
pub use error::{BoxError, Error, into_status};
pub use metrics::ClientMetrics;
pub use retry::{Attempts, Idempotency, PUSHBACK, Retry, RetryConfig, RetryLayer, RetryPolicy, RetryReason};
pub use status::{Outcome, StatusBody, Watch};
pub use timeout::{AttemptTimeout, AttemptTimeoutLayer};
pub use trace::{Record, Trace, TraceFuture, TraceLayer};

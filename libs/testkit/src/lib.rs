//! Test helpers every mesh crate shares.
//!
//! - [`infra`]: the local PostgreSQL pair and Redis Cluster (started by
//!   `deploy/local/infra.sh` when not running), and private copies of them
//!   for tests that stop or kill infrastructure.
//! - [`isolate`]: a fresh database schema or Redis key prefix per test.
//! - [`json`]: JSON to `google.protobuf.Struct` (documents for the data service).
//! - [`spawn`]: run a service (or any server) on `127.0.0.1:0` and stop it
//!   gracefully or abruptly; run a service binary as a child process.
//! - [`bin`]: the service binaries, for tests that run services as processes.
//! - [`grpc`]: channels, health checks, metrics scraping, grpcurl.
//! - [`latency`]: a TCP proxy that delays every byte (a slow datastore).
//! - [`raw`]: gRPC calls with hand-written request bytes and headers (bad-input tests).
//! - [`otlp`]: an in-process OTLP trace receiver collecting exported spans.
//! - [`conformance`]: what every mesh service must do (health, reflection, SIGTERM).
//! - [`echo`]: a plain tonic echo service (benchmark baseline, runtime tests).
//! - [`tls`]: a throwaway CA and leaf certificates (rcgen) for mutual TLS.
//! - [`help`]: what every binary's command line must do (`--help`, unknown arguments, docs).

pub mod bin;
pub mod conformance;
pub mod echo;
pub mod grpc;
pub mod help;
pub mod infra;
pub mod isolate;
pub mod json;
pub mod latency;
pub mod logs;
pub mod otlp;
pub mod raw;
pub mod spawn;
pub mod tls;

pub use grpc::{channel, grpcurl, health_status, scrape_metrics, wait_for_health};
pub use infra::{Infra, PrivateInfra, repo_root};
pub use isolate::{TestDb, redis_prefix};
pub use latency::LatencyProxy;
pub use logs::LogBuffer;
pub use spawn::{Process, Running, free_addr, rss_kib, spawn};

/// Polls `check` until it returns `Some`, for at most `timeout`, and
/// returns that value; panics naming `what` when time runs out. The way a
/// test waits for a condition (never a fixed sleep).
pub async fn eventually<T, F, Fut>(timeout: std::time::Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = std::time::Instant::now();
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(start.elapsed() < timeout, "{what}: not within {timeout:?}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// Quiet test telemetry (logs only with `TEST_LOG` set); call once per test.
pub fn init_telemetry() -> mesh_runtime::Telemetry {
    mesh_runtime::telemetry::init_for_tests("mesh-test", None)
}

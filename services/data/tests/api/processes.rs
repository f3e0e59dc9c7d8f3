//! Service binaries (this crate's and the rest of the mesh's) run as real
//! processes, each exporting its spans to an OTLP endpoint.

use std::{net::SocketAddr, time::Duration};

use mesh_testkit::{LogBuffer, Process, bin::service_binary, free_addr};

/// A service binary running as a process, serving on `addr`.
pub(crate) struct Service {
    process: Process,
    pub(crate) addr: SocketAddr,
    metrics_addr: SocketAddr,
    /// Its plaintext health-only listener, when `env` turned TLS on.
    pub(crate) health_addr: Option<SocketAddr>,
}

/// Starts `binary` with `env` (plus its listen and metrics addresses and
/// spans exported to `otlp`) and waits until it serves `served`. With
/// `logs`, it logs everything (dependencies included: sqlx, fred, tonic,
/// h2) at debug level as JSON, and its output goes there. When `env` sets
/// `MESH_TLS_CERT_FILE`, it also gets a plaintext health listener
/// (`MESH_HEALTH_LISTEN_ADDR`), and that is where readiness is awaited.
pub(crate) async fn start(
    binary: &str,
    served: &str,
    mut env: Vec<(String, String)>,
    otlp: &str,
    logs: Option<&LogBuffer>,
) -> Service {
    let (addr, metrics_addr) = (free_addr(), free_addr());
    env.extend([
        ("MESH_LISTEN_ADDR".into(), addr.to_string()),
        ("MESH_METRICS_ADDR".into(), metrics_addr.to_string()),
        ("OTEL_EXPORTER_OTLP_ENDPOINT".into(), otlp.to_owned()),
        ("OTEL_BSP_SCHEDULE_DELAY".into(), "100".into()),
        ("MESH_DATABASE_MIN_CONNECTIONS".into(), "0".into()),
    ]);
    let health_addr = env.iter().any(|(k, _)| k == "MESH_TLS_CERT_FILE").then(free_addr);
    if let Some(h) = health_addr {
        env.push(("MESH_HEALTH_LISTEN_ADDR".into(), h.to_string()));
    }
    if logs.is_some() {
        env.extend([("MESH_LOG_FORMAT".into(), "json".into()), ("RUST_LOG".into(), "debug".into())]);
    }
    let path = if binary == "mesh-data" {
        env!("CARGO_BIN_EXE_mesh-data").into()
    } else {
        service_binary(binary).unwrap()
    };
    let process = match logs {
        Some(logs) => Process::start_captured(path.to_str().unwrap(), &env, logs),
        None => Process::start(path.to_str().unwrap(), &env),
    }
    .unwrap();
    let probed = health_addr.unwrap_or(addr);
    mesh_testkit::conformance::assert_serving(probed, &[served], Duration::from_secs(30)).await.unwrap();
    Service { process, addr, metrics_addr, health_addr }
}

impl Service {
    /// What its metrics endpoint shows now.
    pub(crate) async fn metrics(&self) -> String {
        mesh_testkit::scrape_metrics(self.metrics_addr).await.unwrap()
    }

    /// SIGTERM: the service drains and flushes its spans.
    pub(crate) async fn stop(mut self) {
        self.process.terminate().unwrap();
        self.process.wait(Duration::from_secs(20)).await.unwrap();
    }
}

/// The Redis Cluster settings of a service under test (shared infrastructure,
/// a key prefix of its own).
pub(crate) fn redis_env(infra: &mesh_testkit::Infra) -> Vec<(String, String)> {
    vec![
        ("MESH_REDIS_URLS".to_owned(), infra.redis_urls().join(",")),
        ("MESH_REDIS_KEY_PREFIX".to_owned(), mesh_testkit::redis_prefix()),
    ]
}

/// `mesh-ratelimit` with [`crate::helpers::OPEN_RULES`] as domain `data`;
/// the rules directory lives as long as the returned guard.
pub(crate) async fn start_ratelimit(
    infra: &mesh_testkit::Infra,
    otlp: &str,
    logs: Option<&LogBuffer>,
) -> (Service, tempfile::TempDir) {
    let rules = tempfile::tempdir().unwrap();
    std::fs::write(rules.path().join("data.yaml"), crate::helpers::OPEN_RULES).unwrap();
    let mut env = redis_env(infra);
    env.push(("MESH_RATELIMIT_RULES".into(), rules.path().display().to_string()));
    (start("mesh-ratelimit", "mesh.ratelimit.v1.RateLimitService", env, otlp, logs).await, rules)
}

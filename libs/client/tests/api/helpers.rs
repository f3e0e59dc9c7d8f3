use std::{net::SocketAddr, path::PathBuf, time::Duration};

use mesh_client::{Channel, ClientMetrics, StackConfig};
use mesh_testkit::{
    Process,
    echo::{EchoRequest, EchoServiceClient},
    free_addr,
    grpc::metric_value,
    scrape_metrics, wait_for_health,
};
use prometheus_client::registry::Registry;
use tonic_health::pb::health_check_response::ServingStatus;

pub(crate) const ECHO: &str = "/mesh.testkit.echo.v1.EchoService/Echo";

/// The `echo_relay` example: `cargo test` builds examples along with the
/// tests, into `target/<profile>/examples`, next to `deps/` holding this binary.
pub(crate) fn relay_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let profile_dir = exe.parent().and_then(|deps| deps.parent()).expect("target/<profile>/deps/<test>");
    let path = profile_dir.join("examples").join(format!("echo_relay{}", std::env::consts::EXE_SUFFIX));
    assert!(
        path.exists(),
        "{} is missing; `cargo build -p mesh-client --examples` builds it",
        path.display()
    );
    path
}

/// One `echo_relay` process.
pub(crate) struct Hop {
    pub(crate) addr: SocketAddr,
    pub(crate) metrics: SocketAddr,
    env: Vec<(String, String)>,
    process: Option<Process>,
}

impl Hop {
    /// Starts a hop named `name` on `addr` and waits until it is ready.
    pub(crate) async fn start(name: &str, addr: SocketAddr, env: &[(&str, String)]) -> Self {
        let metrics = free_addr();
        let mut all = vec![
            ("MESH_LISTEN_ADDR".to_owned(), addr.to_string()),
            ("MESH_METRICS_ADDR".to_owned(), metrics.to_string()),
            ("MESH_ECHO_NAME".to_owned(), name.to_owned()),
            ("MESH_HEALTH_INTERVAL_MS".to_owned(), "100".to_owned()),
        ];
        all.extend(env.iter().map(|(k, v)| ((*k).to_owned(), v.clone())));
        let mut hop = Self { addr, metrics, env: all, process: None };
        hop.restart().await;
        hop
    }

    /// (Re)starts the process on the same addresses and waits until it is ready.
    pub(crate) async fn restart(&mut self) {
        let binary = relay_binary();
        let process = Process::start(binary.to_str().expect("utf-8 path"), &self.env).expect("starts");
        self.process = Some(process);
        let ch = mesh_testkit::channel(self.addr).await;
        wait_for_health(&ch, "readiness", ServingStatus::Serving, Duration::from_secs(20)).await.unwrap();
    }

    /// SIGKILL, as a crash or an OOM kill would; returns once it is gone.
    pub(crate) async fn kill(&mut self) {
        let mut p = self.process.take().expect("running");
        p.kill().unwrap();
        p.wait(Duration::from_secs(10)).await.unwrap();
    }

    /// SIGTERM; returns once it has drained and exited (spans flushed).
    pub(crate) async fn stop(&mut self) {
        let mut p = self.process.take().expect("running");
        p.terminate().unwrap();
        let status = p.wait(Duration::from_secs(20)).await.unwrap();
        assert!(status.success(), "{status}");
    }

    /// A sample of this hop's metrics (0 when absent).
    pub(crate) async fn metric(&self, name: &str, labels: &[&str]) -> f64 {
        let text = scrape_metrics(self.metrics).await.unwrap();
        metric_value(&text, name, labels).unwrap_or(0.0)
    }

    /// Echo calls this hop answered OK.
    pub(crate) async fn served(&self) -> f64 {
        self.metric("grpc_server_handled_total", &[r#"grpc_method="Echo""#, r#"grpc_code="OK""#]).await
    }
}

/// A channel to `hops` through the whole stack, Echo marked idempotent.
pub(crate) fn echo_channel(hops: &[SocketAddr], config: StackConfig, metrics: &ClientMetrics) -> Channel {
    let target = hops.iter().map(ToString::to_string).collect::<Vec<_>>().join(",");
    Channel::builder("echo", target.parse().unwrap())
        .config(config)
        .metrics(metrics)
        .idempotent([ECHO])
        .build()
}

/// One Echo call.
pub(crate) async fn echo(
    client: &EchoServiceClient<Channel>,
    req: impl tonic::IntoRequest<EchoRequest>,
) -> Result<String, tonic::Status> {
    let resp = client.clone().echo(req).await?;
    Ok(String::from_utf8(resp.into_inner().payload).expect("utf-8 payload"))
}

/// Client metrics with a registry to read them from.
pub(crate) fn registered_metrics() -> (Registry, ClientMetrics) {
    let mut registry = Registry::default();
    let metrics = ClientMetrics::register(&mut registry);
    (registry, metrics)
}

/// A sample from a registry (0 when absent).
pub(crate) fn sample(registry: &Registry, name: &str, labels: &[&str]) -> f64 {
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, registry).unwrap();
    metric_value(&text, name, labels).unwrap_or(0.0)
}

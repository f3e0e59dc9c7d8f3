//! Prometheus metrics: one registry per server, served on its own port at
//! `/metrics`, plus the per-RPC server metrics every service records.

use std::{net::SocketAddr, sync::Arc};

use axum::{Router, extract::State, http::header, response::IntoResponse, routing::get};
use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};
use tokio::net::TcpListener;

/// Latency buckets in seconds: 50 µs … ~6.5 s.
pub fn latency_buckets() -> impl Iterator<Item = f64> {
    exponential_buckets(0.000_05, 2.0, 18)
}

/// Builds a histogram family with [`latency_buckets`].
pub fn latency_histogram<L>() -> Family<L, Histogram>
where
    L: Clone + std::hash::Hash + Eq,
{
    Family::new_with_constructor(|| Histogram::new(latency_buckets()))
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct MethodLabels {
    pub(crate) grpc_service: Arc<str>,
    pub(crate) grpc_method: Arc<str>,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct CodeLabels {
    pub(crate) grpc_service: Arc<str>,
    pub(crate) grpc_method: Arc<str>,
    pub(crate) grpc_code: &'static str,
}

/// Per-RPC server metrics, named as in go-grpc-prometheus so existing
/// dashboards work: `grpc_server_started_total`, `grpc_server_handled_total`
/// (with `grpc_code`), `grpc_server_handling_seconds`.
#[derive(Debug, Clone)]
pub(crate) struct ServerMetrics {
    pub(crate) started: Family<MethodLabels, Counter>,
    pub(crate) handled: Family<CodeLabels, Counter>,
    pub(crate) seconds: Family<MethodLabels, Histogram, fn() -> Histogram>,
}

impl ServerMetrics {
    pub(crate) fn register(registry: &mut Registry) -> Self {
        let m = Self {
            started: Family::default(),
            handled: Family::default(),
            seconds: Family::new_with_constructor(|| Histogram::new(latency_buckets())),
        };
        registry.register("grpc_server_started", "RPCs started on the server", m.started.clone());
        registry.register(
            "grpc_server_handled",
            "RPCs completed on the server, by status code",
            m.handled.clone(),
        );
        registry.register(
            "grpc_server_handling_seconds",
            "Time from request headers to the end of the response",
            m.seconds.clone(),
        );
        m
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct DependencyLabels {
    pub(crate) dependency: String,
}

/// Readiness gauges: `mesh_dependency_up{dependency}` and `mesh_ready`.
#[derive(Debug, Clone, Default)]
pub(crate) struct HealthMetrics {
    pub(crate) dependency_up: Family<DependencyLabels, Gauge>,
    pub(crate) ready: Gauge,
}

impl HealthMetrics {
    pub(crate) fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "mesh_dependency_up",
            "1 when the last check of a dependency succeeded",
            m.dependency_up.clone(),
        );
        registry.register("mesh_ready", "1 when readiness is SERVING", m.ready.clone());
        m
    }
}

/// Serves `/metrics` from `registry` on `listener` until `shutdown` resolves.
pub(crate) async fn serve_metrics(
    listener: TcpListener,
    registry: Arc<Registry>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = Router::new().route("/metrics", get(metrics_handler)).with_state(registry);
    axum::serve(listener, app).with_graceful_shutdown(shutdown).await
}

async fn metrics_handler(State(registry): State<Arc<Registry>>) -> impl IntoResponse {
    let mut body = String::with_capacity(16 * 1024);
    if let Err(e) = encode(&mut body, &registry) {
        tracing::error!(error = %e, "cannot encode metrics");
    }
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], body)
}

/// The address a metrics listener is bound to (for logs and tests).
pub(crate) fn bound(listener: &TcpListener) -> SocketAddr {
    listener.local_addr().expect("bound listener has an address")
}

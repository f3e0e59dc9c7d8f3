//! Prometheus metrics of the client stack. One [`ClientMetrics`] per
//! registry, shared by every client of a process: each family may be
//! registered once, and the labels say which service a sample is about.

use std::sync::Arc;

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct MethodLabels {
    pub(crate) grpc_service: Arc<str>,
    pub(crate) grpc_method: Arc<str>,
}

impl MethodLabels {
    /// Labels of `/package.Service/Method` (anything else is `unknown`).
    pub(crate) fn from_path(path: &str) -> Self {
        match path.strip_prefix('/').and_then(|p| p.split_once('/')) {
            Some((s, m)) if !s.is_empty() && !m.is_empty() && !m.contains('/') => {
                Self { grpc_service: s.into(), grpc_method: m.into() }
            }
            _ => Self { grpc_service: "unknown".into(), grpc_method: "unknown".into() },
        }
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct CodeLabels {
    pub(crate) grpc_service: Arc<str>,
    pub(crate) grpc_method: Arc<str>,
    pub(crate) grpc_code: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct RetryLabels {
    pub(crate) grpc_service: Arc<str>,
    pub(crate) grpc_method: Arc<str>,
    pub(crate) reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct UpstreamLabels {
    pub(crate) upstream: Arc<str>,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct EndpointLabels {
    pub(crate) upstream: Arc<str>,
    pub(crate) endpoint: Arc<str>,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct TransitionLabels {
    pub(crate) upstream: Arc<str>,
    pub(crate) endpoint: Arc<str>,
    pub(crate) state: &'static str,
}

type Histograms = Family<MethodLabels, Histogram, fn() -> Histogram>;

/// The client-side metrics:
///
/// - `grpc_client_started_total`, `grpc_client_handled_total{grpc_code}` and
///   `grpc_client_handling_seconds`, by `grpc_service`/`grpc_method`, named as
///   in go-grpc-prometheus like the server-side ones;
/// - `mesh_client_retries_total{reason}` and `mesh_client_retries_throttled_total`
///   (the retry budget said no);
/// - `mesh_client_deadline_exhausted_total`: calls failed fast because the
///   caller's deadline was already spent;
/// - `mesh_client_circuit_state{upstream,endpoint}` (0 closed, 1 half-open, 2 open),
///   `mesh_client_circuit_transitions_total{upstream,endpoint,state}`,
///   `mesh_client_circuit_rejected_total{upstream}` (calls failed fast because
///   every endpoint's breaker was open) and `mesh_client_endpoints{upstream}`.
///
/// `upstream` is the name a client was built for (e.g. `ratelimit`).
///
/// Without a registry, [`ClientMetrics::default`] records into families
/// nobody exports.
#[derive(Debug, Clone)]
pub struct ClientMetrics {
    pub(crate) started: Family<MethodLabels, Counter>,
    pub(crate) handled: Family<CodeLabels, Counter>,
    pub(crate) seconds: Histograms,
    pub(crate) retries: Family<RetryLabels, Counter>,
    pub(crate) retries_throttled: Family<MethodLabels, Counter>,
    pub(crate) deadline_exhausted: Family<MethodLabels, Counter>,
    pub(crate) circuit_state: Family<EndpointLabels, Gauge>,
    pub(crate) circuit_transitions: Family<TransitionLabels, Counter>,
    pub(crate) circuit_rejected: Family<UpstreamLabels, Counter>,
    pub(crate) endpoints: Family<UpstreamLabels, Gauge>,
}

impl Default for ClientMetrics {
    fn default() -> Self {
        Self {
            started: Family::default(),
            handled: Family::default(),
            seconds: Family::new_with_constructor(|| Histogram::new(mesh_runtime::latency_buckets())),
            retries: Family::default(),
            retries_throttled: Family::default(),
            deadline_exhausted: Family::default(),
            circuit_state: Family::default(),
            circuit_transitions: Family::default(),
            circuit_rejected: Family::default(),
            endpoints: Family::default(),
        }
    }
}

impl ClientMetrics {
    /// Creates the metrics and registers them in `registry` (once per registry:
    /// share the returned handle between clients).
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register("grpc_client_started", "RPCs started by mesh clients", m.started.clone());
        registry.register(
            "grpc_client_handled",
            "RPCs completed by mesh clients, by status code",
            m.handled.clone(),
        );
        registry.register(
            "grpc_client_handling_seconds",
            "Time from sending a request to the end of its response, retries included",
            m.seconds.clone(),
        );
        registry.register("mesh_client_retries", "Attempts repeated by the retry layer", m.retries.clone());
        registry.register(
            "mesh_client_retries_throttled",
            "Retries not made because the retry budget was spent",
            m.retries_throttled.clone(),
        );
        registry.register(
            "mesh_client_deadline_exhausted",
            "Calls failed without sending because the caller's deadline was spent",
            m.deadline_exhausted.clone(),
        );
        registry.register(
            "mesh_client_circuit_state",
            "Circuit breaker state per endpoint: 0 closed, 1 half-open, 2 open",
            m.circuit_state.clone(),
        );
        registry.register(
            "mesh_client_circuit_transitions",
            "Circuit breaker state changes per endpoint, by new state",
            m.circuit_transitions.clone(),
        );
        registry.register(
            "mesh_client_circuit_rejected",
            "Calls failed fast because every endpoint's circuit breaker was open",
            m.circuit_rejected.clone(),
        );
        registry.register("mesh_client_endpoints", "Endpoints known per upstream", m.endpoints.clone());
        m
    }
}

//! Prometheus metrics: one registry per server, served on its own port at
//! `/metrics`, plus the per-RPC server metrics every service records, the
//! process metrics (`process_*`, as the Prometheus Go client names them) and
//! `mesh_build_info`.
//!
//! `/metrics` answers OpenMetrics 1.0 unless the scraper's `Accept` header
//! prefers the classic text format (`text/plain; version=0.0.4`), as the Go
//! client negotiates. `prometheus-client` only writes OpenMetrics, so the
//! classic rendering is [`openmetrics_to_classic`] over that text: the two
//! formats carry the same samples and differ in how families are named
//! (a classic counter family is named after its `_total` sample).

use std::{fmt::Write as _, net::SocketAddr, sync::Arc};

use axum::{
    Router,
    extract::State,
    http::{HeaderMap, header},
    response::IntoResponse,
    routing::get,
};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric as _, text::encode},
    metrics::{
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::{ConstGauge, Gauge},
        histogram::{Histogram, exponential_buckets},
        info::Info,
    },
    registry::{Registry, Unit},
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
    /// `unary`, `client_stream`, `server_stream`, `bidi_stream` (as
    /// go-grpc-prometheus), `unknown` for paths the server does not serve.
    pub(crate) grpc_type: &'static str,
    pub(crate) grpc_service: Arc<str>,
    pub(crate) grpc_method: Arc<str>,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct CodeLabels {
    pub(crate) grpc_type: &'static str,
    pub(crate) grpc_service: Arc<str>,
    pub(crate) grpc_method: Arc<str>,
    pub(crate) grpc_code: &'static str,
}

/// The `grpc_type` of a method from its streaming flags.
pub(crate) fn grpc_type(client_streaming: bool, server_streaming: bool) -> &'static str {
    match (client_streaming, server_streaming) {
        (false, false) => "unary",
        (true, false) => "client_stream",
        (false, true) => "server_stream",
        (true, true) => "bidi_stream",
    }
}

/// Per-RPC server metrics, named and labelled (`grpc_type`, `grpc_service`,
/// `grpc_method`) as in go-grpc-prometheus so existing dashboards work:
/// `grpc_server_started_total`, `grpc_server_handled_total` (with
/// `grpc_code`), `grpc_server_handling_seconds`.
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

    /// Puts every served method at 0 in `grpc_server_started_total` and in
    /// `grpc_server_handled_total{grpc_code="OK"}`, so rates and ratios read 0
    /// instead of "no data" before the first call (go-grpc-prometheus'
    /// `InitializeMetrics`).
    pub(crate) fn initialize(&self, method: &MethodLabels) {
        let _ = self.started.get_or_create(method);
        let _ = self.handled.get_or_create(&CodeLabels {
            grpc_type: method.grpc_type,
            grpc_service: method.grpc_service.clone(),
            grpc_method: method.grpc_method.clone(),
            grpc_code: "OK",
        });
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

/// A server's registry, holding from the start the process metrics
/// ([`ProcessCollector`]) and `mesh_build_info{version} 1`.
pub(crate) fn registry() -> Registry {
    let mut r = Registry::default();
    r.register_collector(Box::new(ProcessCollector));
    r.register(
        "mesh_build",
        "Build of the running binary: its version (the workspace version) as a label, value 1",
        Info::new(vec![("version".to_owned(), env!("CARGO_PKG_VERSION").to_owned())]),
    );
    r
}

/// The process metrics of the Prometheus Go client, read at each scrape
/// (on Linux from `/proc/self` through `metrics-process`): `process_cpu_seconds_total`,
/// `process_resident_memory_bytes`, `process_virtual_memory_bytes`,
/// `process_open_fds`, `process_max_fds`, `process_start_time_seconds`,
/// `process_threads`. A value the platform does not give is left out.
#[derive(Debug)]
pub(crate) struct ProcessCollector;

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let m = metrics_process::collector::collect();
        if let Some(v) = m.cpu_seconds_total {
            let c = ConstCounter::new(v);
            c.encode(encoder.encode_descriptor(
                "process_cpu",
                "Total user and system CPU time spent in seconds",
                Some(&Unit::Seconds),
                c.metric_type(),
            )?)?;
        }
        let gauges: [(&str, &str, Option<Unit>, Option<u64>); 6] = [
            (
                "process_resident_memory",
                "Resident memory size in bytes",
                Some(Unit::Bytes),
                m.resident_memory_bytes,
            ),
            (
                "process_virtual_memory",
                "Virtual memory size in bytes",
                Some(Unit::Bytes),
                m.virtual_memory_bytes,
            ),
            ("process_open_fds", "Number of open file descriptors", None, m.open_fds),
            ("process_max_fds", "Maximum number of open file descriptors (0: unlimited)", None, m.max_fds),
            (
                "process_start_time",
                "Start time of the process since the Unix epoch in seconds",
                Some(Unit::Seconds),
                m.start_time_seconds,
            ),
            ("process_threads", "Number of OS threads in the process", None, m.threads),
        ];
        for (name, help, unit, value) in gauges {
            let Some(v) = value else { continue };
            let g = ConstGauge::new(i64::try_from(v).unwrap_or(i64::MAX));
            g.encode(encoder.encode_descriptor(name, help, unit.as_ref(), g.metric_type())?)?;
        }
        Ok(())
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

/// Content type of the OpenMetrics rendering (the default).
pub(crate) const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Content type of the classic Prometheus text rendering.
pub(crate) const CLASSIC_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

async fn metrics_handler(State(registry): State<Arc<Registry>>, headers: HeaderMap) -> impl IntoResponse {
    let mut body = String::with_capacity(16 * 1024);
    if let Err(e) = encode(&mut body, &registry) {
        tracing::error!(error = %e, "cannot encode metrics");
    }
    let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()).unwrap_or("");
    if prefers_classic(accept) {
        ([(header::CONTENT_TYPE, CLASSIC_CONTENT_TYPE)], openmetrics_to_classic(&body))
    } else {
        ([(header::CONTENT_TYPE, OPENMETRICS_CONTENT_TYPE)], body)
    }
}

/// Whether an `Accept` header prefers the classic text format
/// (`text/plain`, version absent or `0.0.4`) over OpenMetrics
/// (`application/openmetrics-text`, or `*/*`): by `q` value, OpenMetrics on a
/// tie, OpenMetrics when neither is named.
pub(crate) fn prefers_classic(accept: &str) -> bool {
    let (mut openmetrics, mut classic) = (0.0_f64, 0.0_f64);
    for range in accept.split(',') {
        let mut parts = range.split(';').map(str::trim);
        let media = parts.next().unwrap_or("").to_ascii_lowercase();
        let (mut q, mut version) = (1.0_f64, None);
        for p in parts {
            let Some((k, v)) = p.split_once('=') else { continue };
            match k.trim().to_ascii_lowercase().as_str() {
                "q" => q = v.trim().parse().unwrap_or(0.0),
                "version" => version = Some(v.trim().trim_matches('"').to_owned()),
                _ => {}
            }
        }
        match media.as_str() {
            "application/openmetrics-text" | "*/*" => openmetrics = openmetrics.max(q),
            "text/plain" if version.as_deref().is_none_or(|v| v == "0.0.4") => classic = classic.max(q),
            _ => {}
        }
    }
    classic > 0.0 && classic > openmetrics
}

/// Rewrites an OpenMetrics text exposition (as `prometheus-client` writes
/// it) into the classic Prometheus text format 0.0.4: a counter family is
/// named after its `_total` samples, an info family becomes a gauge named
/// `<name>_info`, a stateset a gauge, unknown and gaugehistogram families
/// `untyped`; `# UNIT` and `# EOF` lines, `_created` samples and exemplars
/// are dropped; sample timestamps go from seconds to milliseconds.
pub(crate) fn openmetrics_to_classic(openmetrics: &str) -> String {
    let mut out = String::with_capacity(openmetrics.len());
    // The family being written: its OpenMetrics name and type.
    let mut family = (String::new(), String::new());
    let mut help: Option<String> = None;
    for line in openmetrics.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (_, text) = rest.split_once(' ').unwrap_or((rest, ""));
            // OpenMetrics escapes `"` in HELP; the classic format does not.
            help = Some(text.replace("\\\"", "\""));
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, "unknown"));
            family = (name.to_owned(), kind.to_owned());
            let (classic_name, classic_kind) = match kind {
                "counter" => (format!("{name}_total"), "counter"),
                "info" => (format!("{name}_info"), "gauge"),
                "stateset" => (name.to_owned(), "gauge"),
                "gauge" | "histogram" | "summary" => (name.to_owned(), kind),
                _ => (name.to_owned(), "untyped"),
            };
            if let Some(help) = help.take() {
                let _ = writeln!(out, "# HELP {classic_name} {help}");
            }
            let _ = writeln!(out, "# TYPE {classic_name} {classic_kind}");
        } else if line.starts_with('#') || line.is_empty() {
            // `# UNIT`, `# EOF`, or a comment.
        } else {
            let (name, labels, rest) = split_sample(line);
            let created = name.strip_suffix("_created").is_some_and(|base| {
                base == family.0 && matches!(family.1.as_str(), "counter" | "histogram" | "summary")
            });
            if created {
                continue;
            }
            // Drop an exemplar (` # {...} value [timestamp]`).
            let rest = rest.split(" # ").next().unwrap_or("").trim();
            let mut fields = rest.split_whitespace();
            let value = fields.next().unwrap_or("");
            out.push_str(name);
            out.push_str(labels);
            out.push(' ');
            out.push_str(value);
            if let Some(ts) = fields.next().and_then(|t| t.parse::<f64>().ok()) {
                let _ = write!(out, " {}", (ts * 1000.0).round() as i64);
            }
            out.push('\n');
        }
    }
    out
}

/// Splits a sample line into its name, its label set (`{...}` or empty) and
/// the rest, reading quoted label values (with escapes) as opaque.
fn split_sample(line: &str) -> (&str, &str, &str) {
    let name_end = line.find(['{', ' ']).unwrap_or(line.len());
    let (name, after) = line.split_at(name_end);
    if !after.starts_with('{') {
        return (name, "", after);
    }
    let (mut quoted, mut escaped) = (false, false);
    for (i, c) in after.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            '}' if !quoted => return (name, &after[..=i], &after[i + 1..]),
            _ => {}
        }
    }
    (name, after, "")
}

/// The address a metrics listener is bound to (for logs and tests).
pub(crate) fn bound(listener: &TcpListener) -> SocketAddr {
    listener.local_addr().expect("bound listener has an address")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn negotiation_follows_the_go_client_and_defaults_to_openmetrics() {
        // What Prometheus sends: OpenMetrics preferred.
        let prometheus = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        assert!(!prefers_classic(prometheus));
        assert!(prefers_classic("text/plain; version=0.0.4"));
        assert!(prefers_classic("text/plain"));
        assert!(prefers_classic("text/plain;version=0.0.4;q=0.9,*/*;q=0.1"));
        assert!(!prefers_classic(""));
        assert!(!prefers_classic("*/*"));
        assert!(!prefers_classic("application/json"));
        assert!(!prefers_classic("text/plain; version=0.0.4, application/openmetrics-text"));
        assert!(!prefers_classic("text/plain; version=1.0.0"));
        assert!(!prefers_classic("text/plain;q=0"));
    }

    #[test]
    fn classic_rendering_names_counter_families_after_their_samples() {
        let mut r = Registry::default();
        let c: Family<Vec<(String, String)>, Counter> = Family::default();
        c.get_or_create(&vec![("path".to_owned(), "a \"b\" } # {c".to_owned())]).inc();
        r.register("hits", "Hits \"seen\"", c);
        let h = Histogram::new([0.5]);
        h.observe(0.1);
        r.register_with_unit("wait", "Waits", Unit::Seconds, h);
        r.register("build", "Build", Info::new(vec![("version".to_owned(), "1".to_owned())]));
        let g: Gauge = Gauge::default();
        r.register("depth", "Depth", g);
        let mut om = String::new();
        encode(&mut om, &r).unwrap();
        let classic = openmetrics_to_classic(&om);
        let expected = concat!(
            "# HELP hits_total Hits \"seen\".\n",
            "# TYPE hits_total counter\n",
            "hits_total{path=\"a \\\"b\\\" } # {c\"} 1\n",
            "# HELP wait_seconds Waits.\n",
            "# TYPE wait_seconds histogram\n",
            "wait_seconds_sum 0.1\n",
            "wait_seconds_count 1\n",
            "wait_seconds_bucket{le=\"0.5\"} 1\n",
            "wait_seconds_bucket{le=\"+Inf\"} 1\n",
            "# HELP build_info Build.\n",
            "# TYPE build_info gauge\n",
            "build_info{version=\"1\"} 1\n",
            "# HELP depth Depth.\n",
            "# TYPE depth gauge\n",
            "depth 0\n",
        );
        assert_eq!(classic, expected, "from:\n{om}");
    }

    #[test]
    fn classic_rendering_drops_created_samples_exemplars_and_scales_timestamps() {
        let om = "# HELP a A\n# TYPE a counter\na_total 3 # {trace_id=\"x\"} 1 1.5\na_created 17.5\n# HELP b B\n# TYPE b gauge\nb 2 1.25\n# EOF\n";
        assert_eq!(
            openmetrics_to_classic(om),
            "# HELP a_total A\n# TYPE a_total counter\na_total 3\n# HELP b B\n# TYPE b gauge\nb 2 1250\n"
        );
    }

    #[test]
    fn process_metrics_and_build_info_are_there_from_the_start() {
        let r = registry();
        let mut om = String::new();
        encode(&mut om, &r).unwrap();
        for name in [
            "process_cpu_seconds_total ",
            "process_resident_memory_bytes ",
            "process_open_fds ",
            "process_start_time_seconds ",
            "mesh_build_info{version=\"",
        ] {
            assert!(om.lines().any(|l| l.starts_with(name)), "{name} missing from:\n{om}");
        }
    }
}

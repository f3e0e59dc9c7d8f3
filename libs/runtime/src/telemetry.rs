//! The one telemetry entry point: `tracing` logs to stdout and spans
//! exported as the OpenTelemetry SDK environment variables say
//! (`OTEL_TRACES_EXPORTER`, `OTEL_EXPORTER_OTLP_ENDPOINT`,
//! `OTEL_TRACES_SAMPLER`, `OTEL_TRACES_SAMPLER_ARG`, `OTEL_SDK_DISABLED`).
//!
//! W3C trace context is always propagated (even without an exporter), so a
//! service in the middle of a call chain never breaks the trace.
//!
//! The SDK (`opentelemetry_sdk`) reads the sampler variables itself, but an
//! unknown or malformed value only becomes a warning and a silent fallback
//! to `parentbased_always_on`; it never reads `OTEL_TRACES_EXPORTER`. Here
//! all of them are read through a [`Lookup`] (tests pass a map) and a bad
//! value is a startup error, so a typo cannot turn sampling on or off
//! unnoticed.
//!
//! Logs: text (default) or JSON lines (`MESH_LOG_FORMAT=json`). In both an
//! optional field shows its value (`3`, not `Some(3)`) and an absent one is
//! left out; in JSON, a field whose `Debug` form is JSON (a list of strings
//! or numbers) stays a JSON array, and each line carries the `trace_id` and
//! `span_id` of the current span.

use std::{
    fmt::{self, Write as _},
    io::Write as _,
    sync::{Arc, OnceLock},
    time::Duration,
};

use opentelemetry::{
    global,
    trace::{SpanKind, TraceContextExt as _, TracerProvider as _},
};
use opentelemetry_sdk::{
    Resource,
    error::OTelSdkResult,
    propagation::TraceContextPropagator,
    trace::{
        Sampler, SamplingDecision, SamplingResult, SdkTracerProvider, ShouldSample, SpanData, SpanExporter,
    },
};
use serde_json::{Map, Value};
use tracing::{
    Dispatch, Event, Subscriber,
    dispatcher::WeakDispatch,
    field::{Field, Visit},
};
use tracing_subscriber::{
    EnvFilter, Layer,
    field::RecordFields,
    fmt::{
        FmtContext, FormattedFields,
        format::{FormatEvent, FormatFields, Writer},
        time::FormatTime as _,
    },
    layer::SubscriberExt,
    registry::LookupSpan,
    util::SubscriberInitExt,
};

use crate::config::{ConfigError, Lookup, LookupExt};

/// Keys read by [`TelemetryConfig::from_lookup`].
pub mod keys {
    /// OTLP/gRPC collector endpoint, e.g. `http://127.0.0.1:4317`. Unset (and
    /// `OTEL_TRACES_EXPORTER` unset): no export.
    pub const OTLP_ENDPOINT: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";
    /// Traces-only override of [`OTLP_ENDPOINT`].
    pub const OTLP_TRACES_ENDPOINT: &str = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT";
    /// `otlp` (default), `console` (finished spans printed to stdout) or `none`.
    pub const TRACES_EXPORTER: &str = "OTEL_TRACES_EXPORTER";
    /// `always_on`, `always_off`, `traceidratio`, `parentbased_always_on`
    /// (default), `parentbased_always_off` or `parentbased_traceidratio`.
    pub const TRACES_SAMPLER: &str = "OTEL_TRACES_SAMPLER";
    /// The ratio, 0.0 to 1.0, of the `*traceidratio` samplers (default 1.0).
    pub const TRACES_SAMPLER_ARG: &str = "OTEL_TRACES_SAMPLER_ARG";
    /// The `service.name` resource attribute.
    pub const SERVICE_NAME: &str = "OTEL_SERVICE_NAME";
    /// Log filter, `tracing_subscriber::EnvFilter` syntax.
    pub const RUST_LOG: &str = "RUST_LOG";
    /// `text` (default) or `json`.
    pub const LOG_FORMAT: &str = "MESH_LOG_FORMAT";
    /// `true` turns tracing off: no OpenTelemetry layer, so spans are
    /// neither recorded, exported nor propagated (the specification's
    /// switch for the whole SDK; any other value, or unset, is `false`).
    pub const SDK_DISABLED: &str = "OTEL_SDK_DISABLED";
}

/// The OTLP endpoint the OpenTelemetry specification defaults to, used when
/// `OTEL_TRACES_EXPORTER=otlp` is set explicitly without an endpoint.
pub const DEFAULT_OTLP_ENDPOINT: &str = "http://localhost:4317";

/// Where finished spans go (`OTEL_TRACES_EXPORTER`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TracesExporter {
    /// OTLP/gRPC to [`TelemetryConfig::otlp_endpoint`]; no endpoint, no export.
    #[default]
    Otlp,
    /// One line per finished span on stdout.
    Console,
    /// Nowhere (trace context is still propagated and logged).
    None,
}

/// Which traces are recorded (`OTEL_TRACES_SAMPLER`, `OTEL_TRACES_SAMPLER_ARG`).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum SamplerConfig {
    /// Every trace.
    AlwaysOn,
    /// No trace.
    AlwaysOff,
    /// A fraction (0.0–1.0) of traces, by trace id.
    TraceIdRatio(f64),
    /// The parent's decision; roots always.
    #[default]
    ParentBasedAlwaysOn,
    /// The parent's decision; roots never.
    ParentBasedAlwaysOff,
    /// The parent's decision; a fraction (0.0–1.0) of roots, by trace id.
    ParentBasedTraceIdRatio(f64),
}

impl SamplerConfig {
    fn parse(l: &impl Lookup) -> Result<Self, ConfigError> {
        let ratio = || -> Result<f64, ConfigError> {
            match l.string(keys::TRACES_SAMPLER_ARG) {
                None => Ok(1.0),
                Some(v) => match v.parse::<f64>() {
                    Ok(r) if (0.0..=1.0).contains(&r) => Ok(r),
                    _ => Err(ConfigError::new(
                        keys::TRACES_SAMPLER_ARG,
                        format!("expected a ratio from 0.0 to 1.0, got {v:?}"),
                    )),
                },
            }
        };
        Ok(match l.string(keys::TRACES_SAMPLER).as_deref() {
            None | Some("parentbased_always_on") => Self::ParentBasedAlwaysOn,
            Some("always_on") => Self::AlwaysOn,
            Some("always_off") => Self::AlwaysOff,
            Some("traceidratio") => Self::TraceIdRatio(ratio()?),
            Some("parentbased_always_off") => Self::ParentBasedAlwaysOff,
            Some("parentbased_traceidratio") => Self::ParentBasedTraceIdRatio(ratio()?),
            Some(other) => {
                return Err(ConfigError::new(
                    keys::TRACES_SAMPLER,
                    format!(
                        "expected always_on, always_off, traceidratio, parentbased_always_on, \
                         parentbased_always_off or parentbased_traceidratio, got {other:?}"
                    ),
                ));
            }
        })
    }

    fn sampler(self) -> Sampler {
        let parent = |root: Sampler| Sampler::ParentBased(Box::new(root));
        match self {
            Self::AlwaysOn => Sampler::AlwaysOn,
            Self::AlwaysOff => Sampler::AlwaysOff,
            Self::TraceIdRatio(r) => Sampler::TraceIdRatioBased(r),
            Self::ParentBasedAlwaysOn => parent(Sampler::AlwaysOn),
            Self::ParentBasedAlwaysOff => parent(Sampler::AlwaysOff),
            Self::ParentBasedTraceIdRatio(r) => parent(Sampler::TraceIdRatioBased(r)),
        }
    }
}

impl fmt::Display for SamplerConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::AlwaysOn => f.write_str("always_on"),
            Self::AlwaysOff => f.write_str("always_off"),
            Self::TraceIdRatio(r) => write!(f, "traceidratio {r}"),
            Self::ParentBasedAlwaysOn => f.write_str("parentbased_always_on"),
            Self::ParentBasedAlwaysOff => f.write_str("parentbased_always_off"),
            Self::ParentBasedTraceIdRatio(r) => write!(f, "parentbased_traceidratio {r}"),
        }
    }
}

/// How telemetry is set up.
#[derive(Debug, Clone)]
pub struct TelemetryConfig {
    /// The `service.name` resource attribute.
    pub service_name: String,
    /// Where [`TracesExporter::Otlp`] sends spans; `None` exports nothing.
    pub otlp_endpoint: Option<String>,
    /// Where finished spans go.
    pub exporter: TracesExporter,
    /// Which traces are recorded.
    pub sampler: SamplerConfig,
    /// Log filter directives.
    pub log_filter: String,
    /// Whether logs go to stdout at all (tests keep quiet unless `TEST_LOG` is set).
    pub log_to_stdout: bool,
    /// JSON logs instead of text.
    pub json_logs: bool,
    /// Which spans may start a trace ([`Roots`]).
    pub roots: Roots,
    /// `OTEL_SDK_DISABLED=true`: no OpenTelemetry layer at all (logs only).
    pub sdk_disabled: bool,
}

/// Which spans may start a trace (be sampled without a parent).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Roots {
    /// Any span: tests, command-line tools and examples, whose own spans
    /// are the calls a user makes.
    #[default]
    Any,
    /// Only a server span of a call some caller made (never one of
    /// `grpc.health.v1.Health`, which probes and peers call every few
    /// seconds, nor of server reflection, which grpcurl calls before every
    /// call it makes). Any
    /// other span without a parent is the service's own background work —
    /// health rounds, outbox sweeps, replica polls — and is dropped with
    /// everything under it, so a trace backend shows calls, not
    /// housekeeping. Set for every service by [`crate::run_service`].
    ServedCalls,
}

impl Default for TelemetryConfig {
    /// No export, `parentbased_always_on`, `info` text logs on stdout.
    fn default() -> Self {
        Self {
            service_name: "mesh".to_owned(),
            otlp_endpoint: None,
            exporter: TracesExporter::Otlp,
            sampler: SamplerConfig::default(),
            log_filter: "info".to_owned(),
            log_to_stdout: true,
            json_logs: false,
            roots: Roots::Any,
            sdk_disabled: false,
        }
    }
}

impl TelemetryConfig {
    /// Reads the standard `OTEL_*` and `RUST_LOG` variables, and `MESH_LOG_FORMAT`.
    ///
    /// # Errors
    /// An unknown `OTEL_TRACES_EXPORTER`, `OTEL_TRACES_SAMPLER` or
    /// `MESH_LOG_FORMAT`, or an `OTEL_TRACES_SAMPLER_ARG` that is not a ratio
    /// from 0.0 to 1.0 (for the ratio samplers).
    pub fn from_lookup(l: &impl Lookup, default_service_name: &str) -> Result<Self, ConfigError> {
        let json_logs = match l.string(keys::LOG_FORMAT).as_deref() {
            None | Some("text") => false,
            Some("json") => true,
            Some(other) => {
                return Err(ConfigError::new(
                    keys::LOG_FORMAT,
                    format!("expected text or json, got {other:?}"),
                ));
            }
        };
        let exporter_set = l.string(keys::TRACES_EXPORTER);
        let exporter = match exporter_set.as_deref() {
            None | Some("otlp") => TracesExporter::Otlp,
            Some("console") => TracesExporter::Console,
            Some("none") => TracesExporter::None,
            Some(other) => {
                return Err(ConfigError::new(
                    keys::TRACES_EXPORTER,
                    format!("expected otlp, console or none, got {other:?}"),
                ));
            }
        };
        let mut otlp_endpoint =
            l.string(keys::OTLP_TRACES_ENDPOINT).or_else(|| l.string(keys::OTLP_ENDPOINT));
        // Asked for by name: the specification's default endpoint. Not asked
        // for: no endpoint means no export (and no error).
        if otlp_endpoint.is_none() && exporter_set.is_some() && exporter == TracesExporter::Otlp {
            otlp_endpoint = Some(DEFAULT_OTLP_ENDPOINT.to_owned());
        }
        Ok(Self {
            service_name: l.string(keys::SERVICE_NAME).unwrap_or_else(|| default_service_name.to_owned()),
            otlp_endpoint,
            exporter,
            sampler: SamplerConfig::parse(l)?,
            log_filter: l
                .string(keys::RUST_LOG)
                .unwrap_or_else(|| "info,sqlx=warn,fred=warn,h2=warn".to_owned()),
            log_to_stdout: true,
            json_logs,
            roots: Roots::Any,
            // The specification: only `true` (any case) disables.
            sdk_disabled: l.string(keys::SDK_DISABLED).is_some_and(|v| v.eq_ignore_ascii_case("true")),
        })
    }

    /// Whether and where spans are exported, in words (logged at start), e.g.
    /// `otlp/grpc to http://127.0.0.1:4317, sampler parentbased_always_on`.
    pub fn describe_export(&self) -> String {
        let sampler = &self.sampler;
        if self.sdk_disabled {
            return format!("off ({}=true): not recorded, exported or propagated", keys::SDK_DISABLED);
        }
        match (self.exporter, &self.otlp_endpoint) {
            (TracesExporter::Otlp, Some(e)) => format!("otlp/grpc to {e}, sampler {sampler}"),
            (TracesExporter::Otlp, None) => {
                format!("not exported ({} is unset)", keys::OTLP_ENDPOINT)
            }
            (TracesExporter::Console, _) => format!("printed to stdout (console), sampler {sampler}"),
            (TracesExporter::None, _) => format!("not exported ({}=none)", keys::TRACES_EXPORTER),
        }
    }
}

/// Installed telemetry; call [`Telemetry::shutdown`] before exiting so
/// buffered spans are flushed.
#[derive(Debug)]
pub struct Telemetry {
    provider: SdkTracerProvider,
}

impl Telemetry {
    /// Installs the global subscriber, tracer provider and propagator, then
    /// logs (info, target `mesh_runtime::telemetry`) whether and where
    /// spans are exported. A second call in the same process (tests) leaves
    /// the first subscriber in place.
    pub fn init(config: &TelemetryConfig) -> Self {
        global::set_text_map_propagator(TraceContextPropagator::new());
        let provider = tracer_provider(config);
        global::set_tracer_provider(provider.clone());
        let tracer = provider.tracer("mesh");

        let filter = EnvFilter::try_new(&config.log_filter).unwrap_or_else(|_| EnvFilter::new("info"));
        let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
        let slot = DispatchSlot::default();
        let fmt = config.log_to_stdout.then(|| fmt_layer(config.json_logs, ansi, std::io::stdout, &slot));
        // Spans are created for every level the filter lets through; the otel
        // layer turns them into OpenTelemetry spans for propagation and export.
        // Off: source location, thread and busy/idle-time attributes. They are
        // not part of the RPC / database conventions, and the busy/idle times
        // cost two clock reads per poll of every instrumented future, on every
        // hop of every call.
        let dispatch = Dispatch::new(
            tracing_subscriber::registry()
                .with(fmt.with_filter(filter))
                .with((!config.sdk_disabled).then(|| otel_layer(tracer))),
        );
        let _ = slot.set(dispatch.downgrade());
        let installed = dispatch.try_init().is_ok();
        if installed {
            tracing::info!(service = %config.service_name, traces = %config.describe_export(), "telemetry ready");
        }
        Self { provider }
    }

    /// Flushes buffered spans and stops the exporter.
    pub async fn shutdown(self) {
        let provider = self.provider;
        // shutdown() blocks while the exporter drains; keep it off the async workers.
        let _ = tokio::task::spawn_blocking(move || {
            let _ = provider.force_flush();
            let _ = provider.shutdown();
        })
        .await;
    }

    /// Flushes buffered spans without stopping the exporter.
    pub async fn flush(&self) {
        let provider = self.provider.clone();
        let _ = tokio::task::spawn_blocking(move || provider.force_flush()).await;
    }
}

fn tracer_provider(config: &TelemetryConfig) -> SdkTracerProvider {
    let resource = Resource::builder().with_service_name(config.service_name.clone()).build();
    let builder = SdkTracerProvider::builder().with_resource(resource);
    let mut builder = match config.roots {
        Roots::Any => builder.with_sampler(config.sampler.sampler()),
        Roots::ServedCalls => builder.with_sampler(ServedCalls(config.sampler.sampler())),
    };
    match (config.exporter, &config.otlp_endpoint) {
        (TracesExporter::Otlp, Some(endpoint)) => {
            use opentelemetry_otlp::WithExportConfig;
            match opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(endpoint.clone())
                .with_timeout(Duration::from_secs(5))
                .build()
            {
                Ok(exporter) => builder = builder.with_batch_exporter(exporter),
                // Telemetry must never stop a service from starting.
                Err(e) => eprintln!("otlp exporter disabled: {e}"),
            }
        }
        (TracesExporter::Console, _) => builder = builder.with_batch_exporter(ConsoleExporter),
        (TracesExporter::Otlp, None) | (TracesExporter::None, _) => {}
    }
    builder.build()
}

/// The sampler of [`Roots::ServedCalls`]: drops background roots (and,
/// through their unsampled context, everything under them), then asks the
/// configured sampler.
#[derive(Debug, Clone)]
struct ServedCalls(Sampler);

impl ShouldSample for ServedCalls {
    fn should_sample(
        &self,
        parent: Option<&opentelemetry::Context>,
        trace_id: opentelemetry::trace::TraceId,
        name: &str,
        kind: &SpanKind,
        attributes: &[opentelemetry::KeyValue],
        links: &[opentelemetry::trace::Link],
    ) -> SamplingResult {
        let parent_span = parent.map(|cx| cx.span().span_context().clone()).filter(|sc| sc.is_valid());
        let drop = UNTRACED_SERVICES.iter().any(|s| name.starts_with(s))
            || match &parent_span {
                None => *kind != SpanKind::Server,
                // Under a dropped background root of this process (a remote
                // parent keeps the configured sampler's say).
                Some(sc) => !sc.is_remote() && !sc.is_sampled(),
            };
        if drop {
            return SamplingResult {
                decision: SamplingDecision::Drop,
                attributes: Vec::new(),
                trace_state: parent_span.map(|sc| sc.trace_state().clone()).unwrap_or_default(),
            };
        }
        self.0.should_sample(parent, trace_id, name, kind, attributes, links)
    }
}

/// Server span name prefixes of calls that never start a trace under
/// [`Roots::ServedCalls`]: health (probes, peers' health rounds) and
/// reflection (grpcurl asks before each call), both tooling, not work.
const UNTRACED_SERVICES: [&str; 3] = [
    "grpc.health.v1.Health/",
    "grpc.reflection.v1.ServerReflection/",
    "grpc.reflection.v1alpha.ServerReflection/",
];

fn otel_layer<S>(tracer: opentelemetry_sdk::trace::Tracer) -> impl Layer<S>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_location(false)
        .with_threads(false)
        .with_tracked_inactivity(false)
        // Off: making each span's OpenTelemetry context the thread's current
        // one on every poll of an instrumented future (an attach and a
        // detach per poll, per span). Nothing here reads
        // `opentelemetry::Context::current()`: propagation and the log
        // lines' ids read the span's own context.
        .with_context_activation(false)
        .with_filter(SampledCalls)
}

/// The OpenTelemetry layer's filter: `info` and above, and nothing inside a
/// served call whose trace the sampler dropped
/// ([`crate::grpc::CallContext::current_unsampled`]). Such a call's own
/// server span is made (it carries the decision and the ids downstream calls
/// and log lines use), but no span or event below it is: an unsampled call
/// costs one span, not one per hop, so a low sampling ratio costs little.
/// Work outside served calls (background roots, which
/// [`Roots::ServedCalls`] drops) is unaffected.
struct SampledCalls;

impl<S> tracing_subscriber::layer::Filter<S> for SampledCalls {
    fn enabled(&self, meta: &tracing::Metadata<'_>, _: &tracing_subscriber::layer::Context<'_, S>) -> bool {
        *meta.level() <= tracing::Level::INFO && !crate::grpc::CallContext::in_unsampled_call()
    }

    fn callsite_enabled(&self, meta: &'static tracing::Metadata<'static>) -> tracing::subscriber::Interest {
        if *meta.level() <= tracing::Level::INFO {
            tracing::subscriber::Interest::sometimes()
        } else {
            tracing::subscriber::Interest::never()
        }
    }

    fn max_level_hint(&self) -> Option<tracing_subscriber::filter::LevelFilter> {
        Some(tracing_subscriber::filter::LevelFilter::INFO)
    }
}

/// The subscriber the JSON formatter asks for the spans' OpenTelemetry ids
/// (while an event is being handled, `tracing`'s default dispatcher is
/// unavailable; a weak handle, so the subscriber does not own itself).
type DispatchSlot = Arc<OnceLock<WeakDispatch>>;

/// The log layer: text or JSON lines to `writer`; JSON lines carry the ids
/// of the spans of the subscriber later put in `slot`.
fn fmt_layer<S, W>(json: bool, ansi: bool, writer: W, slot: &DispatchSlot) -> Box<dyn Layer<S> + Send + Sync>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    let layer = tracing_subscriber::fmt::layer().with_writer(writer);
    if json {
        let format = JsonFormat { dispatch: slot.clone() };
        layer.with_ansi(false).fmt_fields(JsonFields).event_format(format).boxed()
    } else {
        layer.with_target(true).with_ansi(ansi).fmt_fields(TextFields).boxed()
    }
}

/// Telemetry for tests: quiet unless `TEST_LOG` is set (then `RUST_LOG` or
/// `debug`), spans exported to `otlp_endpoint` when given.
pub fn init_for_tests(service_name: &str, otlp_endpoint: Option<String>) -> Telemetry {
    let log = std::env::var("TEST_LOG").is_ok();
    Telemetry::init(&TelemetryConfig {
        service_name: service_name.to_owned(),
        otlp_endpoint,
        log_filter: std::env::var("RUST_LOG")
            .unwrap_or_else(|_| "debug,h2=info,hyper=info,tower=info".into()),
        log_to_stdout: log,
        ..TelemetryConfig::default()
    })
}

// ------------------------------------------------------------ console exporter

/// `OTEL_TRACES_EXPORTER=console`: one line per finished span on stdout.
#[derive(Debug)]
struct ConsoleExporter;

impl SpanExporter for ConsoleExporter {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let mut out = std::io::stdout().lock();
        for s in batch {
            let ms = s.end_time.duration_since(s.start_time).unwrap_or_default().as_secs_f64() * 1e3;
            let _ = write!(
                out,
                "span {:?} trace_id={} span_id={} parent_span_id={} kind={:?} duration_ms={ms:.3} status={:?}",
                s.name,
                s.span_context.trace_id(),
                s.span_context.span_id(),
                s.parent_span_id,
                s.span_kind,
                s.status,
            );
            for kv in &s.attributes {
                let _ = write!(out, " {}={:?}", kv.key, kv.value.as_str());
            }
            let _ = writeln!(out);
        }
        Ok(())
    }
}

// ------------------------------------------------------------ log fields

/// A field's `Debug` text as it should be logged: `Some(x)` is `x`, `None`
/// is no field at all.
fn unwrap_option(debug: &str) -> Option<&str> {
    if debug == "None" {
        return None;
    }
    Some(debug.strip_prefix("Some(").and_then(|s| s.strip_suffix(')')).unwrap_or(debug))
}

/// Text fields: `name=value` separated by spaces, the message bare.
#[derive(Debug)]
struct TextFields;

impl<'w> FormatFields<'w> for TextFields {
    fn format_fields<R: RecordFields>(&self, writer: Writer<'w>, fields: R) -> fmt::Result {
        let mut v = TextVisitor { writer, first: true, result: Ok(()) };
        fields.record(&mut v);
        v.result
    }
}

struct TextVisitor<'w> {
    writer: Writer<'w>,
    first: bool,
    result: fmt::Result,
}

impl TextVisitor<'_> {
    fn write(&mut self, name: &str, value: &str) {
        if self.result.is_err() || name.starts_with("log.") {
            return;
        }
        let sep = if self.first { "" } else { " " };
        self.first = false;
        self.result = if name == "message" {
            write!(self.writer, "{sep}{value}")
        } else {
            write!(self.writer, "{sep}{}={value}", name.strip_prefix("r#").unwrap_or(name))
        };
    }
}

impl Visit for TextVisitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.write("message", value);
        } else {
            self.write(field.name(), &format!("{value:?}"));
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        let text = format!("{value:?}");
        if field.name() == "message" {
            self.write("message", &text);
        } else if let Some(v) = unwrap_option(&text) {
            self.write(field.name(), v);
        }
    }
}

/// A JSON value for a field recorded with `Debug`: unwrapped from `Some`,
/// and kept as JSON when its `Debug` text is a JSON list, object or string
/// (`["a", "b"]`, `[1, 2]`), else the text itself.
fn json_of_debug(text: &str) -> Option<Value> {
    let text = unwrap_option(text)?;
    if text.starts_with(['[', '{', '"'])
        && let Ok(v) = serde_json::from_str::<Value>(text)
    {
        return Some(v);
    }
    Some(Value::String(text.to_owned()))
}

struct JsonVisitor<'a>(&'a mut Map<String, Value>);

impl JsonVisitor<'_> {
    fn put(&mut self, field: &Field, value: Value) {
        let name = field.name();
        if !name.starts_with("log.") {
            self.0.insert(name.strip_prefix("r#").unwrap_or(name).to_owned(), value);
        }
    }
}

impl Visit for JsonVisitor<'_> {
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.put(field, serde_json::json!(value));
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.put(field, value.into());
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.put(field, value.into());
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.put(field, value.into());
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.put(field, value.into());
    }
    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.put(field, value.to_string().into());
    }
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        let text = format!("{value:?}");
        if field.name() == "message" {
            self.put(field, text.into());
        } else if let Some(v) = json_of_debug(&text) {
            self.put(field, v);
        }
    }
}

/// Span fields as a JSON object (stored per span by the fmt layer).
#[derive(Debug)]
struct JsonFields;

impl<'w> FormatFields<'w> for JsonFields {
    fn format_fields<R: RecordFields>(&self, mut writer: Writer<'w>, fields: R) -> fmt::Result {
        let mut map = Map::new();
        fields.record(&mut JsonVisitor(&mut map));
        write!(writer, "{}", Value::Object(map))
    }

    fn add_fields(
        &self,
        current: &'w mut FormattedFields<Self>,
        fields: &tracing::span::Record<'_>,
    ) -> fmt::Result {
        let mut map = match serde_json::from_str::<Value>(&current.fields) {
            Ok(Value::Object(m)) => m,
            _ => Map::new(),
        };
        fields.record(&mut JsonVisitor(&mut map));
        current.fields = Value::Object(map).to_string();
        Ok(())
    }
}

/// One JSON object per line: `timestamp`, `level`, `target`, the event's
/// fields, `span` (the current span's name and fields), `spans` (its
/// ancestors' names, root first), and the current span's `trace_id` and
/// `span_id` (hex, as trace viewers show them).
#[derive(Debug)]
struct JsonFormat {
    dispatch: DispatchSlot,
}

impl<S> FormatEvent<S, JsonFields> for JsonFormat
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, JsonFields>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let meta = event.metadata();
        let mut timestamp = String::new();
        tracing_subscriber::fmt::time::SystemTime.format_time(&mut Writer::new(&mut timestamp))?;
        let mut obj = Map::new();
        event.record(&mut JsonVisitor(&mut obj));

        // The ids first: the otel layer reads the spans' extensions.
        let dispatch = self.dispatch.get().and_then(WeakDispatch::upgrade);
        let ids = ctx.event_scope().zip(dispatch).and_then(|(scope, dispatch)| {
            let ids: Vec<_> = scope.map(|s| s.id()).collect();
            ids.iter().find_map(|id| {
                let cx = tracing_opentelemetry::get_otel_context(id, &dispatch)?;
                let sc = cx.span().span_context().clone();
                sc.is_valid().then(|| (sc.trace_id().to_string(), sc.span_id().to_string()))
            })
        });
        // A call whose trace was dropped has no spans below its server span:
        // its lines carry the server span's ids.
        let ids = ids.or_else(|| {
            let sc = crate::grpc::CallContext::current_unsampled()?;
            Some((sc.trace_id().to_string(), sc.span_id().to_string()))
        });
        if let Some(scope) = ctx.event_scope() {
            let mut names = Vec::new();
            for (i, span) in scope.enumerate() {
                if i == 0 {
                    let mut current = Map::new();
                    current.insert("name".into(), span.name().into());
                    if let Some(f) = span.extensions().get::<FormattedFields<JsonFields>>()
                        && let Ok(Value::Object(fields)) = serde_json::from_str::<Value>(&f.fields)
                    {
                        current.extend(fields);
                    }
                    obj.insert("span".into(), Value::Object(current));
                }
                names.push(Value::from(span.name()));
            }
            names.reverse();
            obj.insert("spans".into(), Value::Array(names));
        }
        if let Some((trace_id, span_id)) = ids {
            obj.insert("trace_id".into(), trace_id.into());
            obj.insert("span_id".into(), span_id.into());
        }
        // timestamp, level, target and message first (a reader's eye goes
        // there), then the rest by name.
        let message = obj.remove("message");
        let mut line = format!(
            "{{\"timestamp\":{},\"level\":{},\"target\":{}",
            Value::from(timestamp),
            Value::from(meta.level().as_str()),
            Value::from(meta.target())
        );
        for (k, v) in message.iter().map(|m| ("message", m)).chain(obj.iter().map(|(k, v)| (k.as_str(), v))) {
            let _ = write!(line, ",{}:{v}", Value::from(k));
        }
        writeln!(writer, "{line}}}")
    }
}

#[cfg(test)]
mod tests {
    use std::{
        collections::HashMap,
        sync::{Arc, Mutex},
    };

    use opentelemetry::trace::{SpanContext, SpanId, SpanKind, TraceFlags, TraceId, TraceState};
    use opentelemetry_sdk::trace::{SamplingDecision, ShouldSample as _};
    use tracing::Instrument as _;
    use tracing_opentelemetry::OpenTelemetrySpanExt as _;

    use super::*;

    fn config(vars: &[(&'static str, &str)]) -> Result<TelemetryConfig, ConfigError> {
        let map: HashMap<&'static str, String> = vars.iter().map(|(k, v)| (*k, (*v).to_owned())).collect();
        TelemetryConfig::from_lookup(&map, "svc")
    }

    #[test]
    fn the_exporter_is_read_as_the_sdk_environment_spec_names_it() {
        let c = config(&[]).unwrap();
        assert_eq!((c.exporter, c.otlp_endpoint.as_deref()), (TracesExporter::Otlp, None));
        assert_eq!(c.describe_export(), "not exported (OTEL_EXPORTER_OTLP_ENDPOINT is unset)");

        let c = config(&[(keys::OTLP_ENDPOINT, "http://127.0.0.1:4317")]).unwrap();
        assert_eq!(c.describe_export(), "otlp/grpc to http://127.0.0.1:4317, sampler parentbased_always_on");
        let c = config(&[(keys::OTLP_ENDPOINT, "http://a:1"), (keys::OTLP_TRACES_ENDPOINT, "http://b:2")])
            .unwrap();
        assert_eq!(c.otlp_endpoint.as_deref(), Some("http://b:2"));

        // Asked for by name without an endpoint: the specification's default.
        let c = config(&[(keys::TRACES_EXPORTER, "otlp")]).unwrap();
        assert_eq!(c.otlp_endpoint.as_deref(), Some(DEFAULT_OTLP_ENDPOINT));

        let c = config(&[(keys::TRACES_EXPORTER, "console")]).unwrap();
        assert_eq!(c.exporter, TracesExporter::Console);
        assert_eq!(c.describe_export(), "printed to stdout (console), sampler parentbased_always_on");

        let c = config(&[(keys::TRACES_EXPORTER, "none"), (keys::OTLP_ENDPOINT, "http://127.0.0.1:4317")])
            .unwrap();
        assert_eq!(c.exporter, TracesExporter::None);
        assert_eq!(c.describe_export(), "not exported (OTEL_TRACES_EXPORTER=none)");

        let e = config(&[(keys::TRACES_EXPORTER, "jaeger")]).unwrap_err();
        assert_eq!(e.to_string(), "OTEL_TRACES_EXPORTER: expected otlp, console or none, got \"jaeger\"");
    }

    #[test]
    fn only_true_disables_the_sdk_as_the_specification_says() {
        for (value, disabled) in
            [("true", true), ("TRUE", true), ("false", false), ("1", false), ("yes", false)]
        {
            let c = config(&[(keys::SDK_DISABLED, value), (keys::OTLP_ENDPOINT, "http://127.0.0.1:4317")])
                .unwrap();
            assert_eq!(c.sdk_disabled, disabled, "OTEL_SDK_DISABLED={value}");
        }
        assert!(!config(&[]).unwrap().sdk_disabled);
        let c =
            config(&[(keys::SDK_DISABLED, "true"), (keys::OTLP_ENDPOINT, "http://127.0.0.1:4317")]).unwrap();
        assert_eq!(c.describe_export(), "off (OTEL_SDK_DISABLED=true): not recorded, exported or propagated");
    }

    #[test]
    fn every_sampler_of_the_spec_is_read_and_a_bad_one_is_refused() {
        let cases = [
            (None, None, SamplerConfig::ParentBasedAlwaysOn),
            (Some("always_on"), None, SamplerConfig::AlwaysOn),
            (Some("always_off"), None, SamplerConfig::AlwaysOff),
            (Some("traceidratio"), Some("0.25"), SamplerConfig::TraceIdRatio(0.25)),
            (Some("traceidratio"), None, SamplerConfig::TraceIdRatio(1.0)),
            (Some("parentbased_always_on"), None, SamplerConfig::ParentBasedAlwaysOn),
            (Some("parentbased_always_off"), None, SamplerConfig::ParentBasedAlwaysOff),
            (Some("parentbased_traceidratio"), Some("0.1"), SamplerConfig::ParentBasedTraceIdRatio(0.1)),
        ];
        for (sampler, arg, want) in cases {
            let mut vars = Vec::new();
            vars.extend(sampler.map(|s| (keys::TRACES_SAMPLER, s)));
            vars.extend(arg.map(|a| (keys::TRACES_SAMPLER_ARG, a)));
            assert_eq!(config(&vars).unwrap().sampler, want, "{sampler:?} {arg:?}");
        }
        let e = config(&[(keys::TRACES_SAMPLER, "sometimes")]).unwrap_err();
        assert_eq!(e.key, keys::TRACES_SAMPLER);
        for bad in ["1.5", "-0.1", "half"] {
            let e = config(&[
                (keys::TRACES_SAMPLER, "parentbased_traceidratio"),
                (keys::TRACES_SAMPLER_ARG, bad),
            ])
            .unwrap_err();
            assert_eq!(e.key, keys::TRACES_SAMPLER_ARG, "{bad}");
        }
        // The argument of a sampler that takes none is not read.
        assert!(config(&[(keys::TRACES_SAMPLER, "always_on"), (keys::TRACES_SAMPLER_ARG, "x")]).is_ok());
    }

    #[test]
    fn parent_based_ratio_follows_the_parent_and_samples_roots_by_ratio() {
        let decide = |sampler: SamplerConfig, parent: Option<bool>| {
            let cx = match parent {
                None => opentelemetry::Context::new(),
                Some(sampled) => opentelemetry::Context::new().with_remote_span_context(SpanContext::new(
                    TraceId::from_bytes(7u128.to_be_bytes()),
                    SpanId::from_bytes(7u64.to_be_bytes()),
                    if sampled { TraceFlags::SAMPLED } else { TraceFlags::default() },
                    true,
                    TraceState::default(),
                )),
            };
            let r = sampler.sampler().should_sample(
                Some(&cx),
                TraceId::from_bytes((u128::MAX / 3).to_be_bytes()),
                "x",
                &SpanKind::Server,
                &[],
                &[],
            );
            r.decision == SamplingDecision::RecordAndSample
        };
        let zero = SamplerConfig::ParentBasedTraceIdRatio(0.0);
        assert!(!decide(zero, None), "a root at ratio 0 is dropped");
        assert!(decide(zero, Some(true)), "a sampled parent wins over the ratio");
        assert!(!decide(SamplerConfig::ParentBasedTraceIdRatio(1.0), Some(false)));
        assert!(decide(SamplerConfig::ParentBasedTraceIdRatio(1.0), None));
        assert!(!decide(SamplerConfig::TraceIdRatio(0.0), Some(true)), "traceidratio ignores the parent");
        assert!(!decide(SamplerConfig::AlwaysOff, None));
        assert!(!decide(SamplerConfig::ParentBasedAlwaysOff, None));
        assert!(decide(SamplerConfig::default(), None));
    }

    #[test]
    fn served_calls_start_traces_and_health_reflection_and_background_work_do_not() {
        let sampler = ServedCalls(SamplerConfig::default().sampler());
        let remote = opentelemetry::Context::new().with_remote_span_context(SpanContext::new(
            TraceId::from_bytes(7u128.to_be_bytes()),
            SpanId::from_bytes(7u64.to_be_bytes()),
            TraceFlags::SAMPLED,
            true,
            TraceState::default(),
        ));
        let root = opentelemetry::Context::new();
        let decide = |cx: &opentelemetry::Context, name: &str, kind: SpanKind| {
            let r = sampler.should_sample(
                Some(cx),
                TraceId::from_bytes(9u128.to_be_bytes()),
                name,
                &kind,
                &[],
                &[],
            );
            r.decision == SamplingDecision::RecordAndSample
        };
        assert!(decide(&root, "mesh.data.v1.DataService/Put", SpanKind::Server));
        assert!(decide(&remote, "mesh.session.v1.SessionService/ValidateSession", SpanKind::Server));
        assert!(!decide(&root, "outbox.sweep", SpanKind::Internal), "background work");
        assert!(!decide(&root, "EVALSHA ratelimit_check", SpanKind::Client), "a client call of no call");
        for name in [
            "grpc.health.v1.Health/Check",
            "grpc.health.v1.Health/Watch",
            "grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
            "grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        ] {
            assert!(!decide(&root, name, SpanKind::Server), "{name}");
            assert!(!decide(&remote, name, SpanKind::Server), "{name} under a sampled caller");
        }
    }

    #[tokio::test]
    async fn a_dropped_call_makes_no_span_below_its_server_span_and_hands_its_ids_on() {
        let buffer = Buffer::default();
        let sampler = ServedCalls(SamplerConfig::ParentBasedTraceIdRatio(0.0).sampler());
        let dispatch = subscriber(true, &buffer, &SdkTracerProvider::builder().with_sampler(sampler).build());
        let _default = tracing::dispatcher::set_default(&dispatch);
        global::set_text_map_propagator(TraceContextPropagator::new());

        let server = tracing::info_span!("grpc.server", otel.name = "mesh.x.v1.X/Y", otel.kind = "server");
        let sc = server.context().span().span_context().clone();
        assert!(sc.is_valid() && !sc.is_sampled(), "the ratio-0 sampler drops the root: {sc:?}");
        let call = crate::grpc::CallContext::new("rid", None).with_unsampled(sc.clone());
        let headers = call
            .scope(
                async {
                    let child = tracing::info_span!("EVALSHA ratelimit_check", otel.kind = "client");
                    let _g = child.enter();
                    // No OpenTelemetry span was made for the child...
                    assert!(!child.context().span().span_context().is_valid(), "a span below a dropped call");
                    tracing::info!("inside");
                    // ...yet what leaves the process names the call's trace.
                    let mut headers = http::HeaderMap::new();
                    crate::trace_context::inject_current(&mut headers);
                    assert_eq!(crate::trace_context::current_trace_id(), Some(sc.trace_id().to_string()));
                    headers
                }
                .instrument(server.clone()),
            )
            .await;
        assert_eq!(
            headers.get("traceparent").and_then(|v| v.to_str().ok()),
            Some(format!("00-{}-{}-00", sc.trace_id(), sc.span_id()).as_str()),
            "downstream calls carry the dropped decision"
        );
        let out = String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap();
        let line: Value = serde_json::from_str(out.lines().last().expect("a log line")).unwrap();
        assert_eq!(line["trace_id"], sc.trace_id().to_string(), "{line}");
        assert_eq!(line["span_id"], sc.span_id().to_string(), "{line}");

        // A sampled call's spans are all made, as before.
        let provider = SdkTracerProvider::builder().build();
        let dispatch =
            Dispatch::new(tracing_subscriber::registry().with(otel_layer(provider.tracer("test"))));
        let _default = tracing::dispatcher::set_default(&dispatch);
        let server = tracing::info_span!("grpc.server", otel.kind = "server");
        assert!(server.context().span().span_context().is_sampled());
        let child = crate::grpc::CallContext::new("rid", None)
            .scope(async { tracing::info_span!("EVALSHA ratelimit_check") }.instrument(server.clone()))
            .await;
        assert!(child.context().span().span_context().is_sampled());
    }

    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buffer {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// Runs `f` under a subscriber made as [`Telemetry::init`] makes it,
    /// logging to a buffer; returns the log.
    fn logged(json: bool, f: impl FnOnce()) -> String {
        let buffer = Buffer::default();
        let dispatch = subscriber(json, &buffer, &SdkTracerProvider::builder().build());
        tracing::dispatcher::with_default(&dispatch, f);
        String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap()
    }

    /// The subscriber [`Telemetry::init`] makes, logging to `buffer`, its
    /// spans going to `provider`.
    fn subscriber(json: bool, buffer: &Buffer, provider: &SdkTracerProvider) -> Dispatch {
        let writer = buffer.clone();
        let slot = DispatchSlot::default();
        let dispatch = Dispatch::new(
            tracing_subscriber::registry()
                .with(fmt_layer(json, false, move || writer.clone(), &slot))
                .with(otel_layer(provider.tracer("test"))),
        );
        let _ = slot.set(dispatch.downgrade());
        dispatch
    }

    #[test]
    fn json_logs_carry_the_span_ids_keep_arrays_and_unwrap_options() {
        let mut ids = None;
        let out = logged(true, || {
            let span = tracing::info_span!("call", rpc.method = "Check", peer = ?Some("10.0.0.1"));
            let _g = span.enter();
            let sc = span.context().span().span_context().clone();
            ids = Some((sc.trace_id().to_string(), sc.span_id().to_string()));
            tracing::info!(
                domains = ?vec!["a", "b"],
                counts = ?[1, 2],
                limit = ?Some(5),
                missing = ?None::<u32>,
                reason = ?Some("over limit"),
                "decided [1]"
            );
        });
        let line: Value = serde_json::from_str(out.trim()).unwrap();
        assert!(out.starts_with(r#"{"timestamp":""#), "{out}");
        assert!(
            out.contains(
                r#","level":"INFO","target":"mesh_runtime::telemetry::tests","message":"decided [1]","#
            ),
            "{out}"
        );
        let (trace_id, span_id) = ids.unwrap();
        assert_eq!(line["trace_id"], trace_id.as_str(), "{out}");
        assert_eq!(line["span_id"], span_id.as_str(), "{out}");
        assert_eq!(trace_id.len(), 32);
        assert_eq!(line["domains"], serde_json::json!(["a", "b"]), "{out}");
        assert_eq!(line["counts"], serde_json::json!([1, 2]), "{out}");
        assert_eq!(line["limit"], "5", "{out}");
        assert_eq!(line["reason"], "over limit", "{out}");
        assert_eq!(line["message"], "decided [1]", "{out}");
        assert!(line.get("missing").is_none(), "{out}");
        assert_eq!(line["span"]["name"], "call", "{out}");
        assert_eq!(line["span"]["rpc.method"], "Check", "{out}");
        assert_eq!(line["span"]["peer"], "10.0.0.1", "{out}");
        assert_eq!(line["spans"], serde_json::json!(["call"]), "{out}");
        assert_eq!(line["level"], "INFO");
        assert!(!out.contains("Some("), "{out}");

        // Outside any span: no ids.
        let out = logged(true, || tracing::info!("alone"));
        let line: Value = serde_json::from_str(out.trim()).unwrap();
        assert!(line.get("trace_id").is_none() && line.get("span").is_none(), "{out}");
    }

    #[test]
    fn text_logs_show_optional_values_without_some_and_leave_absent_ones_out() {
        let out = logged(false, || {
            let span = tracing::info_span!("call", peer = ?Some("10.0.0.1"));
            let _g = span.enter();
            tracing::info!(limit = ?Some(5), missing = ?None::<u32>, name = "x", "decided");
        });
        assert!(out.contains("decided limit=5 name=\"x\""), "{out}");
        assert!(out.contains("call{peer=\"10.0.0.1\"}"), "{out}");
        assert!(!out.contains("Some(") && !out.contains("missing"), "{out}");
    }
}

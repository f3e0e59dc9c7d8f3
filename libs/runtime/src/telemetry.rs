//! The one telemetry entry point: `tracing` logs to stdout and, when
//! `OTEL_EXPORTER_OTLP_ENDPOINT` is set, spans exported over OTLP/gRPC.
//!
//! W3C trace context is always propagated (even without an exporter), so a
//! service in the middle of a call chain never breaks the trace.

use std::time::Duration;

use opentelemetry::{global, trace::TracerProvider as _};
use opentelemetry_sdk::{Resource, propagation::TraceContextPropagator, trace::SdkTracerProvider};
use tracing_subscriber::{EnvFilter, Layer, layer::SubscriberExt, util::SubscriberInitExt};

use crate::config::{ConfigError, Lookup, LookupExt};

/// Keys read by [`TelemetryConfig::from_lookup`].
pub mod keys {
    /// OTLP/gRPC collector endpoint, e.g. `http://127.0.0.1:4317`. Unset: no export.
    pub const OTLP_ENDPOINT: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";
    /// Traces-only override of [`OTLP_ENDPOINT`].
    pub const OTLP_TRACES_ENDPOINT: &str = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT";
    /// The `service.name` resource attribute.
    pub const SERVICE_NAME: &str = "OTEL_SERVICE_NAME";
    /// Log filter, `tracing_subscriber::EnvFilter` syntax.
    pub const RUST_LOG: &str = "RUST_LOG";
    /// `text` (default) or `json`.
    pub const LOG_FORMAT: &str = "MESH_LOG_FORMAT";
}

/// How telemetry is set up.
#[derive(Debug, Clone)]
pub struct TelemetryConfig {
    /// The `service.name` resource attribute.
    pub service_name: String,
    /// Where spans are exported; `None` exports nothing.
    pub otlp_endpoint: Option<String>,
    /// Log filter directives.
    pub log_filter: String,
    /// Whether logs go to stdout at all (tests keep quiet unless `TEST_LOG` is set).
    pub log_to_stdout: bool,
    /// JSON logs instead of text.
    pub json_logs: bool,
}

impl TelemetryConfig {
    /// Reads the standard `OTEL_*` and `RUST_LOG` variables.
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
        Ok(Self {
            service_name: l.string(keys::SERVICE_NAME).unwrap_or_else(|| default_service_name.to_owned()),
            otlp_endpoint: l.string(keys::OTLP_TRACES_ENDPOINT).or_else(|| l.string(keys::OTLP_ENDPOINT)),
            log_filter: l
                .string(keys::RUST_LOG)
                .unwrap_or_else(|| "info,sqlx=warn,fred=warn,h2=warn".to_owned()),
            log_to_stdout: true,
            json_logs,
        })
    }
}

/// Installed telemetry; call [`Telemetry::shutdown`] before exiting so
/// buffered spans are flushed.
#[derive(Debug)]
pub struct Telemetry {
    provider: SdkTracerProvider,
}

impl Telemetry {
    /// Installs the global subscriber, tracer provider and propagator.
    /// A second call in the same process (tests) leaves the first in place.
    pub fn init(config: &TelemetryConfig) -> Self {
        global::set_text_map_propagator(TraceContextPropagator::new());
        let resource = Resource::builder().with_service_name(config.service_name.clone()).build();
        let mut builder = SdkTracerProvider::builder().with_resource(resource);
        if let Some(endpoint) = &config.otlp_endpoint {
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
        let provider = builder.build();
        global::set_tracer_provider(provider.clone());
        let tracer = provider.tracer("mesh");

        let filter = EnvFilter::try_new(&config.log_filter).unwrap_or_else(|_| EnvFilter::new("info"));
        let fmt = config.log_to_stdout.then(|| {
            let layer = tracing_subscriber::fmt::layer()
                .with_target(true)
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()));
            if config.json_logs {
                layer.json().flatten_event(true).with_current_span(true).boxed()
            } else {
                layer.boxed()
            }
        });
        // Spans are created for every level the filter lets through; the otel
        // layer turns them into OpenTelemetry spans for propagation and export.
        // Off: source location, thread and busy/idle-time attributes. They are
        // not part of the RPC / database conventions, and the busy/idle times
        // cost two clock reads per poll of every instrumented future, on every
        // hop of every call.
        let _ = tracing_subscriber::registry()
            .with(fmt.with_filter(filter))
            .with(
                tracing_opentelemetry::layer()
                    .with_tracer(tracer)
                    .with_location(false)
                    .with_threads(false)
                    .with_tracked_inactivity(false)
                    .with_filter(tracing_subscriber::filter::LevelFilter::INFO),
            )
            .try_init();
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
        json_logs: false,
    })
}

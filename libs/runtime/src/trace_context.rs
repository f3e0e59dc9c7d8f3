//! W3C trace context (`traceparent`/`tracestate`) in gRPC metadata.

use http::HeaderMap;
use opentelemetry::{
    Context, global,
    propagation::{Extractor, Injector},
};

struct Reader<'a>(&'a HeaderMap);

impl Extractor for Reader<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

struct Writer<'a>(&'a mut HeaderMap);

impl Injector for Writer<'_> {
    fn set(&mut self, key: &str, value: String) {
        // An empty `tracestate` carries nothing (W3C: it may be omitted).
        if value.is_empty() {
            return;
        }
        // The W3C names are known: skip parsing them on every call.
        let name = match key {
            "traceparent" => http::HeaderName::from_static("traceparent"),
            "tracestate" => http::HeaderName::from_static("tracestate"),
            other => match http::HeaderName::from_bytes(other.as_bytes()) {
                Ok(n) => n,
                Err(_) => return,
            },
        };
        if let Ok(mut v) = http::HeaderValue::from_maybe_shared(bytes::Bytes::from(value)) {
            // A `traceparent` is new on every call: marked so HTTP/2 does not
            // put it in the HPACK table, where it would only evict the
            // headers that repeat.
            v.set_sensitive(name == "traceparent");
            self.0.insert(name, v);
        }
    }
}

/// The remote parent context carried by incoming headers (empty if none).
pub fn extract(headers: &HeaderMap) -> Context {
    global::get_text_map_propagator(|p| p.extract(&Reader(headers)))
}

/// Writes `cx` into outgoing headers.
pub fn inject(cx: &Context, headers: &mut HeaderMap) {
    global::get_text_map_propagator(|p| p.inject_context(cx, &mut Writer(headers)));
}

/// The trace context a downstream call or a log line of `span` carries:
/// the span's own when it is recorded, else that of the call the task
/// handles when its trace was dropped by the sampler (whose spans are not
/// made: see [`crate::telemetry`]), else none.
pub fn context_of(span: &tracing::Span) -> Context {
    use opentelemetry::trace::TraceContextExt;
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    let cx = span.context();
    if cx.span().span_context().is_valid() {
        return cx;
    }
    match crate::grpc::CallContext::current_unsampled() {
        Some(sc) => Context::new().with_remote_span_context(sc),
        None => cx,
    }
}

/// Writes the current `tracing` span's context ([`context_of`]) into outgoing headers.
pub fn inject_current(headers: &mut HeaderMap) {
    inject(&context_of(&tracing::Span::current()), headers);
}

/// The trace id of the current span ([`context_of`]) as 32 hex digits, if it has one.
pub fn current_trace_id() -> Option<String> {
    use opentelemetry::trace::TraceContextExt;
    let cx = context_of(&tracing::Span::current());
    let sc = cx.span().span_context().clone();
    sc.is_valid().then(|| sc.trace_id().to_string())
}

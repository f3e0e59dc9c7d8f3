//! The server-side tower layer every mesh server runs behind: one server span
//! per RPC (parented on the caller's W3C trace context, with the OpenTelemetry
//! RPC semantic-convention attributes), an `x-request-id` on the span, the
//! request and the response, and the per-RPC Prometheus metrics.
//!
//! The gRPC status is read from the response headers (trailers-only
//! responses) or, for streamed bodies, from the trailers when the body ends;
//! a body dropped before its end counts as CANCELLED, or DEADLINE_EXCEEDED
//! when it ended within [`deadline_slack`] of the caller's deadline: tonic
//! drops the handler at the deadline, and a tonic caller's own timer (every
//! tonic client enforces the `grpc-timeout` it sends) resets the stream at
//! the same instant as seen from the caller, which is up to the request's
//! transit time *before* the deadline as the server computes it.
//!
//! Deadlines and request ids flow downstream: the caller's `grpc-timeout`
//! becomes an absolute deadline, and together with the request id it forms
//! the [`CallContext`] of the call. The context is in the request extensions
//! and in a task-local around the handler future, where the mesh client stack
//! (`mesh-tower`) reads it, so every downstream call made while handling the
//! request carries the remaining budget and the same `x-request-id`. Work
//! moved to another task keeps it with [`CallContext::scope`].

use std::{
    collections::HashMap,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, ready},
    time::Duration,
};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response};
use http_body::{Body, Frame, SizeHint};
use opentelemetry::trace::{SpanContext, TraceContextExt as _};
use pin_project_lite::pin_project;
use tokio::{task::futures::TaskLocalFuture, time::Instant};
use tower::{Layer, Service};
use tracing::{Instrument, Span, field::Empty};
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::metrics::{CodeLabels, MethodLabels, ServerMetrics};

/// Metadata key of the request id.
pub const REQUEST_ID: &str = "x-request-id";

/// The response header that names the call's trace when it is sampled
/// (W3C Trace Context Level 2 `traceresponse`:
/// `00-<trace id>-<server span id>-01`), so a caller — `grpcurl -v`, say —
/// can look its own call up (`mesh-trace <trace id>`, Jaeger).
pub const TRACE_RESPONSE: &str = "traceresponse";

/// The `traceresponse` value of a sampled server span's context.
fn trace_response(sc: &SpanContext) -> Option<HeaderValue> {
    (sc.is_valid() && sc.is_sampled())
        .then(|| HeaderValue::from_str(&format!("00-{}-{}-01", sc.trace_id(), sc.span_id())).ok())
        .flatten()
}

/// Metadata key of the caller's timeout (gRPC over HTTP/2: `grpc-timeout`).
pub const GRPC_TIMEOUT: &str = "grpc-timeout";

/// The request id of the current call, also inserted into request extensions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestId(pub Arc<str>);

/// What a call hands on to the downstream calls made while handling it: its
/// request id and its absolute deadline (from the caller's `grpc-timeout`).
///
/// The server layer puts it in the request extensions and in a task-local
/// around the handler future; [`CallContext::current`] reads it there. A task
/// spawned by a handler does not inherit task-locals: capture the context and
/// run the task inside [`CallContext::scope`] (and `.instrument(Span::current())`
/// for the trace).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallContext {
    request_id: Arc<str>,
    deadline: Option<Instant>,
    /// The server span's context when the call is in a trace the sampler
    /// dropped: its spans are not made at all (the telemetry module's
    /// filter), and downstream calls and log lines carry this context.
    unsampled: Option<SpanContext>,
}

tokio::task_local! {
    static CURRENT: CallContext;
}

impl CallContext {
    /// A context for work that does not start with an RPC (a background job
    /// that wants its downstream calls to share one request id and deadline).
    pub fn new(request_id: impl Into<Arc<str>>, deadline: Option<Instant>) -> Self {
        Self { request_id: request_id.into(), deadline, unsampled: None }
    }

    /// The context of the call being handled by the current task, if any.
    pub fn current() -> Option<Self> {
        CURRENT.try_with(Clone::clone).ok()
    }

    /// The trace context of the current task's call when the sampler dropped
    /// its trace (valid ids, sampled flag off); `None` outside a call or
    /// when the call is sampled.
    pub fn current_unsampled() -> Option<SpanContext> {
        CURRENT.try_with(|c| c.unsampled.clone()).ok().flatten()
    }

    /// This context for a call whose trace the sampler dropped (tests).
    #[cfg(test)]
    pub(crate) fn with_unsampled(mut self, sc: SpanContext) -> Self {
        self.unsampled = Some(sc);
        self
    }

    /// Whether the current task handles a call whose trace was dropped (no
    /// allocation: the telemetry filter asks this for every span).
    pub(crate) fn in_unsampled_call() -> bool {
        CURRENT.try_with(|c| c.unsampled.is_some()).unwrap_or(false)
    }

    /// The call's request id.
    pub fn request_id(&self) -> &str {
        &self.request_id
    }

    /// The call's request id, shared.
    pub fn request_id_arc(&self) -> Arc<str> {
        self.request_id.clone()
    }

    /// When the caller stops waiting; `None` when it set no deadline.
    pub fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    /// Time left until the deadline (zero once passed); `None` without a deadline.
    pub fn remaining(&self) -> Option<Duration> {
        self.deadline.map(|d| d.saturating_duration_since(Instant::now()))
    }

    /// Runs `fut` with this context as the current one.
    pub fn scope<F: Future>(self, fut: F) -> TaskLocalFuture<CallContext, F> {
        CURRENT.scope(self, fut)
    }
}

/// Parses a `grpc-timeout` value (`1-8 digits` + `H|M|S|m|u|n`).
pub fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    let unit = *value.as_bytes().last()?;
    let digits = &value[..value.len() - 1];
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        b'H' => Duration::from_secs(n * 3600),
        b'M' => Duration::from_secs(n * 60),
        b'S' => Duration::from_secs(n),
        b'm' => Duration::from_millis(n),
        b'u' => Duration::from_micros(n),
        b'n' => Duration::from_nanos(n),
        _ => return None,
    })
}

/// Encodes `timeout` as a `grpc-timeout` value in the finest unit that fits
/// the 8 digits the protocol allows, rounding down so the value never
/// promises more time than there is. `None` when it rounds down to zero.
pub fn format_grpc_timeout(timeout: Duration) -> Option<String> {
    const MAX: u128 = 99_999_999;
    let nanos = timeout.as_nanos();
    let (value, unit) = [
        (1, 'n'),
        (1_000, 'u'),
        (1_000_000, 'm'),
        (1_000_000_000, 'S'),
        (60_000_000_000, 'M'),
        (3_600_000_000_000, 'H'),
    ]
    .into_iter()
    .map(|(per, unit)| (nanos / per, unit))
    .find(|(v, _)| *v <= MAX)
    .unwrap_or((MAX, 'H'));
    (value > 0).then(|| format!("{value}{unit}"))
}

/// The caller's deadline as a duration from now, read from `grpc-timeout`.
fn caller_timeout(headers: &HeaderMap) -> Option<Duration> {
    parse_grpc_timeout(headers.get(GRPC_TIMEOUT)?.to_str().ok()?)
}

/// The one INVALID_ARGUMENT of every mesh service: a message naming every
/// field and what is wrong with it (`invalid request: key: must not be
/// empty; document: is required`), and the same violations as
/// `google.rpc.BadRequest` details for clients that read them.
pub fn invalid_argument(violations: Vec<tonic_types::FieldViolation>) -> tonic::Status {
    use tonic_types::{ErrorDetails, StatusExt as _};
    let summary =
        violations.iter().map(|v| format!("{}: {}", v.field, v.description)).collect::<Vec<_>>().join("; ");
    tonic::Status::with_error_details(
        tonic::Code::InvalidArgument,
        format!("invalid request: {summary}"),
        ErrorDetails::with_bad_request(violations),
    )
}

/// Canonical upper-case name of a gRPC status code, e.g. `INVALID_ARGUMENT`.
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}

/// Codes that mark a server span as an error (OpenTelemetry gRPC conventions).
fn is_server_error(code: tonic::Code) -> bool {
    use tonic::Code::*;
    matches!(code, Unknown | DeadlineExceeded | Unimplemented | Internal | Unavailable | DataLoss)
}

/// Layer that observes every RPC; see the module docs.
#[derive(Debug, Clone)]
pub struct GrpcServerLayer {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    metrics: ServerMetrics,
    /// `/package.Service/Method` paths the server really serves, with their
    /// `grpc_type`; anything else is labelled "unknown" so clients cannot
    /// blow up metric cardinality.
    known: HashMap<String, &'static str>,
}

impl GrpcServerLayer {
    /// Every known method starts at 0 in the call counters (see
    /// [`ServerMetrics::initialize`]).
    pub(crate) fn new(metrics: ServerMetrics, known: HashMap<String, &'static str>) -> Self {
        for (path, kind) in &known {
            if let Some((s, m)) = path.strip_prefix('/').and_then(|p| p.split_once('/')) {
                metrics.initialize(&MethodLabels {
                    grpc_type: kind,
                    grpc_service: s.into(),
                    grpc_method: m.into(),
                });
            }
        }
        Self { shared: Arc::new(Shared { metrics, known }) }
    }
}

impl<S> Layer<S> for GrpcServerLayer {
    type Service = GrpcServer<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GrpcServer { inner, shared: self.shared.clone() }
    }
}

/// The service produced by [`GrpcServerLayer`].
#[derive(Debug, Clone)]
pub struct GrpcServer<S> {
    inner: S,
    shared: Arc<Shared>,
}

fn request_id(headers: &HeaderMap) -> Option<&str> {
    let v = headers.get(REQUEST_ID)?.to_str().ok()?;
    // Accept caller ids only if they are short and printable; else mint our own.
    (!v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic())).then_some(v)
}

impl<S, B, RB> Service<Request<B>> for GrpcServer<S>
where
    S: Service<Request<B>, Response = Response<RB>>,
    S::Future: Send + 'static,
    RB: Body<Data = Bytes> + Default,
{
    type Response = Response<ObservedBody<RB>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let start = std::time::Instant::now();
        let path = req.uri().path();
        let (kind, service, method): (&'static str, Arc<str>, Arc<str>) =
            match (path.strip_prefix('/').and_then(|p| p.split_once('/')), self.shared.known.get(path)) {
                (Some((s, m)), Some(kind)) => (kind, s.into(), m.into()),
                _ => ("unknown", "unknown".into(), "unknown".into()),
            };
        let rid: Arc<str> = match request_id(req.headers()) {
            Some(v) => v.into(),
            None => {
                let v = uuid::Uuid::new_v4().to_string();
                if let Ok(hv) = HeaderValue::from_str(&v) {
                    req.headers_mut().insert(REQUEST_ID, hv);
                }
                v.into()
            }
        };
        req.extensions_mut().insert(RequestId(rid.clone()));
        let timeout = caller_timeout(req.headers());
        let deadline = timeout.and_then(|t| Instant::now().checked_add(t));
        let expiry = timeout.and_then(|t| deadline.map(|d| d.checked_sub(deadline_slack(t)).unwrap_or(d)));
        let span = tracing::info_span!(
            "grpc.server",
            otel.name = %format_args!("{service}/{method}"),
            otel.kind = "server",
            otel.status_code = Empty,
            rpc.system = "grpc",
            rpc.service = %service,
            rpc.method = %method,
            rpc.grpc.status_code = Empty,
            request_id = %rid,
        );
        let _ = span.set_parent(crate::trace_context::extract(req.headers()));
        // The sampler decides here, once the parent is known; a dropped trace
        // makes no spans below this one (module docs of `telemetry`).
        let span_context = span.context().span().span_context().clone();
        let unsampled = (span_context.is_valid() && !span_context.is_sampled()).then(|| span_context.clone());
        let context = CallContext { request_id: rid.clone(), deadline, unsampled };
        req.extensions_mut().insert(context.clone());

        let labels = MethodLabels { grpc_type: kind, grpc_service: service, grpc_method: method };
        self.shared.metrics.started.get_or_create(&labels).inc();
        // A deadline already past when the call arrives (`grpc-timeout: 0n`):
        // the handler never runs, so nothing it would change changes (tonic's
        // own timer would drop it after its first poll, and answer CANCELLED).
        let late = timeout == Some(Duration::ZERO);
        let fut = (!late).then(|| {
            let _entered = span.enter();
            let fut = CURRENT.sync_scope(context.clone(), || self.inner.call(req));
            context.scope(fut).instrument(span.clone())
        });
        ResponseFuture {
            inner: fut,
            recorder: Some(Recorder {
                shared: self.shared.clone(),
                labels,
                start,
                expiry,
                span,
                span_context,
                done: false,
            }),
            rid,
        }
    }
}

/// How long before the deadline as computed here (arrival + `grpc-timeout`) a
/// call the caller reset still counts as DEADLINE_EXCEEDED: a tenth of the
/// caller's timeout, at least 1 ms (tonic's timers fire at millisecond
/// granularity) and at most 100 ms. The caller's timer started before the
/// request was sent, so its reset arrives up to the transit and scheduling
/// delay before this server's deadline; a caller that cancels on purpose in
/// the last tenth of its budget is counted as out of time.
fn deadline_slack(timeout: Duration) -> Duration {
    (timeout / 10).clamp(Duration::from_millis(1), Duration::from_millis(100))
}

/// Records the outcome of one RPC exactly once.
#[derive(Debug)]
struct Recorder {
    shared: Arc<Shared>,
    labels: MethodLabels,
    start: std::time::Instant,
    /// From when an unfinished call counts as DEADLINE_EXCEEDED.
    expiry: Option<Instant>,
    span: Span,
    /// The server span's OpenTelemetry context, taken once when the call arrived.
    span_context: SpanContext,
    done: bool,
}

impl Recorder {
    fn finish(&mut self, code: tonic::Code) {
        if std::mem::replace(&mut self.done, true) {
            return;
        }
        let m = &self.shared.metrics;
        m.seconds.get_or_create(&self.labels).observe(self.start.elapsed().as_secs_f64());
        m.handled
            .get_or_create(&CodeLabels {
                grpc_type: self.labels.grpc_type,
                grpc_service: self.labels.grpc_service.clone(),
                grpc_method: self.labels.grpc_method.clone(),
                grpc_code: code_name(code),
            })
            .inc();
        self.span.record("rpc.grpc.status_code", code as i32);
        if is_server_error(code) {
            self.span.record("otel.status_code", "ERROR");
        }
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        // The response (or its body) was dropped before a status was seen:
        // the client went away, or the caller's deadline ended the call
        // (tonic's timer here, or the caller's, whose reset arrives early).
        let expired = self.expiry.is_some_and(|e| Instant::now() >= e);
        self.finish(if expired { tonic::Code::DeadlineExceeded } else { tonic::Code::Cancelled });
    }
}

/// What tonic's protobuf codec says when a request does not decode (tonic
/// answers INTERNAL, as gRPC's status-code guide has it for a server that
/// cannot parse what it was sent), followed by prost's reason.
const DECODE_FAILURE: &str = "failed to decode Protobuf message: ";

/// A request that does not decode as its message type (not protobuf, a
/// string field that is not UTF-8, nesting past prost's recursion limit of
/// 100) is the caller's mistake: INTERNAL from tonic's codec becomes the
/// usual [`invalid_argument`], naming the field where decoding failed and
/// prost's reason (`invalid request: event.metadata.fields.value.kind…:
/// recursion limit reached`). Only trailers-only responses are rewritten,
/// which is how tonic answers a unary or server-streaming request it could
/// not decode.
fn undecodable_is_invalid_argument(headers: &mut HeaderMap) {
    if status_in(headers) != Some(tonic::Code::Internal) {
        return;
    }
    let Some(status) = tonic::Status::from_header_map(headers) else { return };
    let Some(reason) = status.message().strip_prefix(DECODE_FAILURE) else { return };
    let (field, description) = decode_failure_field(reason);
    let status = invalid_argument(vec![tonic_types::FieldViolation::new(field, description)]);
    // The details of the INTERNAL status, if any, are replaced, not kept.
    headers.remove("grpc-status-details-bin");
    if status.add_header(headers).is_err() {
        tracing::debug!("could not rewrite a decode failure as invalid argument");
    }
}

/// Splits prost's reason (`Value.kind: Struct.fields: recursion limit
/// reached`: the innermost `Message.field` first) into the field path from
/// the request down (at most 8 levels, then `…`) and the cause.
fn decode_failure_field(reason: &str) -> (String, String) {
    const MAX_LEVELS: usize = 8;
    let is_level = |s: &str| {
        s.split_once('.').is_some_and(|(m, f)| {
            let ident = |x: &str| !x.is_empty() && x.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
            ident(m) && ident(f)
        })
    };
    let mut levels = Vec::new();
    let mut rest = reason;
    while let Some((head, tail)) = rest.split_once(": ")
        && is_level(head)
    {
        levels.push(head.split_once('.').map_or(head, |(_, f)| f));
        rest = tail;
    }
    levels.reverse();
    let mut field = levels.iter().take(MAX_LEVELS).copied().collect::<Vec<_>>().join(".");
    if levels.len() > MAX_LEVELS {
        field.push('…');
    }
    if field.is_empty() {
        field.push_str("request");
    }
    (field, format!("is not a valid encoding: {rest}"))
}

/// The trailers-only answer to a call whose deadline passed before it started.
fn deadline_exceeded<RB: Default>() -> Response<RB> {
    let mut resp = Response::new(RB::default());
    let headers = resp.headers_mut();
    headers.insert(http::header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    let status = tonic::Status::deadline_exceeded("the deadline passed before the call started");
    status.add_header(headers).expect("a plain ascii status");
    resp
}

fn status_in(headers: &HeaderMap) -> Option<tonic::Code> {
    let v = headers.get("grpc-status")?.to_str().ok()?.parse::<i32>().ok()?;
    Some(tonic::Code::from_i32(v))
}

pin_project! {
    /// Future of [`GrpcServer`].
    #[derive(Debug)]
    pub struct ResponseFuture<F> {
        // `None`: answered DEADLINE_EXCEEDED without calling the handler.
        #[pin]
        inner: Option<tracing::instrument::Instrumented<TaskLocalFuture<CallContext, F>>>,
        recorder: Option<Recorder>,
        rid: Arc<str>,
    }
}

impl<F, RB, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<RB>, E>>,
    RB: Body<Data = Bytes> + Default,
{
    type Output = Result<Response<ObservedBody<RB>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = match this.inner.as_pin_mut() {
            Some(inner) => ready!(inner.poll(cx)),
            None => Ok(deadline_exceeded()),
        };
        let mut recorder = this.recorder.take().expect("polled after completion");
        Poll::Ready(match result {
            Ok(resp) => {
                let (mut parts, body) = resp.into_parts();
                if let Ok(v) = HeaderValue::from_str(this.rid) {
                    parts.headers.insert(REQUEST_ID, v);
                }
                if let Some(v) = trace_response(&recorder.span_context) {
                    parts.headers.insert(TRACE_RESPONSE, v);
                }
                undecodable_is_invalid_argument(&mut parts.headers);
                let recorder = match status_in(&parts.headers) {
                    Some(code) => {
                        recorder.finish(code);
                        None
                    }
                    None => Some(recorder),
                };
                Ok(Response::from_parts(parts, ObservedBody { inner: body, recorder }))
            }
            Err(e) => {
                recorder.finish(tonic::Code::Internal);
                Err(e)
            }
        })
    }
}

pin_project! {
    /// A response body that records the gRPC status from its trailers.
    #[derive(Debug)]
    pub struct ObservedBody<B> {
        #[pin]
        inner: B,
        recorder: Option<Recorder>,
    }
}

impl<B: Body<Data = Bytes>> Body for ObservedBody<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let frame = ready!(this.inner.poll_frame(cx));
        match &frame {
            Some(Ok(f)) => {
                if let Some(trailers) = f.trailers_ref()
                    && let Some(mut r) = this.recorder.take()
                {
                    r.finish(status_in(trailers).unwrap_or(tonic::Code::Unknown));
                }
            }
            Some(Err(_)) => {
                if let Some(mut r) = this.recorder.take() {
                    r.finish(tonic::Code::Internal);
                }
            }
            None => {
                if let Some(mut r) = this.recorder.take() {
                    r.finish(tonic::Code::Unknown);
                }
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Reads the request id the server layer attached to a request.
pub fn request_id_of<T>(req: &tonic::Request<T>) -> Option<Arc<str>> {
    req.extensions().get::<RequestId>().map(|r| r.0.clone())
}

/// The [`CallContext`] the server layer attached to a request.
pub fn call_context_of<T>(req: &tonic::Request<T>) -> Option<&CallContext> {
    req.extensions().get::<CallContext>()
}

/// The caller's deadline of a request, if it set one (`grpc-timeout`).
pub fn deadline_of<T>(req: &tonic::Request<T>) -> Option<Instant> {
    call_context_of(req).and_then(CallContext::deadline)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_failures_name_the_field_from_the_request_down() {
        let (f, d) = decode_failure_field(
            "Value.kind: Struct.fields: AuditEvent.metadata: AppendRequest.event: recursion limit reached",
        );
        assert_eq!(
            (f.as_str(), d.as_str()),
            ("event.metadata.fields.kind", "is not a valid encoding: recursion limit reached")
        );
        let deep = "Value.kind: Struct.fields: ".repeat(10) + "x: y";
        assert_eq!(decode_failure_field(&deep).0, "fields.kind.fields.kind.fields.kind.fields.kind…");
        let (f, d) = decode_failure_field("invalid wire type: LengthDelimited (expected Varint)");
        assert_eq!(
            (f.as_str(), d.as_str()),
            ("request", "is not a valid encoding: invalid wire type: LengthDelimited (expected Varint)")
        );
    }

    #[test]
    fn grpc_timeouts_parse_in_every_unit() {
        assert_eq!(parse_grpc_timeout("200m"), Some(Duration::from_millis(200)));
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout("2M"), Some(Duration::from_secs(120)));
        assert_eq!(parse_grpc_timeout("3S"), Some(Duration::from_secs(3)));
        assert_eq!(parse_grpc_timeout("99999999u"), Some(Duration::from_micros(99_999_999)));
        assert_eq!(parse_grpc_timeout("5n"), Some(Duration::from_nanos(5)));
        for bad in ["", "m", "123456789m", "10x", "-1m", "1.5S", "10 m"] {
            assert_eq!(parse_grpc_timeout(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn grpc_timeouts_format_finely_and_never_round_up() {
        assert_eq!(format_grpc_timeout(Duration::from_millis(200)).as_deref(), Some("200000u"));
        assert_eq!(format_grpc_timeout(Duration::from_nanos(99_999_999)).as_deref(), Some("99999999n"));
        assert_eq!(format_grpc_timeout(Duration::from_secs(30)).as_deref(), Some("30000000u"));
        assert_eq!(format_grpc_timeout(Duration::from_secs(3600 * 24)).as_deref(), Some("86400000m"));
        assert_eq!(format_grpc_timeout(Duration::from_secs(200_000)).as_deref(), Some("200000S"));
        assert_eq!(format_grpc_timeout(Duration::ZERO), None);
        // Round trip never grows.
        for ns in [1u64, 999, 1_234_567, 123_456_789_012, 987_654_321_000_000] {
            let d = Duration::from_nanos(ns);
            let back = parse_grpc_timeout(&format_grpc_timeout(d).unwrap()).unwrap();
            assert!(back <= d && back >= d.mul_f64(0.999_9), "{d:?} -> {back:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_context_is_current_inside_its_scope_only() {
        assert_eq!(CallContext::current(), None);
        let deadline = Instant::now() + Duration::from_millis(200);
        let ctx = CallContext::new("req-1", Some(deadline));
        ctx.clone()
            .scope(async {
                let cur = CallContext::current().expect("in scope");
                assert_eq!(cur.request_id(), "req-1");
                assert_eq!(cur.remaining(), Some(Duration::from_millis(200)));
                tokio::time::sleep(Duration::from_millis(150)).await;
                assert_eq!(cur.remaining(), Some(Duration::from_millis(50)));
                tokio::time::sleep(Duration::from_millis(100)).await;
                assert_eq!(cur.remaining(), Some(Duration::ZERO));
            })
            .await;
        assert_eq!(CallContext::current(), None);
    }
}

//! Trace propagation, the outermost layer: one client span per call with the
//! OpenTelemetry RPC semantic-convention attributes (`rpc.system`,
//! `rpc.service`, `rpc.method`, `rpc.grpc.status_code`, `server.address` and
//! `server.port` of the endpoint that answered, plus `network.peer.address`
//! when that endpoint came from a DNS name), the W3C
//! `traceparent`/`tracestate` of that span in the outgoing metadata, an
//! `x-request-id` (the caller's own, else the one of the call being handled,
//! else a fresh one), and the `grpc_client_*` metrics.
//!
//! It also turns every error from the layers below into the `tonic::Status`
//! the caller sees, so the status recorded on the span and in the metrics is
//! the one returned.

use std::{
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, ready},
    time::Instant,
};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response};
use http_body::Body;
use mesh_runtime::grpc::{CallContext, REQUEST_ID, code_name};
use pin_project_lite::pin_project;
use tonic::Code;
use tower::{Layer, Service};
use tracing::{Instrument, Span, field::Empty, instrument::Instrumented};

use crate::{
    error::{BoxError, into_status},
    metrics::{ClientMetrics, CodeLabels, MethodLabels},
    status::{Outcome, StatusBody, Watch, status_of_head},
};

/// Adds [`Trace`] to a service.
#[derive(Debug, Clone, Default)]
pub struct TraceLayer {
    metrics: ClientMetrics,
}

impl TraceLayer {
    /// A layer recording into `metrics`.
    pub fn new(metrics: ClientMetrics) -> Self {
        Self { metrics }
    }
}

impl<S> Layer<S> for TraceLayer {
    type Service = Trace<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Trace { inner, metrics: self.metrics.clone() }
    }
}

/// See the module docs.
#[derive(Debug, Clone)]
pub struct Trace<S> {
    inner: S,
    metrics: ClientMetrics,
}

/// A caller-supplied request id is kept only if it is short and printable
/// (the same rule the server applies).
fn valid_request_id(headers: &HeaderMap) -> Option<&str> {
    let v = headers.get(REQUEST_ID)?.to_str().ok()?;
    (!v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic())).then_some(v)
}

impl<S, ReqBody, B> Service<Request<ReqBody>> for Trace<S>
where
    S: Service<Request<ReqBody>, Response = Response<B>>,
    S::Error: Into<BoxError>,
    B: Body<Data = Bytes>,
{
    type Response = Response<StatusBody<B, Record>>;
    type Error = BoxError;
    type Future = TraceFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, mut req: Request<ReqBody>) -> Self::Future {
        let labels = MethodLabels::from_path(req.uri().path());
        let rid: Arc<str> = match valid_request_id(req.headers()) {
            Some(v) => v.into(),
            None => {
                let rid = CallContext::current().map(|c| c.request_id_arc()).unwrap_or_else(new_request_id);
                if let Ok(mut v) = HeaderValue::from_str(&rid) {
                    // Unique per call: never worth a slot in the HPACK table
                    // (it would evict the headers every call repeats).
                    v.set_sensitive(true);
                    req.headers_mut().insert(REQUEST_ID, v);
                }
                rid
            }
        };
        // `/package.Service/Method` without its slash is the span name the
        // conventions ask for; fields are recorded as `&str` (no formatting).
        let path = req.uri().path();
        let name = path.strip_prefix('/').unwrap_or(path);
        let span = tracing::info_span!(
            "grpc.client",
            otel.name = name,
            otel.kind = "client",
            otel.status_code = Empty,
            rpc.system = "grpc",
            rpc.service = &*labels.grpc_service,
            rpc.method = &*labels.grpc_method,
            rpc.grpc.status_code = Empty,
            server.address = Empty,
            server.port = Empty,
            network.peer.address = Empty,
            network.peer.port = Empty,
            request_id = &*rid,
        );
        mesh_runtime::trace_context::inject(
            &mesh_runtime::trace_context::context_of(&span),
            req.headers_mut(),
        );
        self.metrics.started.get_or_create(&labels).inc();
        // The layers below do their work when polled, inside the span.
        let fut = self.inner.call(req);
        TraceFuture {
            inner: fut.instrument(span.clone()),
            record: Some(Record { metrics: self.metrics.clone(), labels, start: Instant::now(), span }),
        }
    }
}

/// A fresh request id: a UUID v4 from the thread's CSPRNG (no system call
/// per id, unlike `Uuid::new_v4`).
fn new_request_id() -> Arc<str> {
    let bytes: [u8; 16] = rand::random();
    let mut buf = uuid::Uuid::encode_buffer();
    Arc::from(&*uuid::Builder::from_random_bytes(bytes).into_uuid().hyphenated().encode_lower(&mut buf))
}

/// Records a call's outcome on its span and in the metrics, once.
#[derive(Debug)]
pub struct Record {
    metrics: ClientMetrics,
    labels: MethodLabels,
    start: Instant,
    span: Span,
}

impl Record {
    fn finish_code(self, code: Code) {
        let m = &self.metrics;
        m.seconds.get_or_create(&self.labels).observe(self.start.elapsed().as_secs_f64());
        m.handled
            .get_or_create(&CodeLabels {
                grpc_service: self.labels.grpc_service.clone(),
                grpc_method: self.labels.grpc_method.clone(),
                grpc_code: code_name(code),
            })
            .inc();
        self.span.record("rpc.grpc.status_code", code as i32);
        // For client spans every status but OK is an error (OpenTelemetry gRPC conventions).
        if code != Code::Ok {
            self.span.record("otel.status_code", "ERROR");
        }
    }
}

impl Watch for Record {
    fn finish(self, outcome: Outcome) {
        self.finish_code(match outcome {
            Outcome::Status(code) => code,
            Outcome::Transport => Code::Unavailable,
            Outcome::Dropped => Code::Cancelled,
        });
    }
}

pin_project! {
    /// Future of [`Trace`].
    #[derive(Debug)]
    pub struct TraceFuture<F> {
        #[pin]
        inner: Instrumented<F>,
        record: Option<Record>,
    }
}

impl<F, B, E> Future for TraceFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
    E: Into<BoxError>,
{
    type Output = Result<Response<StatusBody<B, Record>>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = ready!(this.inner.poll(cx));
        let record = this.record.take().expect("polled after completion");
        Poll::Ready(match result {
            Ok(resp) => {
                let (parts, body) = resp.into_parts();
                let record = match status_of_head(parts.status, &parts.headers) {
                    Some(code) => {
                        record.finish_code(code);
                        None
                    }
                    None => Some(record),
                };
                Ok(Response::from_parts(parts, StatusBody::new(body, record)))
            }
            Err(e) => {
                let status = into_status(e.into());
                record.finish_code(status.code());
                Err(Box::new(status))
            }
        })
    }
}

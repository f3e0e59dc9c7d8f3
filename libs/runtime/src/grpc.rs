//! The server-side tower layer every mesh server runs behind: one server span
//! per RPC (parented on the caller's W3C trace context, with the OpenTelemetry
//! RPC semantic-convention attributes), an `x-request-id` on the span, the
//! request and the response, and the per-RPC Prometheus metrics.
//!
//! The gRPC status is read from the response headers (trailers-only
//! responses) or, for streamed bodies, from the trailers when the body ends;
//! a body dropped before its end counts as CANCELLED.

use std::{
    collections::HashSet,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, ready},
    time::Instant,
};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tower::{Layer, Service};
use tracing::{Instrument, Span, field::Empty};
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::metrics::{CodeLabels, MethodLabels, ServerMetrics};

/// Metadata key of the request id.
pub const REQUEST_ID: &str = "x-request-id";

/// The request id of the current call, also inserted into request extensions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestId(pub Arc<str>);

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
    /// `/package.Service/Method` paths the server really serves; anything else
    /// is labelled "unknown" so clients cannot blow up metric cardinality.
    known: HashSet<String>,
}

impl GrpcServerLayer {
    pub(crate) fn new(metrics: ServerMetrics, known: HashSet<String>) -> Self {
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
    RB: Body<Data = Bytes>,
{
    type Response = Response<ObservedBody<RB>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let start = Instant::now();
        let path = req.uri().path();
        let (service, method): (Arc<str>, Arc<str>) =
            match path.strip_prefix('/').and_then(|p| p.split_once('/')) {
                Some((s, m)) if self.shared.known.contains(path) => (s.into(), m.into()),
                _ => ("unknown".into(), "unknown".into()),
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

        let labels = MethodLabels { grpc_service: service, grpc_method: method };
        self.shared.metrics.started.get_or_create(&labels).inc();
        let fut = {
            let _entered = span.enter();
            self.inner.call(req)
        };
        ResponseFuture {
            inner: fut.instrument(span.clone()),
            recorder: Some(Recorder { shared: self.shared.clone(), labels, start, span, done: false }),
            rid,
        }
    }
}

/// Records the outcome of one RPC exactly once.
#[derive(Debug)]
struct Recorder {
    shared: Arc<Shared>,
    labels: MethodLabels,
    start: Instant,
    span: Span,
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
        // the client went away or the server gave up on the call.
        self.finish(tonic::Code::Cancelled);
    }
}

fn status_in(headers: &HeaderMap) -> Option<tonic::Code> {
    let v = headers.get("grpc-status")?.to_str().ok()?.parse::<i32>().ok()?;
    Some(tonic::Code::from_i32(v))
}

pin_project! {
    /// Future of [`GrpcServer`].
    #[derive(Debug)]
    pub struct ResponseFuture<F> {
        #[pin]
        inner: tracing::instrument::Instrumented<F>,
        recorder: Option<Recorder>,
        rid: Arc<str>,
    }
}

impl<F, RB, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<RB>, E>>,
    RB: Body<Data = Bytes>,
{
    type Output = Result<Response<ObservedBody<RB>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = ready!(this.inner.poll(cx));
        let mut recorder = this.recorder.take().expect("polled after completion");
        Poll::Ready(match result {
            Ok(resp) => {
                let (mut parts, body) = resp.into_parts();
                if let Ok(v) = HeaderValue::from_str(this.rid) {
                    parts.headers.insert(REQUEST_ID, v);
                }
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

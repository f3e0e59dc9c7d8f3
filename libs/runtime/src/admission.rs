//! Admission control, the same on every mesh server: how much work a server
//! takes on at once, and how it refuses the rest, fast.
//!
//! - **Calls in flight**: at most [`Limits::max_in_flight`] calls are being
//!   handled at once. A call past it waits for a slot, first come first
//!   served, for at most [`Limits::queue_wait`] (or the caller's
//!   `grpc-timeout`, if shorter), and is then **shed**: answered
//!   RESOURCE_EXHAUSTED (`"<service> overloaded: too many calls in flight, try
//!   again later"`) with a `google.rpc.RetryInfo` of [`SHED_RETRY_AFTER`],
//!   without running its handler, and counted in
//!   `mesh_server_shed_total{grpc_service, grpc_method}`.
//!   `mesh_server_in_flight` is the number being handled. A streaming call
//!   holds its slot until its response starts. Health
//!   (`grpc.health.v1.Health`) and reflection are never queued or shed, so
//!   probes and `grpcurl` still answer under overload.
//! - **Message size**: a request message longer than
//!   [`Limits::max_message_bytes`] is refused INVALID_ARGUMENT (the caller
//!   got it wrong; retrying will not help) before it is buffered; a response
//!   message longer than it ends the call RESOURCE_EXHAUSTED instead of
//!   being sent.
//! - **Connections**: at most [`Limits::max_connections`] open at once; one
//!   accepted past it is closed at once (counted in
//!   `mesh_server_connections_refused_total`), so the caller fails fast and
//!   tries another instance. `mesh_server_connections` is the number open.
//! - **Streams per connection**: HTTP/2 `SETTINGS_MAX_CONCURRENT_STREAMS` is
//!   [`Limits::max_concurrent_streams`]; a client keeps calls past it queued
//!   on its side (or opens another connection).

use std::{
    collections::HashMap,
    convert::Infallible,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, ready},
    time::Duration,
};

use bytes::Bytes;
use http::{HeaderMap, Request, Response};
use http_body::{Body as HttpBody, Frame, SizeHint};
use pin_project_lite::pin_project;
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    sync::{OwnedSemaphorePermit, Semaphore},
};
use tokio_stream::{Stream, StreamExt as _};
use tonic::transport::server::Connected;
use tonic::{Code, Status, body::Body, codegen::BoxFuture};
use tonic_types::{ErrorDetails, FieldViolation, StatusExt as _};
use tower::{Layer, Service};

use crate::{
    ConfigError, Lookup, LookupExt as _,
    config::{Var, keys},
    grpc::{GRPC_TIMEOUT, parse_grpc_timeout},
};

/// When a shed call is told to come back (`google.rpc.RetryInfo`): long
/// enough for the slots to have turned over many times at any sane rate.
pub const SHED_RETRY_AFTER: Duration = Duration::from_millis(250);

/// Length of a gRPC message's prefix: a compression flag and a big-endian `u32` length.
const PREFIX: usize = 5;

/// The admission limits of one server (see the module docs); read from
/// `MESH_MAX_IN_FLIGHT`, `MESH_QUEUE_WAIT_MS`, `MESH_MAX_MESSAGE_BYTES`,
/// `MESH_MAX_CONCURRENT_STREAMS` and `MESH_MAX_CONNECTIONS` by
/// [`crate::ServerConfig::from_lookup`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Calls handled at once (at least 1).
    pub max_in_flight: usize,
    /// Longest a call waits for a slot before it is shed (zero: shed at once).
    pub queue_wait: Duration,
    /// Largest request or response message, in bytes (1 KiB to 4 MiB).
    pub max_message_bytes: usize,
    /// HTTP/2 streams one connection may have open at once (at least 1).
    pub max_concurrent_streams: u32,
    /// Connections open at once (at least 1).
    pub max_connections: usize,
}

impl Limits {
    /// Largest [`Limits::max_message_bytes`]: tonic's own decoding limit of
    /// every generated service, which refuses larger requests anyway.
    pub const MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024;
    /// Smallest [`Limits::max_message_bytes`].
    pub const MIN_MESSAGE_BYTES: usize = 1024;

    /// Reads the limits; `defaults` apply to unset variables. A zero count,
    /// or a message size outside 1 KiB..=4 MiB, is an error naming the variable.
    pub fn from_lookup(l: &impl Lookup, defaults: Limits) -> Result<Self, ConfigError> {
        fn at_least_1<T: PartialOrd + From<u8>>(key: &'static str, v: T) -> Result<T, ConfigError> {
            if v < T::from(1) { Err(ConfigError::new(key, "must be at least 1")) } else { Ok(v) }
        }
        let max_message_bytes = l.parse_or(keys::MAX_MESSAGE_BYTES, defaults.max_message_bytes)?;
        if !(Self::MIN_MESSAGE_BYTES..=Self::MAX_MESSAGE_BYTES).contains(&max_message_bytes) {
            return Err(ConfigError::new(
                keys::MAX_MESSAGE_BYTES,
                format!("must be from {} to {} bytes", Self::MIN_MESSAGE_BYTES, Self::MAX_MESSAGE_BYTES),
            ));
        }
        Ok(Self {
            max_in_flight: at_least_1(
                keys::MAX_IN_FLIGHT,
                l.parse_or(keys::MAX_IN_FLIGHT, defaults.max_in_flight)?,
            )?,
            queue_wait: l.millis_or(keys::QUEUE_WAIT_MS, defaults.queue_wait)?,
            max_message_bytes,
            max_concurrent_streams: at_least_1(
                keys::MAX_CONCURRENT_STREAMS,
                l.parse_or(keys::MAX_CONCURRENT_STREAMS, defaults.max_concurrent_streams)?,
            )?,
            max_connections: at_least_1(
                keys::MAX_CONNECTIONS,
                l.parse_or(keys::MAX_CONNECTIONS, defaults.max_connections)?,
            )?,
        })
    }

    pub(crate) fn var_max_in_flight(d: &Self) -> Var {
        Var::value(
            keys::MAX_IN_FLIGHT,
            d.max_in_flight,
            "calls this server handles at once (health and reflection aside); more wait for a slot, \
             then are shed with RESOURCE_EXHAUSTED and google.rpc.RetryInfo (at least 1)",
        )
    }

    pub(crate) fn var_queue_wait(d: &Self) -> Var {
        Var::millis(
            keys::QUEUE_WAIT_MS,
            d.queue_wait,
            "longest a call waits for a slot before it is shed, or the caller's grpc-timeout if shorter \
             (ms; 0 sheds at once)",
        )
    }

    pub(crate) fn var_max_message_bytes(d: &Self) -> Var {
        Var::value(
            keys::MAX_MESSAGE_BYTES,
            d.max_message_bytes,
            "largest request message (longer: INVALID_ARGUMENT) and response message (longer: \
             RESOURCE_EXHAUSTED), in bytes, from 1024 to 4194304",
        )
    }

    pub(crate) fn var_max_concurrent_streams(d: &Self) -> Var {
        Var::value(
            keys::MAX_CONCURRENT_STREAMS,
            d.max_concurrent_streams,
            "HTTP/2 streams (calls) one client connection may have open at once; the client queues \
             the rest (at least 1)",
        )
    }

    pub(crate) fn var_max_connections(d: &Self) -> Var {
        Var::value(
            keys::MAX_CONNECTIONS,
            d.max_connections,
            "client connections open at once; one accepted past it is closed at once (at least 1)",
        )
    }
}

/// The defaults: 256 calls in flight is far more than the two cores of the
/// benchmark machine keep busy (the PostgreSQL- and Redis-bound handlers
/// mostly wait), yet bounds what a burst can pile up; a 20 ms queue wait
/// absorbs bursts shorter than a few calls' time without making a shed call
/// slow (shed calls answer in about the queue wait, admitted ones in
/// `max_in_flight / throughput`); 4 MiB is tonic's own decoding limit; 256
/// streams per connection bounds one connection's buffered request data
/// (each stream may buffer its flow-control window); 2048 connections stays
/// under common file-descriptor limits with room for outbound ones.
impl Default for Limits {
    fn default() -> Self {
        Self {
            max_in_flight: 256,
            queue_wait: Duration::from_millis(20),
            max_message_bytes: Self::MAX_MESSAGE_BYTES,
            max_concurrent_streams: 256,
            max_connections: 2048,
        }
    }
}

/// Paths never queued or shed: probes and tools must answer under overload.
fn exempt(path: &str) -> bool {
    path.starts_with("/grpc.health.v1.Health/") || path.starts_with("/grpc.reflection.")
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ShedLabels {
    grpc_service: Arc<str>,
    grpc_method: Arc<str>,
}

/// The admission state of one server: slots, connection permits, metrics.
#[derive(Debug)]
pub(crate) struct Admission {
    limits: Limits,
    slots: Arc<Semaphore>,
    connections: Arc<Semaphore>,
    /// What a shed call is told, per served service (the service's name in
    /// the message says which hop was overloaded).
    known: HashMap<String, (Arc<str>, Arc<str>)>,
    shed: Family<ShedLabels, Counter>,
    in_flight: Gauge,
    open_connections: Gauge,
    refused_connections: Counter,
}

impl Admission {
    /// Registers the admission metrics; `known` are the served
    /// `/package.Service/Method` paths (others are labelled `unknown`).
    pub(crate) fn register<'a>(
        limits: Limits,
        known: impl IntoIterator<Item = &'a String>,
        registry: &mut Registry,
    ) -> Arc<Self> {
        let known = known
            .into_iter()
            .filter_map(|path| {
                let (s, m) = path.strip_prefix('/')?.split_once('/')?;
                Some((path.clone(), (Arc::from(s), Arc::from(m))))
            })
            .collect();
        let a = Self {
            slots: Arc::new(Semaphore::new(limits.max_in_flight)),
            connections: Arc::new(Semaphore::new(limits.max_connections)),
            limits,
            known,
            shed: Family::default(),
            in_flight: Gauge::default(),
            open_connections: Gauge::default(),
            refused_connections: Counter::default(),
        };
        // Every method's series from the start: 0, not "no data".
        for (s, m) in a.known.iter().filter(|(path, _)| !exempt(path)).map(|(_, sm)| sm) {
            let _ = a.shed.get_or_create(&ShedLabels { grpc_service: s.clone(), grpc_method: m.clone() });
        }
        registry.register(
            "mesh_server_shed",
            "Calls answered RESOURCE_EXHAUSTED without being handled: no slot freed within the queue wait",
            a.shed.clone(),
        );
        registry.register(
            "mesh_server_in_flight",
            "Calls being handled now (health and reflection aside)",
            a.in_flight.clone(),
        );
        registry.register(
            "mesh_server_connections",
            "Client connections open now",
            a.open_connections.clone(),
        );
        registry.register(
            "mesh_server_connections_refused",
            "Connections closed on accept because the server had its maximum open",
            a.refused_connections.clone(),
        );
        Arc::new(a)
    }

    /// A permit for a newly accepted connection, or `None` (counted) when
    /// the server has its maximum open: the caller drops the socket.
    pub(crate) fn admit_connection(&self) -> Option<ConnectionPermit> {
        match self.connections.clone().try_acquire_owned() {
            Ok(permit) => {
                self.open_connections.inc();
                Some(ConnectionPermit { _permit: permit, open: self.open_connections.clone() })
            }
            Err(_) => {
                self.refused_connections.inc();
                None
            }
        }
    }

    /// A slot, or `None` (counted as shed) when none frees within the wait.
    async fn enter(&self, caller: Option<Duration>, labels: &ShedLabels) -> Option<Slot> {
        let permit = match self.slots.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                let wait = caller.map_or(self.limits.queue_wait, |c| c.min(self.limits.queue_wait));
                match tokio::time::timeout(wait, self.slots.clone().acquire_owned()).await {
                    Ok(Ok(p)) => p,
                    _ => {
                        self.shed.get_or_create(labels).inc();
                        return None;
                    }
                }
            }
        };
        self.in_flight.inc();
        Some(Slot { _permit: permit, in_flight: self.in_flight.clone() })
    }

    fn labels(&self, path: &str) -> ShedLabels {
        match self.known.get(path) {
            Some((s, m)) => ShedLabels { grpc_service: s.clone(), grpc_method: m.clone() },
            None => ShedLabels { grpc_service: "unknown".into(), grpc_method: "unknown".into() },
        }
    }
}

/// One open connection's share of [`Limits::max_connections`], given back
/// when the connection closes.
#[derive(Debug)]
pub(crate) struct ConnectionPermit {
    _permit: OwnedSemaphorePermit,
    open: Gauge,
}

impl Drop for ConnectionPermit {
    fn drop(&mut self) {
        self.open.dec();
    }
}

/// `incoming` with [`Limits::max_connections`] applied: a connection past
/// the limit is dropped (closed) as soon as it is accepted, and counted.
/// Under TLS the limit counts connections whose handshake is done.
pub(crate) fn limit_connections<IO>(
    incoming: impl Stream<Item = std::io::Result<IO>> + Send + 'static,
    admission: Arc<Admission>,
) -> impl Stream<Item = std::io::Result<Admitted<IO>>> + Send + 'static
where
    IO: Send + 'static,
{
    incoming.filter_map(move |conn| match conn {
        Ok(io) => {
            let permit = admission.admit_connection()?;
            Some(Ok(Admitted { io, _permit: permit }))
        }
        Err(e) => Some(Err(e)),
    })
}

pin_project! {
    /// A connection holding its share of [`Limits::max_connections`].
    #[derive(Debug)]
    pub(crate) struct Admitted<IO> {
        #[pin]
        io: IO,
        _permit: ConnectionPermit,
    }
}

impl<IO: AsyncRead> AsyncRead for Admitted<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        self.project().io.poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite> AsyncWrite for Admitted<IO> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        self.project().io.poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        self.project().io.poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.project().io.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.project().io.poll_shutdown(cx)
    }
}

impl<IO: Connected> Connected for Admitted<IO> {
    type ConnectInfo = IO::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

/// One call's slot, given back when the call ends or is dropped.
struct Slot {
    _permit: OwnedSemaphorePermit,
    in_flight: Gauge,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.in_flight.dec();
    }
}

/// The layer applying [`Admission`] to every call of a server.
#[derive(Debug, Clone)]
pub(crate) struct AdmissionLayer {
    admission: Arc<Admission>,
}

impl AdmissionLayer {
    pub(crate) fn new(admission: Arc<Admission>) -> Self {
        Self { admission }
    }
}

impl<S> Layer<S> for AdmissionLayer {
    type Service = Admit<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Admit { inner, admission: self.admission.clone() }
    }
}

/// The service of [`AdmissionLayer`].
#[derive(Debug, Clone)]
pub(crate) struct Admit<S> {
    inner: S,
    admission: Arc<Admission>,
}

impl<S> Service<Request<Body>> for Admit<S>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Infallible>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        // The clone that was polled ready serves this call.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let admission = self.admission.clone();
        let max = admission.limits.max_message_bytes;
        let req = req.map(|b| Body::new(MessageLimit::new(b, max, Direction::Request)));
        if exempt(req.uri().path()) {
            return Box::pin(inner.call(req));
        }
        Box::pin(async move {
            let labels = admission.labels(req.uri().path());
            let caller =
                req.headers().get(GRPC_TIMEOUT).and_then(|v| v.to_str().ok()).and_then(parse_grpc_timeout);
            let Some(_slot) = admission.enter(caller, &labels).await else {
                let details = ErrorDetails::with_retry_info(Some(SHED_RETRY_AFTER));
                let message =
                    format!("{} overloaded: too many calls in flight, try again later", labels.grpc_service);
                let status = Status::with_error_details(Code::ResourceExhausted, message, details);
                return Ok(status.into_http());
            };
            let resp = inner.call(req).await?;
            Ok(resp.map(|b| Body::new(MessageLimit::new(b, max, Direction::Response))))
        })
    }
}

/// Which way a [`MessageLimit`] body flows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Direction {
    Request,
    Response,
}

/// Finds gRPC message prefixes in a body's data, across chunks.
#[derive(Debug, Default)]
struct Scanner {
    prefix: [u8; PREFIX],
    have: usize,
    /// Bytes of the current message still to come.
    skip: usize,
}

impl Scanner {
    /// Scans `chunk`; the first message longer than `max` whose prefix it
    /// completes, as (offset in `chunk` where that prefix starts, clamped to
    /// 0 when it started in an earlier chunk, declared length).
    fn scan(&mut self, chunk: &[u8], max: usize) -> Option<(usize, usize)> {
        let mut i = 0;
        while i < chunk.len() {
            if self.skip > 0 {
                let n = self.skip.min(chunk.len() - i);
                self.skip -= n;
                i += n;
                continue;
            }
            let start = i.saturating_sub(self.have);
            let n = (PREFIX - self.have).min(chunk.len() - i);
            self.prefix[self.have..self.have + n].copy_from_slice(&chunk[i..i + n]);
            self.have += n;
            i += n;
            if self.have == PREFIX {
                self.have = 0;
                let len = u32::from_be_bytes([self.prefix[1], self.prefix[2], self.prefix[3], self.prefix[4]])
                    as usize;
                self.skip = len;
                if len > max {
                    return Some((start, len));
                }
            }
        }
        None
    }
}

pin_project! {
    /// A body whose gRPC messages may be at most `max` bytes long: a
    /// request body fails with INVALID_ARGUMENT at the prefix of a longer
    /// one (the decoder then answers that status, before buffering it); a
    /// response body sends what came before it and then ends with
    /// RESOURCE_EXHAUSTED trailers.
    struct MessageLimit<B> {
        #[pin]
        inner: B,
        max: usize,
        direction: Direction,
        scanner: Scanner,
        // Trailers to send next, then the end.
        ending: Option<HeaderMap>,
        ended: bool,
    }
}

impl<B> MessageLimit<B> {
    fn new(inner: B, max: usize, direction: Direction) -> Self {
        Self { inner, max, direction, scanner: Scanner::default(), ending: None, ended: false }
    }
}

impl<B> HttpBody for MessageLimit<B>
where
    B: HttpBody<Data = Bytes, Error = Status>,
{
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = self.project();
        if *this.ended {
            return Poll::Ready(None);
        }
        if let Some(trailers) = this.ending.take() {
            *this.ended = true;
            return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
        }
        let frame = match ready!(this.inner.poll_frame(cx)) {
            Some(Ok(frame)) => frame,
            other => return Poll::Ready(other),
        };
        let Some(data) = frame.data_ref() else { return Poll::Ready(Some(Ok(frame))) };
        let Some((at, len)) = this.scanner.scan(data, *this.max) else { return Poll::Ready(Some(Ok(frame))) };
        let max = *this.max;
        match this.direction {
            Direction::Request => {
                *this.ended = true;
                Poll::Ready(Some(Err(crate::grpc::invalid_argument(vec![FieldViolation::new(
                    "request",
                    format!("message of {len} bytes is longer than the limit of {max} bytes"),
                )]))))
            }
            Direction::Response => {
                let status = Status::resource_exhausted(format!(
                    "response message of {len} bytes is longer than the limit of {max} bytes; ask for less \
                     (a smaller page)"
                ));
                let mut trailers = HeaderMap::new();
                let _ = status.add_header(&mut trailers);
                if at == 0 {
                    *this.ended = true;
                    return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
                }
                *this.ending = Some(trailers);
                let data = frame.into_data().unwrap_or_default().slice(..at);
                Poll::Ready(Some(Ok(Frame::data(data))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ended || (self.ending.is_none() && self.inner.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        if self.ended || self.ending.is_some() { SizeHint::default() } else { self.inner.size_hint() }
    }
}

#[cfg(test)]
mod tests {
    use http_body_util::BodyExt as _;

    use super::*;

    fn message(len: usize) -> Vec<u8> {
        let mut m = vec![0u8];
        m.extend_from_slice(&(len as u32).to_be_bytes());
        m.extend(std::iter::repeat_n(7u8, len));
        m
    }

    #[test]
    fn the_scanner_finds_long_messages_across_chunks() {
        let mut s = Scanner::default();
        let mut stream = message(10);
        stream.extend(message(3));
        stream.extend(message(100));
        // Whole: the long one's prefix starts after the first two.
        assert_eq!(Scanner::default().scan(&stream, 50), Some((15 + 8, 100)));
        // One byte at a time: found at the byte completing its prefix.
        let found: Vec<_> =
            stream.iter().enumerate().filter_map(|(i, b)| s.scan(&[*b], 50).map(|f| (i, f))).collect();
        assert_eq!(found, vec![(15 + 8 + 4, (0, 100))]);
        assert_eq!(Scanner::default().scan(&stream, 100), None);
    }

    fn body(chunks: Vec<Vec<u8>>) -> Body {
        let frames = chunks.into_iter().map(|c| Ok::<_, Status>(Frame::data(Bytes::from(c))));
        Body::new(http_body_util::StreamBody::new(tokio_stream::iter(frames)))
    }

    #[tokio::test]
    async fn a_long_request_message_is_invalid_argument() {
        let b = MessageLimit::new(body(vec![message(10), message(2000)]), 1024, Direction::Request);
        let err = b.collect().await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
        assert!(err.message().contains("2000 bytes is longer than the limit of 1024"), "{err:?}");
        let ok = MessageLimit::new(body(vec![message(1024)]), 1024, Direction::Request);
        assert_eq!(ok.collect().await.unwrap().to_bytes().len(), 1024 + PREFIX);
    }

    #[tokio::test]
    async fn a_long_response_message_ends_the_call_resource_exhausted() {
        let mut chunk = message(10);
        chunk.extend(message(5000));
        let b = MessageLimit::new(body(vec![chunk]), 1024, Direction::Response);
        let collected = b.collect().await.unwrap();
        let trailers = collected.trailers().cloned().expect("trailers");
        assert_eq!(collected.to_bytes().len(), 10 + PREFIX, "what came before is sent");
        let status = Status::from_header_map(&trailers).expect("a status");
        assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    }
}

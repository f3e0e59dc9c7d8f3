//! Retries: only when repeating cannot do harm, only for codes worth
//! repeating, with jittered exponential backoff, within the call's deadline,
//! and within a budget so that retries cannot multiply the load on a service
//! that is already failing.
//!
//! - **What is repeated**: an attempt that never reached a server (refused
//!   connection, that endpoint's breaker open) is repeated for any method.
//!   An attempt that may have reached one is repeated only for idempotent
//!   methods ([`RetryPolicy`], or [`Idempotency`] on the request), when it
//!   failed with a retryable code in a trailers-only answer (UNAVAILABLE by
//!   default), broke in flight, or hit its per-try timeout. A response
//!   whose headers said OK is never repeated: its status is in the trailers,
//!   after the body was handed to the caller. Calls that fail fast because
//!   every breaker is open are not repeated either.
//! - **Backoff**: retry `n` (from 0) waits `base × 2^n`, capped so that with
//!   10–30 % jitter added it never exceeds `max` ([`Backoff`]); a wait that
//!   would outlast the deadline is not started.
//! - **Server pushback** (in a trailers-only answer that is otherwise
//!   retryable): `grpc-retry-pushback-ms` as gRPC proposal A6 says — a
//!   negative or malformed value means do not retry, otherwise the next
//!   attempt waits exactly that long and the backoff starts over; without it,
//!   a `google.rpc.RetryInfo` in `grpc-status-details-bin` makes the wait at
//!   least its `retry_delay`. A server wait longer than `backoff_max` (or the
//!   deadline) is not waited here: the answer goes back to the caller, whose
//!   business it is to come back later.
//! - **Budget**: tower's [`TpsBudget`]: every call deposits, every retry
//!   withdraws; by default retries may add 20 % to the load, plus 10 per
//!   second so that quiet clients can retry too.
//! - **Replay**: the request body is buffered (up to a bound) to be sent
//!   again. Bodies that are not complete at once (client streams) or larger
//!   than the bound are sent as they are, and the call is not repeated.
//! - A repeated attempt avoids the endpoints that already failed it when the
//!   balancer has others.

use std::{
    collections::{HashSet, VecDeque},
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll, Waker},
    time::Duration,
};

use bytes::Bytes;
use futures::future::BoxFuture;
use http::{Request, Response};
use http_body::{Body as _, Frame};
use tokio::time::Instant;
use tonic::{Code, body::Body};
use tonic_types::StatusExt as _;
use tower::{
    Layer, Service, ServiceExt,
    retry::budget::{Budget, TpsBudget},
};

use crate::{
    backoff::Backoff,
    deadline::Deadline,
    error::{BoxError, Failure, failure_of},
    metrics::{ClientMetrics, MethodLabels, RetryLabels},
    status::status_of_head,
};

/// How much and how fast to retry.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryConfig {
    /// Attempts per call, the first included (1: never retry).
    pub max_attempts: u32,
    /// Wait before the first retry (before jitter).
    pub backoff_base: Duration,
    /// Longest wait between attempts, jitter included.
    pub backoff_max: Duration,
    /// Codes worth repeating for idempotent methods.
    pub retryable_codes: Vec<Code>,
    /// Share of calls that may be retried, on top of `budget_min_per_sec` (0.2: 20 %).
    pub budget_ratio: f32,
    /// Retries per second always allowed.
    pub budget_min_per_sec: u32,
    /// How long a call counts towards the budget (1–60 s).
    pub budget_ttl: Duration,
    /// Request bodies up to this size are kept to be sent again.
    pub buffer_limit: usize,
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            max_attempts: 3,
            backoff_base: Duration::from_millis(25),
            backoff_max: Duration::from_secs(1),
            retryable_codes: vec![Code::Unavailable],
            budget_ratio: 0.2,
            budget_min_per_sec: 10,
            budget_ttl: Duration::from_secs(10),
            buffer_limit: 64 * 1024,
        }
    }
}

/// Request extension: whether this call may be repeated after it reached a
/// server, overriding the [`RetryPolicy`] (e.g. an audit `Append` is
/// idempotent only when it carries an idempotency key).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Idempotency {
    /// Doing it twice is the same as doing it once.
    Idempotent,
    /// Doing it twice may do it twice.
    NotIdempotent,
}

/// Which methods are idempotent (`/package.Service/Method`); others are not.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RetryPolicy {
    idempotent: HashSet<String>,
}

impl RetryPolicy {
    /// A policy treating `methods` as idempotent.
    pub fn idempotent<I, M>(methods: I) -> Self
    where
        I: IntoIterator<Item = M>,
        M: Into<String>,
    {
        Self { idempotent: methods.into_iter().map(Into::into).collect() }
    }

    fn is_idempotent<B>(&self, req: &Request<B>) -> bool {
        match req.extensions().get::<Idempotency>() {
            Some(i) => *i == Idempotency::Idempotent,
            None => self.idempotent.contains(req.uri().path()),
        }
    }
}

/// Why an attempt is repeated (the `reason` label of `mesh_client_retries_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryReason {
    /// Nothing was sent.
    NotSent,
    /// A retryable status.
    Status,
    /// The connection broke in flight.
    Transport,
    /// The per-try timeout fired.
    Timeout,
}

impl RetryReason {
    fn as_str(self) -> &'static str {
        match self {
            Self::NotSent => "not_sent",
            Self::Status => "status",
            Self::Transport => "transport",
            Self::Timeout => "timeout",
        }
    }
}

/// What an attempt's result allows, before budget, attempts and deadline.
fn retry_reason<B>(
    result: &Result<Response<B>, BoxError>,
    idempotent: bool,
    retryable: &[Code],
) -> Option<RetryReason> {
    match result {
        Ok(resp) => match status_of_head(resp.status(), resp.headers()) {
            Some(code) if idempotent && retryable.contains(&code) => Some(RetryReason::Status),
            _ => None,
        },
        Err(e) => match failure_of(e.as_ref()) {
            Failure::NotSent => Some(RetryReason::NotSent),
            Failure::FailFast => None,
            Failure::Timeout => idempotent.then_some(RetryReason::Timeout),
            Failure::Transport => idempotent.then_some(RetryReason::Transport),
        },
    }
}

/// What the server said about retrying, in a trailers-only answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pushback {
    /// Nothing: the client's own backoff decides.
    None,
    /// `grpc-retry-pushback-ms` negative or malformed: do not retry (gRPC A6).
    Refuse,
    /// `grpc-retry-pushback-ms`: retry after exactly this long.
    Exactly(Duration),
    /// `google.rpc.RetryInfo`: wait at least this long.
    AtLeast(Duration),
}

/// The server's pushback in an attempt's trailers-only answer (see the module docs).
fn pushback<B>(result: &Result<Response<B>, BoxError>) -> Pushback {
    let Ok(resp) = result else { return Pushback::None };
    let headers = resp.headers();
    if let Some(v) = headers.get(PUSHBACK) {
        return match v.to_str().ok().and_then(|v| v.trim().parse::<i64>().ok()) {
            Some(ms) if ms >= 0 => Pushback::Exactly(Duration::from_millis(ms.unsigned_abs())),
            _ => Pushback::Refuse,
        };
    }
    if headers.contains_key("grpc-status-details-bin")
        && let Some(status) = tonic::Status::from_header_map(headers)
        && let Some(delay) = status.get_details_retry_info().and_then(|i| i.retry_delay)
    {
        return Pushback::AtLeast(delay);
    }
    Pushback::None
}

/// The gRPC retry pushback header (gRPC proposal A6), milliseconds.
pub const PUSHBACK: &str = "grpc-retry-pushback-ms";

/// Request extension shared by the attempts of one call: the endpoints that
/// already had a go, so that the balancer can pick another.
#[derive(Debug, Clone, Default)]
pub struct Attempts(Arc<Mutex<Vec<Arc<str>>>>);

impl Attempts {
    /// Endpoints tried so far, in order.
    pub fn tried(&self) -> Vec<Arc<str>> {
        self.0.lock().expect("not poisoned").clone()
    }

    /// Whether no endpoint had a go yet.
    pub fn is_empty(&self) -> bool {
        self.0.lock().expect("not poisoned").is_empty()
    }

    /// Whether `endpoint` had a go.
    pub fn contains(&self, endpoint: &str) -> bool {
        self.0.lock().expect("not poisoned").iter().any(|e| &**e == endpoint)
    }

    /// Records that `endpoint` gets this attempt.
    pub fn push(&self, endpoint: Arc<str>) {
        self.0.lock().expect("not poisoned").push(endpoint);
    }

    fn last(&self) -> Option<Arc<str>> {
        self.0.lock().expect("not poisoned").last().cloned()
    }
}

/// A request body kept to be sent again, or one that can be sent once only.
enum Replay {
    Buffered(Bytes),
    Once(Option<Body>),
}

impl Replay {
    /// Reads what `body` has ready without waiting (a unary request is
    /// encoded when polled): complete within `limit` → replayable.
    fn new(mut body: Body, limit: usize) -> Self {
        let mut cx = Context::from_waker(Waker::noop());
        let mut frames: VecDeque<Frame<Bytes>> = VecDeque::new();
        let mut size = 0usize;
        loop {
            if body.is_end_stream() {
                return Replay::Buffered(concat(frames));
            }
            match Pin::new(&mut body).poll_frame(&mut cx) {
                Poll::Ready(None) => return Replay::Buffered(concat(frames)),
                Poll::Ready(Some(Ok(frame))) if frame.is_data() => {
                    size += frame.data_ref().map_or(0, Bytes::len);
                    frames.push_back(frame);
                    if size > limit {
                        return Replay::once(frames, Some(body), None);
                    }
                }
                // Trailers in a request or an error: pass it on as it is.
                Poll::Ready(Some(Ok(frame))) => {
                    frames.push_back(frame);
                    return Replay::once(frames, Some(body), None);
                }
                Poll::Ready(Some(Err(e))) => return Replay::once(frames, None, Some(e)),
                Poll::Pending => return Replay::once(frames, Some(body), None),
            }
        }
    }

    fn once(frames: VecDeque<Frame<Bytes>>, rest: Option<Body>, error: Option<tonic::Status>) -> Self {
        Replay::Once(Some(Body::new(Prefixed { frames, rest, error })))
    }

    /// The body for the next attempt; `None` if it cannot be sent again.
    fn body(&mut self) -> Option<Body> {
        match self {
            Replay::Buffered(b) if b.is_empty() => Some(Body::empty()),
            Replay::Buffered(b) => Some(Body::new(http_body_util::Full::new(b.clone()))),
            Replay::Once(b) => b.take(),
        }
    }

    fn replayable(&self) -> bool {
        matches!(self, Replay::Buffered(_))
    }
}

fn concat(frames: VecDeque<Frame<Bytes>>) -> Bytes {
    let mut chunks: Vec<Bytes> = frames.into_iter().filter_map(|f| f.into_data().ok()).collect();
    match chunks.len() {
        0 => Bytes::new(),
        1 => chunks.pop().expect("one chunk"),
        _ => chunks.concat().into(),
    }
}

/// Frames already read, then the rest of the body.
struct Prefixed {
    frames: VecDeque<Frame<Bytes>>,
    rest: Option<Body>,
    error: Option<tonic::Status>,
}

impl http_body::Body for Prefixed {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, tonic::Status>>> {
        if let Some(f) = self.frames.pop_front() {
            return Poll::Ready(Some(Ok(f)));
        }
        if let Some(e) = self.error.take() {
            return Poll::Ready(Some(Err(e)));
        }
        match self.rest.as_mut() {
            Some(rest) => Pin::new(rest).poll_frame(cx),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.frames.is_empty() && self.error.is_none() && self.rest.as_ref().is_none_or(|r| r.is_end_stream())
    }
}

struct Shared {
    config: RetryConfig,
    backoff: Backoff,
    policy: RetryPolicy,
    budget: TpsBudget,
    metrics: ClientMetrics,
}

/// Adds [`Retry`] to a service. Services built from one layer share its budget.
#[derive(Clone)]
pub struct RetryLayer {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for RetryLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RetryLayer")
            .field("config", &self.shared.config)
            .field("budget", &self.shared.budget)
            .finish()
    }
}

impl RetryLayer {
    /// A layer retrying as `config` says, `policy` naming the idempotent methods.
    pub fn new(config: RetryConfig, policy: RetryPolicy, metrics: ClientMetrics) -> Self {
        let budget = TpsBudget::new(
            config.budget_ttl.clamp(Duration::from_secs(1), Duration::from_secs(60)),
            config.budget_min_per_sec,
            config.budget_ratio.clamp(0.0, 1000.0),
        );
        let backoff = Backoff::new(config.backoff_base, config.backoff_max);
        Self { shared: Arc::new(Shared { config, backoff, policy, budget, metrics }) }
    }
}

impl<S> Layer<S> for RetryLayer {
    type Service = Retry<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Retry { inner, shared: self.shared.clone() }
    }
}

/// See the module docs.
#[derive(Clone)]
pub struct Retry<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S: std::fmt::Debug> std::fmt::Debug for Retry<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Retry").field("inner", &self.inner).finish()
    }
}

impl<S, B> Service<Request<Body>> for Retry<S>
where
    S: Service<Request<Body>, Response = Response<B>> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = Response<B>;
    type Error = BoxError;
    type Future = BoxFuture<'static, Result<Response<B>, BoxError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        // The clone that was polled ready serves the first attempt.
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        let shared = self.shared.clone();
        Box::pin(retry(inner, shared, req))
    }
}

async fn retry<S, B>(mut inner: S, shared: Arc<Shared>, req: Request<Body>) -> Result<Response<B>, BoxError>
where
    S: Service<Request<Body>, Response = Response<B>>,
    S::Error: Into<BoxError>,
{
    let config = &shared.config;
    let idempotent = shared.policy.is_idempotent(&req);
    let deadline = req.extensions().get::<Deadline>().map(|d| d.0);
    let (mut parts, body) = req.into_parts();
    let mut replay = Replay::new(body, config.buffer_limit);
    let attempts = Attempts::default();
    parts.extensions.insert(attempts.clone());
    shared.budget.deposit();

    let mut sent = 0u32;
    // Retries since the last server pushback (A6: a pushback restarts the backoff).
    let mut backoff_n = 0u32;
    loop {
        let body = replay.body().expect("a body for every attempt made");
        let req = Request::from_parts(parts.clone(), body);
        let result = match inner.ready().await.map_err(Into::<BoxError>::into) {
            Ok(svc) => svc.call(req).await.map_err(Into::into),
            Err(e) => Err(e),
        };
        sent += 1;
        let Some(reason) = retry_reason(&result, idempotent, &config.retryable_codes) else {
            return result;
        };
        if !replay.replayable() || sent >= config.max_attempts {
            return result;
        }
        let wait = match pushback(&result) {
            Pushback::Refuse => return result,
            Pushback::Exactly(d) | Pushback::AtLeast(d) if d > config.backoff_max => return result,
            Pushback::Exactly(d) => {
                backoff_n = 0;
                d
            }
            Pushback::AtLeast(d) => {
                backoff_n = 0;
                d.max(shared.backoff.delay(0))
            }
            Pushback::None => {
                backoff_n += 1;
                shared.backoff.delay(backoff_n - 1)
            }
        };
        if deadline.is_some_and(|d| Instant::now() + wait >= d) {
            return result;
        }
        let labels = MethodLabels::from_path(parts.uri.path());
        if !shared.budget.withdraw() {
            shared.metrics.retries_throttled.get_or_create(&labels).inc();
            tracing::debug!(method = %parts.uri.path(), "retry budget spent, not retrying");
            return result;
        }
        shared
            .metrics
            .retries
            .get_or_create(&RetryLabels {
                grpc_service: labels.grpc_service,
                grpc_method: labels.grpc_method,
                reason: reason.as_str(),
            })
            .inc();
        let error = match &result {
            Ok(resp) => status_of_head(resp.status(), resp.headers()).map(|c| format!("{c:?}")),
            Err(e) => Some(e.to_string()),
        };
        tracing::info!(
            attempt = sent,
            reason = reason.as_str(),
            endpoint = attempts.last().as_deref().unwrap_or("none"),
            error = error.as_deref().unwrap_or(""),
            backoff_ms = wait.as_millis() as u64,
            "retrying"
        );
        drop(result);
        tokio::time::sleep(wait).await;
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use http::HeaderMap;
    use http_body_util::BodyExt;

    use super::*;
    use crate::error::Error;

    const MS: Duration = Duration::from_millis(1);

    fn trailers_only(code: Code) -> Result<Response<()>, BoxError> {
        let mut resp = Response::new(());
        resp.headers_mut().insert("grpc-status", (code as i32).to_string().parse().unwrap());
        Ok(resp)
    }

    #[test]
    fn only_safe_cases_and_retryable_codes_are_repeated() {
        let codes = [Code::Unavailable];
        let refused: BoxError = Box::new(tonic::ConnectError(Box::new(std::io::Error::from(
            std::io::ErrorKind::ConnectionRefused,
        ))));
        let open: BoxError = Box::new(Error::EndpointOpen { endpoint: "e".into() });
        let all_open: BoxError = Box::new(Error::AllOpen { upstream: "u".into(), endpoints: 2 });
        let reset: BoxError = Box::new(std::io::Error::from(std::io::ErrorKind::ConnectionReset));
        let timeout: BoxError = Box::new(Error::Timeout(MS));
        let ok: Result<Response<()>, BoxError> = Ok(Response::new(()));

        // Never sent: any method.
        assert_eq!(retry_reason::<()>(&Err(refused), false, &codes), Some(RetryReason::NotSent));
        assert_eq!(retry_reason::<()>(&Err(open), false, &codes), Some(RetryReason::NotSent));
        // Reached a server: idempotent only, retryable codes only.
        assert_eq!(retry_reason(&trailers_only(Code::Unavailable), true, &codes), Some(RetryReason::Status));
        assert_eq!(retry_reason(&trailers_only(Code::Unavailable), false, &codes), None);
        for code in [Code::InvalidArgument, Code::NotFound, Code::Aborted, Code::Internal, Code::Ok] {
            assert_eq!(retry_reason(&trailers_only(code), true, &codes), None, "{code:?}");
        }
        assert_eq!(retry_reason::<()>(&Err(reset), true, &codes), Some(RetryReason::Transport));
        assert_eq!(retry_reason::<()>(&Err(timeout), false, &codes), None);
        // Fail-fast errors and answers whose status is in the trailers: never.
        assert_eq!(retry_reason::<()>(&Err(all_open), true, &codes), None);
        assert_eq!(retry_reason(&ok, true, &codes), None);
    }

    /// Fails the first `failures` calls with `code` (trailers-only), then
    /// answers OK; records the bodies and the endpoints tried.
    #[derive(Clone)]
    struct Flaky {
        failures: usize,
        code: Code,
        calls: Arc<AtomicUsize>,
        bodies: Arc<Mutex<Vec<Bytes>>>,
    }

    impl Flaky {
        fn new(failures: usize, code: Code) -> Self {
            Self { failures, code, calls: Arc::default(), bodies: Arc::default() }
        }
    }

    impl Service<Request<Body>> for Flaky {
        type Response = Response<()>;
        type Error = BoxError;
        type Future = BoxFuture<'static, Result<Response<()>, BoxError>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, req: Request<Body>) -> Self::Future {
            let n = self.calls.fetch_add(1, Ordering::SeqCst);
            if let Some(a) = req.extensions().get::<Attempts>() {
                a.push(format!("e{n}").into());
            }
            let (fail, code, bodies) = (n < self.failures, self.code, self.bodies.clone());
            Box::pin(async move {
                let body = req.into_body().collect().await?.to_bytes();
                bodies.lock().unwrap().push(body);
                if fail { trailers_only(code) } else { Ok(Response::new(())) }
            })
        }
    }

    fn request(path: &str, body: &'static [u8]) -> Request<Body> {
        let mut req = Request::new(Body::new(http_body_util::Full::new(Bytes::from_static(body))));
        *req.uri_mut() = path.parse().unwrap();
        req
    }

    fn layer(config: RetryConfig) -> (RetryLayer, ClientMetrics) {
        let m = ClientMetrics::default();
        (RetryLayer::new(config, RetryPolicy::idempotent(["/a.B/Get"]), m.clone()), m)
    }

    #[tokio::test(start_paused = true)]
    async fn idempotent_calls_are_repeated_with_the_same_body_after_backing_off() {
        let flaky = Flaky::new(2, Code::Unavailable);
        let (layer, metrics) = layer(RetryConfig::default());
        let mut svc = layer.layer(flaky.clone());
        let start = Instant::now();
        let resp = svc.call(request("/a.B/Get", b"payload")).await.unwrap();
        assert!(resp.headers().get("grpc-status").is_none(), "third attempt answered");
        assert_eq!(*flaky.bodies.lock().unwrap(), vec![Bytes::from_static(b"payload"); 3]);
        // 25 ms and 50 ms, each plus 10–30 %.
        let waited = start.elapsed();
        assert!(waited >= 82 * MS && waited <= 98 * MS, "{waited:?}");
        let labels = RetryLabels { grpc_service: "a.B".into(), grpc_method: "Get".into(), reason: "status" };
        assert_eq!(metrics.retries.get_or_create(&labels).get(), 2);

        // A method the policy does not know is not repeated once it reached a server.
        let flaky = Flaky::new(1, Code::Unavailable);
        let mut svc = layer.layer(flaky.clone());
        let resp = svc.call(request("/a.B/Put", b"x")).await.unwrap();
        assert_eq!(resp.headers()["grpc-status"], "14");
        assert_eq!(flaky.calls.load(Ordering::SeqCst), 1);
        // Unless the request says it is idempotent.
        let flaky = Flaky::new(1, Code::Unavailable);
        let mut svc = layer.layer(flaky.clone());
        let mut req = request("/a.B/Put", b"x");
        req.extensions_mut().insert(Idempotency::Idempotent);
        svc.call(req).await.unwrap();
        assert_eq!(flaky.calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn attempts_stop_at_the_limit_and_before_the_deadline() {
        let flaky = Flaky::new(10, Code::Unavailable);
        let (layer, _) = layer(RetryConfig { max_attempts: 4, ..RetryConfig::default() });
        let mut svc = layer.layer(flaky.clone());
        let resp = svc.call(request("/a.B/Get", b"x")).await.unwrap();
        assert_eq!(resp.headers()["grpc-status"], "14", "the last answer is returned");
        assert_eq!(flaky.calls.load(Ordering::SeqCst), 4);

        // 40 ms left: room for the first wait (≤ 32.5 ms), not for the second (≥ 55 ms).
        let flaky = Flaky::new(10, Code::Unavailable);
        let mut svc = layer.layer(flaky.clone());
        let start = Instant::now();
        let mut req = request("/a.B/Get", b"x");
        req.extensions_mut().insert(Deadline(start + 40 * MS));
        svc.call(req).await.unwrap();
        assert_eq!(flaky.calls.load(Ordering::SeqCst), 2);
        assert!(start.elapsed() < 40 * MS);
    }

    #[tokio::test(start_paused = true)]
    async fn the_budget_caps_retries_during_an_outage() {
        // No free retries: 10 % of calls may be retried.
        let config = RetryConfig { budget_ratio: 0.1, budget_min_per_sec: 0, ..RetryConfig::default() };
        let (layer, metrics) = layer(config);
        let flaky = Flaky::new(usize::MAX, Code::Unavailable);
        let mut svc = layer.layer(flaky.clone());
        for _ in 0..100 {
            svc.call(request("/a.B/Get", b"x")).await.unwrap();
        }
        let calls = flaky.calls.load(Ordering::SeqCst);
        // Without a budget: 300 attempts. With it: about 10 retries.
        assert!((105..=115).contains(&calls), "{calls} attempts for 100 calls");
        let labels = MethodLabels { grpc_service: "a.B".into(), grpc_method: "Get".into() };
        assert!(metrics.retries_throttled.get_or_create(&labels).get() >= 85);
    }

    #[tokio::test(start_paused = true)]
    async fn calls_that_were_never_sent_are_repeated_on_another_endpoint() {
        // Refuses the first connection, for a method that is not idempotent.
        let calls = Arc::new(AtomicUsize::new(0));
        let tried = Arc::new(Mutex::new(Vec::new()));
        let svc = tower::service_fn({
            let (calls, tried) = (calls.clone(), tried.clone());
            move |req: Request<Body>| {
                let n = calls.fetch_add(1, Ordering::SeqCst);
                let attempts = req.extensions().get::<Attempts>().cloned().unwrap();
                tried.lock().unwrap().push(attempts.tried());
                attempts.push(format!("e{n}").into());
                async move {
                    if n == 0 {
                        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
                        Err::<Response<()>, BoxError>(Box::new(tonic::ConnectError(Box::new(refused))))
                    } else {
                        Ok(Response::new(()))
                    }
                }
            }
        });
        let (layer, _) = layer(RetryConfig::default());
        layer.layer(svc).call(request("/a.B/Put", b"x")).await.unwrap();
        let e0: Arc<str> = "e0".into();
        assert_eq!(*tried.lock().unwrap(), vec![vec![], vec![e0]], "the second attempt knows what failed");
    }

    /// A body that is not complete when first polled (a client stream).
    struct Streaming(usize);

    impl http_body::Body for Streaming {
        type Data = Bytes;
        type Error = tonic::Status;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, tonic::Status>>> {
            self.0 += 1;
            match self.0 {
                1 => Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(b"first"))))),
                2 => {
                    cx.waker().wake_by_ref();
                    Poll::Pending
                }
                3 => Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(b"second"))))),
                _ => Poll::Ready(None),
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn bodies_that_cannot_be_replayed_are_sent_once_and_intact() {
        let (layer, _) = layer(RetryConfig { buffer_limit: 4, ..RetryConfig::default() });
        // Over the bound.
        let flaky = Flaky::new(1, Code::Unavailable);
        layer.layer(flaky.clone()).call(request("/a.B/Get", b"too large")).await.unwrap();
        assert_eq!(*flaky.bodies.lock().unwrap(), vec![Bytes::from_static(b"too large")]);
        // Still streaming.
        let flaky = Flaky::new(1, Code::Unavailable);
        let mut req = Request::new(Body::new(Streaming(0)));
        *req.uri_mut() = "/a.B/Get".parse().unwrap();
        layer.layer(flaky.clone()).call(req).await.unwrap();
        assert_eq!(*flaky.bodies.lock().unwrap(), vec![Bytes::from_static(b"firstsecond")]);
        assert_eq!(flaky.calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_tonic_unary_request_is_complete_at_once_and_replayed() {
        // What tonic's generated clients send: an encoded message, ready when polled.
        let flaky = Flaky::new(1, Code::Unavailable);
        let (layer, _) = layer(RetryConfig::default());
        let svc = layer.layer(flaky.clone()).map_response(|r: Response<()>| {
            let mut trailers = HeaderMap::new();
            trailers.insert("grpc-status", "0".parse().unwrap());
            let body = http_body_util::Empty::<Bytes>::new().with_trailers(async move { Some(Ok(trailers)) });
            r.map(|()| Body::new(body))
        });
        let mut grpc = tonic::client::Grpc::new(svc);
        grpc.ready().await.unwrap();
        let payload = mesh_testkit::echo::EchoRequest { payload: b"hello".to_vec(), delay_ms: 0 };
        let mut req = tonic::Request::new(payload.clone());
        req.extensions_mut().insert(Idempotency::Idempotent);
        let err = grpc
            .unary::<_, mesh_testkit::echo::EchoResponse, _>(
                req,
                "/mesh.testkit.echo.v1.EchoService/Echo".parse().unwrap(),
                tonic_prost::ProstCodec::default(),
            )
            .await
            .unwrap_err();
        // The answer has no message (this fake sends none); what matters is what was sent.
        assert_eq!(err.code(), Code::Internal, "{err:?}");
        let bodies = flaky.bodies.lock().unwrap().clone();
        assert_eq!(bodies.len(), 2, "retried once");
        assert_eq!(bodies[0], bodies[1]);
        assert_eq!(bodies[0].len(), 5 + prost::Message::encoded_len(&payload));
    }
}

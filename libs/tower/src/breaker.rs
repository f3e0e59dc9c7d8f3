//! The circuit breaker, one per endpoint, built on `failsafe`'s
//! [`StateMachine`] and failure policies.
//!
//! - **Failure accrual**: failsafe's consecutive-failures policy *or* its
//!   success-rate-over-a-window policy trips the breaker, whichever first.
//!   Only what says the *endpoint* is unhealthy counts: the gRPC codes of
//!   [`BreakerConfig::failure_codes`] — by default UNAVAILABLE (down,
//!   draining, overloaded proxy), DEADLINE_EXCEEDED, and the server-fault
//!   codes INTERNAL, UNKNOWN (also a response that ended without a status)
//!   and DATA_LOSS — broken connections, and attempt timeouts (the timeout
//!   sits inside the breaker, so a slow call counts). A timeout counts only
//!   when the attempt started with at least
//!   [`BreakerConfig::min_timeout_budget`] of its deadline left: a caller's
//!   own short deadline says nothing about the endpoint. Answers that refuse
//!   *this caller* prove the endpoint works and count as successes:
//!   RESOURCE_EXHAUSTED (a rate-limited user, a shed call), INVALID_ARGUMENT,
//!   NOT_FOUND, ALREADY_EXISTS, UNAUTHENTICATED, PERMISSION_DENIED, ABORTED,
//!   FAILED_PRECONDITION, OUT_OF_RANGE, UNIMPLEMENTED, CANCELLED. A call
//!   the caller gave up on (dropped) counts as nothing. Otherwise a few
//!   throttled users would open the breaker of a healthy instance for every
//!   user. The status is read from the response headers or, for a streamed
//!   body, from its trailers.
//! - **Open**: calls fail at once with UNAVAILABLE, nothing is sent. The open
//!   time grows with every re-opening by the crate's one [`Backoff`] (doubling,
//!   10–30 % jitter so that clients do not probe in lockstep, capped).
//! - **Half-open**: after the open time, at most
//!   [`BreakerConfig::half_open_probes`] calls go through at a time; the first
//!   success closes the breaker, a failure opens it again for longer.
//!
//! State changes are logged (inside the span of the call that caused them, so
//! they are span events too), counted in `mesh_client_circuit_*`, and handed
//! to an optional observer ([`Breaker::observe`]). The breaker is not tied to
//! gRPC: a [`Permit`] records any [`Outcome`], so services use the same
//! breaker around their own dependencies (the rate-limit service around Redis).
//!
//! failsafe measures time with `std::time::Instant` (its `clock` module can
//! freeze it in tests), not with Tokio's clock.

use std::{
    fmt,
    sync::{
        Arc, OnceLock,
        atomic::{AtomicU8, AtomicU32, AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use failsafe::{
    FailurePolicy, Instrument, StateMachine,
    failure_policy::{
        ConsecutiveFailures, OrElse, SuccessRateOverTimeWindow, consecutive_failures,
        success_rate_over_time_window,
    },
};
use futures::future::BoxFuture;
use http::{Request, Response};
use tokio::time::Instant;
use tonic::Code;
use tower::{Layer, Service};

use crate::{
    backoff::{Backoff, BackoffIter},
    deadline::Deadline,
    error::{BoxError, Error, Failure, failure_of},
    metrics::{ClientMetrics, EndpointLabels, TransitionLabels},
    status::{Outcome, StatusBody, Watch, status_of_head},
};

/// How a breaker trips and recovers.
#[derive(Debug, Clone, PartialEq)]
pub struct BreakerConfig {
    /// Consecutive failures that open the breaker (0: this policy is off).
    pub consecutive_failures: u32,
    /// Success rate (0–1) under which, over [`Self::success_rate_window`], the
    /// breaker opens; 0 turns this policy off.
    pub success_rate: f64,
    /// Window of the success rate (whole seconds; at least 1 s).
    pub success_rate_window: Duration,
    /// Calls needed in the window before the success rate counts.
    pub success_rate_min_requests: u32,
    /// Open time after the first trip (before 10–30 % jitter); it doubles
    /// with every re-opening.
    pub open_base: Duration,
    /// Longest open time, jitter included.
    pub open_max: Duration,
    /// Calls let through at a time while half-open.
    pub half_open_probes: u32,
    /// gRPC codes that count as failures of the endpoint.
    pub failure_codes: Vec<Code>,
    /// An attempt that starts with less of its call's deadline left than
    /// this, and then times out (or is answered DEADLINE_EXCEEDED), counts as
    /// nothing: its caller's budget was too short, not the endpoint too slow.
    /// Without it, a caller sending tiny deadlines opens the breaker of a
    /// healthy endpoint for everyone. Other failures still count.
    pub min_timeout_budget: Duration,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            consecutive_failures: 5,
            success_rate: 0.5,
            success_rate_window: Duration::from_secs(10),
            success_rate_min_requests: 20,
            open_base: Duration::from_secs(1),
            open_max: Duration::from_secs(30),
            half_open_probes: 1,
            failure_codes: vec![
                Code::Unavailable,
                Code::DeadlineExceeded,
                Code::Internal,
                Code::Unknown,
                Code::DataLoss,
            ],
            min_timeout_budget: Duration::from_millis(100),
        }
    }
}

/// A breaker's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    /// Calls go through.
    Closed,
    /// A limited number of probe calls go through.
    HalfOpen,
    /// Calls fail at once.
    Open,
}

const CLOSED: u8 = 0;
const HALF_OPEN: u8 = 1;
const OPEN: u8 = 2;

impl BreakerState {
    fn from_u8(v: u8) -> Self {
        match v {
            CLOSED => Self::Closed,
            HALF_OPEN => Self::HalfOpen,
            _ => Self::Open,
        }
    }

    /// `closed`, `half_open` or `open`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::HalfOpen => "half_open",
            Self::Open => "open",
        }
    }
}

type Policies = OrElse<ConsecutiveFailures<BackoffIter>, SuccessRateOverTimeWindow<BackoffIter>>;

/// failsafe's two policies, remembering the open time they chose (for logs).
#[derive(Debug)]
struct Accrual {
    policies: Policies,
    open_for: Arc<AtomicU64>,
}

impl FailurePolicy for Accrual {
    fn record_success(&mut self) {
        self.policies.record_success();
    }

    fn mark_dead_on_failure(&mut self) -> Option<Duration> {
        let d = self.policies.mark_dead_on_failure();
        if let Some(d) = d {
            self.open_for.store(d.as_millis() as u64, Ordering::Relaxed);
        }
        d
    }

    fn revived(&mut self) {
        self.policies.revived();
    }
}

/// Called with the new state on every transition.
type Observer = Box<dyn Fn(BreakerState) + Send + Sync>;

/// Who a breaker belongs to, its mirrored state, and where it reports.
struct Meta {
    upstream: Arc<str>,
    endpoint: Arc<str>,
    state: AtomicU8,
    open_for: Arc<AtomicU64>,
    metrics: ClientMetrics,
    observer: OnceLock<Observer>,
}

impl fmt::Debug for Meta {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Meta")
            .field("upstream", &self.upstream)
            .field("endpoint", &self.endpoint)
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

/// failsafe reports transitions here; the state is mirrored because failsafe
/// does not expose it, and half-open probes are limited on top of it.
#[derive(Debug, Clone)]
struct Events(Arc<Meta>);

impl Events {
    fn transition(&self, to: u8) {
        let m = &self.0;
        let from = m.state.swap(to, Ordering::AcqRel);
        if from == to {
            return;
        }
        let state = BreakerState::from_u8(to);
        m.metrics
            .circuit_state
            .get_or_create(&EndpointLabels { upstream: m.upstream.clone(), endpoint: m.endpoint.clone() })
            .set(i64::from(to));
        m.metrics
            .circuit_transitions
            .get_or_create(&TransitionLabels {
                upstream: m.upstream.clone(),
                endpoint: m.endpoint.clone(),
                state: state.as_str(),
            })
            .inc();
        if let Some(observe) = m.observer.get() {
            observe(state);
        }
        match state {
            BreakerState::Open => tracing::warn!(
                upstream = %m.upstream,
                endpoint = %m.endpoint,
                open_for_ms = m.open_for.load(Ordering::Relaxed),
                "circuit breaker opened"
            ),
            BreakerState::HalfOpen => {
                tracing::info!(upstream = %m.upstream, endpoint = %m.endpoint, "circuit breaker half-open, probing")
            }
            BreakerState::Closed => {
                tracing::info!(upstream = %m.upstream, endpoint = %m.endpoint, "circuit breaker closed")
            }
        }
    }
}

impl Instrument for Events {
    fn on_call_rejected(&self) {}

    fn on_open(&self) {
        self.transition(OPEN);
    }

    fn on_half_open(&self) {
        self.transition(HALF_OPEN);
    }

    fn on_closed(&self) {
        self.transition(CLOSED);
    }
}

struct Inner {
    machine: StateMachine<Accrual, Events>,
    meta: Arc<Meta>,
    probes: AtomicU32,
    max_probes: u32,
    /// Bit `n` set: code `n` is a failure.
    failure_codes: u32,
    min_timeout_budget: Duration,
}

/// One endpoint's breaker (cheap to clone: clones share the state).
#[derive(Clone)]
pub struct Breaker {
    inner: Arc<Inner>,
}

impl fmt::Debug for Breaker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Breaker")
            .field("upstream", &self.inner.meta.upstream)
            .field("endpoint", &self.inner.meta.endpoint)
            .field("state", &self.state())
            .finish()
    }
}

impl Breaker {
    /// A closed breaker for `endpoint` of `upstream`.
    pub fn new(
        config: &BreakerConfig,
        upstream: Arc<str>,
        endpoint: Arc<str>,
        metrics: ClientMetrics,
    ) -> Self {
        let backoff = Backoff::new(config.open_base, config.open_max).iter();
        let open_for = Arc::new(AtomicU64::new(0));
        let consecutive = match config.consecutive_failures {
            0 => u32::MAX,
            n => n,
        };
        let policies =
            consecutive_failures(consecutive, backoff.clone()).or_else(success_rate_over_time_window(
                config.success_rate.clamp(0.0, 1.0),
                config.success_rate_min_requests,
                config.success_rate_window.max(Duration::from_secs(1)),
                backoff,
            ));
        metrics
            .circuit_state
            .get_or_create(&EndpointLabels { upstream: upstream.clone(), endpoint: endpoint.clone() })
            .set(i64::from(CLOSED));
        let meta = Arc::new(Meta {
            upstream,
            endpoint,
            state: AtomicU8::new(CLOSED),
            open_for: open_for.clone(),
            metrics,
            observer: OnceLock::new(),
        });
        let machine = StateMachine::new(Accrual { policies, open_for }, Events(meta.clone()));
        let failure_codes = config.failure_codes.iter().fold(0u32, |bits, c| bits | 1 << (*c as i32));
        Self {
            inner: Arc::new(Inner {
                machine,
                meta,
                probes: AtomicU32::new(0),
                max_probes: config.half_open_probes.max(1),
                failure_codes,
                min_timeout_budget: config.min_timeout_budget,
            }),
        }
    }

    /// The current state (an open breaker whose time is up still says open
    /// until the next call asks).
    pub fn state(&self) -> BreakerState {
        BreakerState::from_u8(self.inner.meta.state.load(Ordering::Acquire))
    }

    /// Calls `observe` with the new state on every later transition (once
    /// per breaker: a second observer is ignored and `false` returned).
    pub fn observe(&self, observe: impl Fn(BreakerState) + Send + Sync + 'static) -> bool {
        self.inner.meta.observer.set(Box::new(observe)).is_ok()
    }

    /// The endpoint this breaker guards.
    pub fn endpoint(&self) -> &Arc<str> {
        &self.inner.meta.endpoint
    }

    /// Whether `outcome` counts against the endpoint.
    pub fn is_failure(&self, outcome: Outcome) -> bool {
        match outcome {
            Outcome::Status(code) => self.inner.failure_codes & (1 << (code as i32)) != 0,
            Outcome::Transport => true,
            Outcome::Dropped => false,
        }
    }

    /// Asks to make a call: `None` while open, or while half-open with every
    /// probe slot taken. An open breaker whose time is up turns half-open here.
    pub fn try_acquire(&self) -> Option<Permit> {
        let inner = &self.inner;
        if !inner.machine.is_call_permitted() {
            return None;
        }
        let probe = self.state() != BreakerState::Closed;
        if probe && inner.probes.fetch_add(1, Ordering::AcqRel) >= inner.max_probes {
            inner.probes.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(Permit { breaker: self.clone(), probe, short_budget: false })
    }
}

/// Leave to make one call; report how it went with [`Permit::record`].
/// Dropped without a record (the caller gave up), it counts as nothing.
#[derive(Debug)]
pub struct Permit {
    breaker: Breaker,
    probe: bool,
    /// The call had less than `min_timeout_budget` left: a timeout is not the endpoint's.
    short_budget: bool,
}

impl Permit {
    /// Notes how much of its call's deadline this attempt starts with (see
    /// [`BreakerConfig::min_timeout_budget`]).
    pub fn with_deadline(mut self, deadline: Option<Instant>) -> Self {
        self.short_budget = deadline.is_some_and(|d| {
            d.saturating_duration_since(Instant::now()) < self.breaker.inner.min_timeout_budget
        });
        self
    }

    /// Reports the call's outcome to the breaker.
    pub fn record(self, outcome: Outcome) {
        let machine = &self.breaker.inner.machine;
        match outcome {
            Outcome::Dropped => {}
            Outcome::Status(Code::DeadlineExceeded) if self.short_budget => {}
            o if self.breaker.is_failure(o) => machine.on_error(),
            _ => machine.on_success(),
        }
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if self.probe {
            self.breaker.inner.probes.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// Reports the status at the end of a streamed body to the breaker.
#[derive(Debug)]
pub struct Verdict {
    permit: Permit,
    /// The span of the call: the body ends outside it, but a state change
    /// it causes belongs to it (as a span event).
    span: tracing::Span,
}

impl Watch for Verdict {
    fn finish(self, outcome: Outcome) {
        let may_change_state =
            self.permit.breaker.is_failure(outcome) || self.permit.breaker.state() != BreakerState::Closed;
        let _entered = may_change_state.then(|| self.span.enter());
        self.permit.record(outcome);
    }
}

/// Adds a [`CircuitBreaker`] (with a breaker of its own) to a service.
#[derive(Debug, Clone)]
pub struct CircuitBreakerLayer {
    config: Arc<BreakerConfig>,
    upstream: Arc<str>,
    endpoint: Arc<str>,
    metrics: ClientMetrics,
}

impl CircuitBreakerLayer {
    /// Breakers configured by `config` for `endpoint` of `upstream`.
    pub fn new(
        config: &BreakerConfig,
        upstream: impl Into<Arc<str>>,
        endpoint: impl Into<Arc<str>>,
        metrics: ClientMetrics,
    ) -> Self {
        Self {
            config: Arc::new(config.clone()),
            upstream: upstream.into(),
            endpoint: endpoint.into(),
            metrics,
        }
    }
}

impl<S> Layer<S> for CircuitBreakerLayer {
    type Service = CircuitBreaker<S>;

    fn layer(&self, inner: S) -> Self::Service {
        let breaker =
            Breaker::new(&self.config, self.upstream.clone(), self.endpoint.clone(), self.metrics.clone());
        CircuitBreaker { inner, breaker }
    }
}

/// See the module docs.
#[derive(Debug, Clone)]
pub struct CircuitBreaker<S> {
    inner: S,
    breaker: Breaker,
}

impl<S> CircuitBreaker<S> {
    /// The breaker guarding this service.
    pub fn breaker(&self) -> &Breaker {
        &self.breaker
    }

    /// Calls with a permit already taken from [`Self::breaker`] (the
    /// balancer asks several breakers before it picks one).
    pub fn call_permitted<ReqB, B>(
        &mut self,
        permit: Permit,
        req: Request<ReqB>,
    ) -> BoxFuture<'static, Result<Response<StatusBody<B, Verdict>>, BoxError>>
    where
        S: Service<Request<ReqB>, Response = Response<B>>,
        S::Error: Into<BoxError>,
        S::Future: Send + 'static,
        B: Send + 'static,
    {
        let permit = permit.with_deadline(req.extensions().get::<Deadline>().map(|d| d.0));
        let fut = self.inner.call(req);
        Box::pin(async move {
            match fut.await {
                Ok(resp) => {
                    let (parts, body) = resp.into_parts();
                    let watch = match status_of_head(parts.status, &parts.headers) {
                        Some(code) => {
                            permit.record(Outcome::Status(code));
                            None
                        }
                        None => Some(Verdict { permit, span: tracing::Span::current() }),
                    };
                    Ok(Response::from_parts(parts, StatusBody::new(body, watch)))
                }
                Err(e) => {
                    let e: BoxError = e.into();
                    // The attempt timeout: as if the server had said DEADLINE_EXCEEDED.
                    let outcome = match failure_of(&*e) {
                        Failure::Timeout => Outcome::Status(Code::DeadlineExceeded),
                        _ => Outcome::Transport,
                    };
                    permit.record(outcome);
                    Err(e)
                }
            }
        })
    }
}

impl<S, ReqB, B> Service<Request<ReqB>> for CircuitBreaker<S>
where
    S: Service<Request<ReqB>, Response = Response<B>>,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = Response<StatusBody<B, Verdict>>;
    type Error = BoxError;
    type Future = BoxFuture<'static, Result<Self::Response, BoxError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Request<ReqB>) -> Self::Future {
        match self.breaker.try_acquire() {
            Some(permit) => self.call_permitted(permit, req),
            None => {
                let endpoint = self.breaker.endpoint().clone();
                Box::pin(async move { Err(Error::EndpointOpen { endpoint }.into()) })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use failsafe::clock;
    use http::HeaderMap;
    use http_body_util::BodyExt;

    use super::*;

    fn config() -> BreakerConfig {
        BreakerConfig {
            consecutive_failures: 3,
            success_rate: 0.0,
            open_base: Duration::from_secs(10),
            open_max: Duration::from_secs(60),
            half_open_probes: 2,
            ..BreakerConfig::default()
        }
    }

    fn breaker(config: &BreakerConfig, metrics: &ClientMetrics) -> Breaker {
        Breaker::new(config, "echo".into(), "127.0.0.1:1".into(), metrics.clone())
    }

    fn call(b: &Breaker, code: Code) -> bool {
        match b.try_acquire() {
            Some(p) => {
                p.record(Outcome::Status(code));
                true
            }
            None => false,
        }
    }

    fn transitions(m: &ClientMetrics, state: &'static str) -> u64 {
        m.circuit_transitions
            .get_or_create(&TransitionLabels {
                upstream: "echo".into(),
                endpoint: "127.0.0.1:1".into(),
                state,
            })
            .get()
    }

    #[test]
    fn consecutive_failures_open_it_and_a_success_in_between_resets_the_count() {
        clock::freeze(|_| {
            let m = ClientMetrics::default();
            let b = breaker(&config(), &m);
            assert!(call(&b, Code::Unavailable) && call(&b, Code::DeadlineExceeded));
            assert!(call(&b, Code::Ok));
            assert!(call(&b, Code::Unknown) && call(&b, Code::Internal));
            assert_eq!(b.state(), BreakerState::Closed);
            assert!(call(&b, Code::Unavailable));
            assert_eq!(b.state(), BreakerState::Open);
            for _ in 0..10 {
                assert!(b.try_acquire().is_none(), "open: no calls");
            }
            assert_eq!(transitions(&m, "open"), 1);
            let labels = EndpointLabels { upstream: "echo".into(), endpoint: "127.0.0.1:1".into() };
            assert_eq!(m.circuit_state.get_or_create(&labels).get(), 2);
        });
    }

    #[test]
    fn caller_errors_never_open_it_transport_failures_do() {
        clock::freeze(|_| {
            let b = breaker(&config(), &ClientMetrics::default());
            for code in [
                Code::InvalidArgument,
                Code::NotFound,
                Code::Aborted,
                Code::AlreadyExists,
                Code::FailedPrecondition,
                Code::PermissionDenied,
                Code::Unauthenticated,
                Code::Unimplemented,
                Code::Cancelled,
                Code::ResourceExhausted,
                Code::OutOfRange,
            ] {
                for _ in 0..5 {
                    assert!(call(&b, code));
                }
            }
            assert_eq!(b.state(), BreakerState::Closed);
            // A dropped call is no evidence either way.
            for _ in 0..5 {
                b.try_acquire().unwrap().record(Outcome::Dropped);
            }
            assert_eq!(b.state(), BreakerState::Closed);
            for _ in 0..3 {
                b.try_acquire().unwrap().record(Outcome::Transport);
            }
            assert_eq!(b.state(), BreakerState::Open);
        });
    }

    #[test]
    fn timeouts_of_calls_with_too_little_time_left_never_open_it() {
        clock::freeze(|_| {
            let b = breaker(&config(), &ClientMetrics::default());
            let now = Instant::now();
            // A caller that left 10 ms: its timeouts say nothing about the endpoint…
            for _ in 0..10 {
                let p = b.try_acquire().unwrap().with_deadline(Some(now + Duration::from_millis(10)));
                p.record(Outcome::Status(Code::DeadlineExceeded));
            }
            assert_eq!(b.state(), BreakerState::Closed);
            // …its other failures do.
            for _ in 0..3 {
                let p = b.try_acquire().unwrap().with_deadline(Some(now + Duration::from_millis(10)));
                p.record(Outcome::Status(Code::Unavailable));
            }
            assert_eq!(b.state(), BreakerState::Open);
            // An endpoint that times out with a fair budget (or none) is failing.
            let b = breaker(&config(), &ClientMetrics::default());
            for deadline in [Some(now + Duration::from_secs(2)), None, Some(now + Duration::from_millis(150))]
            {
                b.try_acquire()
                    .unwrap()
                    .with_deadline(deadline)
                    .record(Outcome::Status(Code::DeadlineExceeded));
            }
            assert_eq!(b.state(), BreakerState::Open);
        });
    }

    #[test]
    fn half_open_lets_few_probes_through_and_backs_off_longer_after_a_failed_one() {
        clock::freeze(|time| {
            let m = ClientMetrics::default();
            let b = breaker(&config(), &m);
            for _ in 0..3 {
                call(&b, Code::Unavailable);
            }
            // First open time: 10 s + 10–30 %.
            time.advance(Duration::from_secs(10));
            assert!(b.try_acquire().is_none());
            time.advance(Duration::from_secs(4));
            let p1 = b.try_acquire().expect("half-open: a probe");
            assert_eq!(b.state(), BreakerState::HalfOpen);
            let p2 = b.try_acquire().expect("a second probe");
            assert!(b.try_acquire().is_none(), "only two probes at a time");
            drop(p2); // given up: its slot frees
            let p3 = b.try_acquire().expect("slot freed");
            p1.record(Outcome::Status(Code::Unavailable));
            drop(p3);
            assert_eq!(b.state(), BreakerState::Open);
            // Second open time: 20 s + 10–30 %, so still open after the first one's maximum.
            time.advance(Duration::from_secs(21));
            assert!(b.try_acquire().is_none());
            time.advance(Duration::from_secs(6));
            assert!(call(&b, Code::NotFound), "a probe answered by the server closes it");
            assert_eq!(b.state(), BreakerState::Closed);
            assert_eq!(
                (transitions(&m, "open"), transitions(&m, "half_open"), transitions(&m, "closed")),
                (2, 2, 1)
            );
            // Closed again, the count starts over and the open time is fresh.
            call(&b, Code::Unavailable);
            call(&b, Code::Unavailable);
            assert_eq!(b.state(), BreakerState::Closed);
            call(&b, Code::Unavailable);
            time.advance(Duration::from_secs(14));
            assert!(b.try_acquire().is_some(), "back to the 10 s base");
        });
    }

    #[test]
    fn a_low_success_rate_opens_it_without_consecutive_failures() {
        clock::freeze(|time| {
            let config = BreakerConfig {
                consecutive_failures: 100,
                success_rate: 0.8,
                success_rate_window: Duration::from_secs(1),
                success_rate_min_requests: 10,
                ..config()
            };
            let b = breaker(&config, &ClientMetrics::default());
            // One failure in two, for longer than the window.
            for i in 0..40 {
                time.advance(Duration::from_millis(50));
                call(&b, if i % 2 == 0 { Code::Ok } else { Code::Unavailable });
                if b.state() == BreakerState::Open {
                    assert!(i >= 19, "not before the window has passed ({i})");
                    return;
                }
            }
            panic!("a 50 % success rate must open the breaker");
        });
    }

    /// Answers with a status in the trailers, counting calls.
    #[derive(Clone, Default)]
    struct Upstream {
        calls: Arc<AtomicUsize>,
        code: Arc<AtomicU8>,
    }

    type TestBody = http_body_util::Full<bytes::Bytes>;

    impl Service<Request<()>> for Upstream {
        type Response =
            Response<http_body_util::combinators::BoxBody<bytes::Bytes, std::convert::Infallible>>;
        type Error = BoxError;
        type Future = futures::future::Ready<Result<Self::Response, BoxError>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, _: Request<()>) -> Self::Future {
            self.calls.fetch_add(1, Ordering::SeqCst);
            let mut trailers = HeaderMap::new();
            trailers.insert("grpc-status", self.code.load(Ordering::SeqCst).to_string().parse().unwrap());
            let body = TestBody::new(bytes::Bytes::from_static(b"\0\0\0\0\0"))
                .with_trailers(async move { Some(Ok(trailers)) })
                .boxed();
            futures::future::ready(Ok(Response::new(body)))
        }
    }

    #[tokio::test]
    async fn an_open_breaker_answers_unavailable_without_calling_and_reads_trailers() {
        let upstream = Upstream::default();
        upstream.code.store(Code::Unavailable as u8, Ordering::SeqCst);
        let layer = CircuitBreakerLayer::new(&config(), "echo", "127.0.0.1:1", ClientMetrics::default());
        let mut svc = layer.layer(upstream.clone());
        for _ in 0..3 {
            let resp = svc.call(Request::new(())).await.unwrap();
            // The status is only in the trailers: reading the body reports it.
            resp.into_body().collect().await.unwrap();
        }
        assert_eq!(svc.breaker().state(), BreakerState::Open);
        let err = svc.call(Request::new(())).await.unwrap_err();
        let status = crate::error::into_status(err);
        assert_eq!(status.code(), Code::Unavailable);
        assert_eq!(status.message(), "127.0.0.1:1: circuit breaker open, not calling");
        assert_eq!(upstream.calls.load(Ordering::SeqCst), 3, "no call while open");
    }
}

//! Balancing across the instances of a service: power of two choices over
//! PeakEWMA load, with a circuit breaker per endpoint so that a bad instance
//! is ejected while the others keep serving.
//!
//! Each call samples two endpoints at random and sends to the one with the
//! lower cost, `rtt × (pending + 1)`, where `rtt` is a peak-sensitive moving
//! average of response times (it jumps to any slower response at once and
//! decays towards faster ones; idle, it decays towards zero so an idle
//! endpoint gets tried again). That is Finagle's and linkerd's algorithm, as
//! in `tower::load::PeakEwma`, kept per endpoint here so that the balancer is
//! a cheap-to-clone service without a buffer task in front of it.
//!
//! An endpoint whose breaker refuses (open, or half-open with its probes
//! taken) is skipped; when every breaker refuses the call fails at once with
//! UNAVAILABLE and nothing is sent. A retry avoids the endpoints its earlier
//! attempts went to when there are others.
//!
//! The endpoint set changes under it ([`Balance::set_endpoints`], driven by
//! [`crate::discover`]); endpoints that stay keep their connection, load
//! estimate and breaker.

use std::{
    fmt,
    net::SocketAddr,
    sync::{
        Arc, Mutex, RwLock, Weak,
        atomic::{AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use futures::future::BoxFuture;
use http::{Request, Response};
use rand::Rng;
use tokio::{sync::watch, time::Instant};
use tower::{Service, ServiceExt};
use tracing::Span;

use crate::{
    breaker::{BreakerState, CircuitBreaker, Permit, Verdict},
    error::{BoxError, Error},
    metrics::{ClientMetrics, EndpointLabels, UpstreamLabels},
    retry::Attempts,
    status::{Outcome, StatusBody},
};

/// PeakEWMA settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BalanceConfig {
    /// Response time assumed for an endpoint before it answered anything.
    pub default_rtt: Duration,
    /// How fast the estimate forgets a slow response.
    pub decay: Duration,
}

impl Default for BalanceConfig {
    fn default() -> Self {
        Self { default_rtt: Duration::from_millis(30), decay: Duration::from_secs(10) }
    }
}

/// One endpoint: the address to connect to and the host it was configured as.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct EndpointAddr {
    /// The socket address.
    pub addr: SocketAddr,
    /// The configured host (a DNS name, or the IP itself): the `:authority`
    /// of requests and `server.address` on spans.
    pub host: Arc<str>,
}

impl fmt::Display for EndpointAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.addr.fmt(f)
    }
}

/// Peak-sensitive EWMA of response times plus calls in flight.
#[derive(Debug)]
pub(crate) struct PeakEwma {
    decay_ns: f64,
    /// Estimate in nanoseconds, and when it was last updated.
    estimate: Mutex<(f64, Instant)>,
    pending: AtomicUsize,
}

impl PeakEwma {
    pub(crate) fn new(config: BalanceConfig) -> Self {
        Self {
            decay_ns: (config.decay.as_nanos() as f64).max(1.0),
            estimate: Mutex::new((config.default_rtt.as_nanos() as f64, Instant::now())),
            pending: AtomicUsize::new(0),
        }
    }

    fn decayed(&self, now: Instant) -> f64 {
        let mut e = self.estimate.lock().expect("not poisoned");
        let elapsed = now.saturating_duration_since(e.1).as_nanos() as f64;
        e.0 *= (-elapsed / self.decay_ns).exp();
        e.1 = now;
        e.0
    }

    /// `rtt × (pending + 1)`: what sending one more call here is expected to cost.
    pub(crate) fn cost(&self) -> f64 {
        let pending = self.pending.load(Ordering::Relaxed) as f64;
        self.decayed(Instant::now()) * (pending + 1.0)
    }

    fn observe(&self, rtt: Duration) {
        let rtt = rtt.as_nanos() as f64;
        let now = Instant::now();
        let mut e = self.estimate.lock().expect("not poisoned");
        e.0 = if rtt > e.0 {
            rtt
        } else {
            let elapsed = now.saturating_duration_since(e.1).as_nanos() as f64;
            let w = (-elapsed / self.decay_ns).exp();
            e.0 * w + rtt * (1.0 - w)
        };
        e.1 = now;
    }

    /// Counts a call in flight until the guard is dropped, then records its time.
    pub(crate) fn start(self: &Arc<Self>) -> InFlight {
        self.pending.fetch_add(1, Ordering::Relaxed);
        InFlight { ewma: self.clone(), sent: Instant::now() }
    }
}

/// A call in flight on an endpoint.
#[derive(Debug)]
pub(crate) struct InFlight {
    ewma: Arc<PeakEwma>,
    sent: Instant,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.ewma.pending.fetch_sub(1, Ordering::Relaxed);
        self.ewma.observe(self.sent.elapsed());
    }
}

struct Endpoint<S> {
    addr: EndpointAddr,
    label: Arc<str>,
    svc: CircuitBreaker<S>,
    load: Arc<PeakEwma>,
}

/// What the balancer knows about one endpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct EndpointStatus {
    /// Where it is.
    pub addr: EndpointAddr,
    /// Its breaker's state.
    pub state: BreakerState,
    /// Calls in flight.
    pub pending: usize,
    /// Its current response-time estimate.
    pub rtt: Duration,
}

/// An endpoint chosen for a call, with its breaker's permit, and whether
/// there were others (whose loads its own is compared with).
type Picked<S> = (Arc<Endpoint<S>>, Permit, bool);

type MakeEndpoint<S> = dyn Fn(&EndpointAddr) -> CircuitBreaker<S> + Send + Sync;

pub(crate) struct Shared<S> {
    upstream: Arc<str>,
    config: BalanceConfig,
    metrics: ClientMetrics,
    make: Box<MakeEndpoint<S>>,
    endpoints: RwLock<Arc<Vec<Arc<Endpoint<S>>>>>,
    /// Set once discovery has answered (calls made before wait for it).
    resolved: watch::Sender<bool>,
    /// Why there are no endpoints, for the error.
    unresolved_reason: Mutex<Arc<str>>,
}

/// See the module docs. Clones share the endpoints.
pub struct Balance<S> {
    shared: Arc<Shared<S>>,
}

impl<S> Clone for Balance<S> {
    fn clone(&self) -> Self {
        Self { shared: self.shared.clone() }
    }
}

impl<S> fmt::Debug for Balance<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.shared.endpoints.read().expect("not poisoned").len();
        f.debug_struct("Balance").field("upstream", &self.shared.upstream).field("endpoints", &n).finish()
    }
}

impl<S> Balance<S> {
    /// A balancer for `upstream` with no endpoints yet: calls wait for the
    /// first [`Balance::set_endpoints`] or [`Balance::resolution_failed`].
    /// `make` builds the service of a new endpoint, breaker outermost.
    pub fn new(
        upstream: impl Into<Arc<str>>,
        config: BalanceConfig,
        metrics: ClientMetrics,
        make: impl Fn(&EndpointAddr) -> CircuitBreaker<S> + Send + Sync + 'static,
    ) -> Self {
        Self {
            shared: Arc::new(Shared {
                upstream: upstream.into(),
                config,
                metrics,
                make: Box::new(make),
                endpoints: RwLock::new(Arc::new(Vec::new())),
                resolved: watch::channel(false).0,
                unresolved_reason: Mutex::new("not resolved yet".into()),
            }),
        }
    }

    /// The upstream's name.
    pub fn upstream(&self) -> &Arc<str> {
        &self.shared.upstream
    }

    /// Replaces the endpoint set. Endpoints already known keep their state.
    pub fn set_endpoints(&self, addrs: impl IntoIterator<Item = EndpointAddr>) {
        let shared = &self.shared;
        let mut guard = shared.endpoints.write().expect("not poisoned");
        let old = guard.clone();
        let mut next: Vec<Arc<Endpoint<S>>> = Vec::new();
        for addr in addrs {
            if next.iter().any(|e| e.addr.addr == addr.addr) {
                continue;
            }
            match old.iter().find(|e| e.addr.addr == addr.addr) {
                Some(e) => next.push(e.clone()),
                None => {
                    tracing::info!(upstream = %shared.upstream, endpoint = %addr, "endpoint added");
                    next.push(Arc::new(Endpoint {
                        label: addr.addr.to_string().into(),
                        svc: (shared.make)(&addr),
                        load: Arc::new(PeakEwma::new(shared.config)),
                        addr,
                    }));
                }
            }
        }
        for gone in old.iter().filter(|e| !next.iter().any(|n| n.addr.addr == e.addr.addr)) {
            tracing::info!(upstream = %shared.upstream, endpoint = %gone.addr, "endpoint removed");
            shared
                .metrics
                .circuit_state
                .remove(&EndpointLabels { upstream: shared.upstream.clone(), endpoint: gone.label.clone() });
        }
        shared
            .metrics
            .endpoints
            .get_or_create(&UpstreamLabels { upstream: shared.upstream.clone() })
            .set(next.len() as i64);
        if next.is_empty() {
            *shared.unresolved_reason.lock().expect("not poisoned") = "the endpoint set is empty".into();
        }
        *guard = Arc::new(next);
        drop(guard);
        shared.resolved.send_replace(true);
    }

    /// Discovery could not find endpoints: calls waiting for them fail with `reason`.
    pub fn resolution_failed(&self, reason: impl Into<Arc<str>>) {
        *self.shared.unresolved_reason.lock().expect("not poisoned") = reason.into();
        self.shared.resolved.send_replace(true);
    }

    /// The endpoints and their state.
    pub fn endpoints(&self) -> Vec<EndpointStatus> {
        let eps = self.shared.endpoints.read().expect("not poisoned").clone();
        let now = Instant::now();
        eps.iter()
            .map(|e| EndpointStatus {
                addr: e.addr.clone(),
                state: e.svc.breaker().state(),
                pending: e.load.pending.load(Ordering::Relaxed),
                rtt: Duration::from_nanos(e.load.decayed(now) as u64),
            })
            .collect()
    }

    pub(crate) fn downgrade(&self) -> Weak<Shared<S>> {
        Arc::downgrade(&self.shared)
    }

    pub(crate) fn upgrade(weak: &Weak<Shared<S>>) -> Option<Self> {
        weak.upgrade().map(|shared| Self { shared })
    }

    /// Picks an endpoint and takes a permit from its breaker; `Ok(None)`:
    /// nothing resolved yet, wait.
    fn pick(&self, attempts: Option<&Attempts>) -> Result<Option<Picked<S>>, Error> {
        let shared = &self.shared;
        let eps = shared.endpoints.read().expect("not poisoned").clone();
        let n = eps.len();
        if n == 0 {
            if !*shared.resolved.borrow() {
                return Ok(None);
            }
            let reason = shared.unresolved_reason.lock().expect("not poisoned").clone();
            return Err(Error::NoEndpoints { upstream: shared.upstream.clone(), reason });
        }
        let mut rng = rand::rng();
        let mut order: [Option<usize>; 2] = [None, None];
        let tried = attempts.filter(|a| !a.is_empty());
        if n == 1 {
            order[0] = Some(0);
        } else if let Some(a) = tried {
            // Endpoints an earlier attempt of this call went to come last.
            let mut fresh: Vec<usize> = (0..n).filter(|&i| !a.contains(&eps[i].label)).collect();
            if fresh.is_empty() {
                fresh = (0..n).collect();
            }
            order = p2c(&eps, &fresh, &mut rng);
        } else {
            order = p2c(&eps, &[], &mut rng);
        }
        for i in order.into_iter().flatten() {
            if let Some(permit) = eps[i].svc.breaker().try_acquire() {
                return Ok(Some((eps[i].clone(), permit, n > 1)));
            }
        }
        // Both refused: anyone else, from a random start.
        let start = rng.random_range(0..n);
        for k in 0..n {
            let i = (start + k) % n;
            if order.contains(&Some(i)) {
                continue;
            }
            if let Some(permit) = eps[i].svc.breaker().try_acquire() {
                return Ok(Some((eps[i].clone(), permit, n > 1)));
            }
        }
        shared
            .metrics
            .circuit_rejected
            .get_or_create(&UpstreamLabels { upstream: shared.upstream.clone() })
            .inc();
        Err(Error::AllOpen { upstream: shared.upstream.clone(), endpoints: n })
    }
}

/// Two distinct random candidates (from `among`, or from every endpoint when
/// it is empty), the cheaper first.
fn p2c<S>(eps: &[Arc<Endpoint<S>>], among: &[usize], rng: &mut impl Rng) -> [Option<usize>; 2] {
    let len = if among.is_empty() { eps.len() } else { among.len() };
    let at = |k: usize| if among.is_empty() { k } else { among[k] };
    if len == 1 {
        return [Some(at(0)), None];
    }
    let i = rng.random_range(0..len);
    let mut j = rng.random_range(0..len - 1);
    if j >= i {
        j += 1;
    }
    let (a, b) = (at(i), at(j));
    if eps[b].load.cost() < eps[a].load.cost() { [Some(b), Some(a)] } else { [Some(a), Some(b)] }
}

impl<S, ReqB, B> Service<Request<ReqB>> for Balance<S>
where
    S: Service<Request<ReqB>, Response = Response<B>> + Clone + Send + Sync + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
    ReqB: Send + 'static,
    B: Send + 'static,
{
    type Response = Response<StatusBody<B, Verdict>>;
    type Error = BoxError;
    type Future = BoxFuture<'static, Result<Self::Response, BoxError>>;

    /// Always ready: readiness is decided per call, by the breakers.
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<ReqB>) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let attempts = req.extensions().get::<Attempts>().cloned();
            let (ep, permit, compared) = loop {
                match this.pick(attempts.as_ref())? {
                    Some(picked) => break picked,
                    None => {
                        let mut rx = this.shared.resolved.subscribe();
                        let _ = rx.wait_for(|r| *r).await;
                    }
                }
            };
            if let Some(a) = &attempts {
                a.push(ep.label.clone());
            }
            let span = Span::current();
            span.record("server.address", &*ep.addr.host);
            span.record("server.port", i64::from(ep.addr.addr.port()));
            // The peer's address says something only when the host was a name.
            if ep.addr.host.parse::<std::net::IpAddr>().is_err() {
                span.record("network.peer.address", tracing::field::display(ep.addr.addr.ip()));
                span.record("network.peer.port", ep.addr.addr.port());
            }
            // With one endpoint there is nothing to compare: skip the load
            // bookkeeping (it costs clock reads on every call).
            let in_flight = compared.then(|| ep.load.start());
            let mut svc = ep.svc.clone();
            drop(ep);
            let result = match svc.ready().await {
                Ok(_) => svc.call_permitted(permit, req).await,
                Err(e) => {
                    permit.record(Outcome::Transport);
                    Err(e)
                }
            };
            drop(in_flight);
            result
        })
    }
}

#[cfg(test)]
mod tests {
    use std::{collections::HashMap, sync::atomic::AtomicU8};

    use bytes::Bytes;
    use http_body_util::Empty;

    use super::*;
    use crate::breaker::{BreakerConfig, CircuitBreakerLayer};
    use tower::Layer;

    const MS: Duration = Duration::from_millis(1);

    #[tokio::test(start_paused = true)]
    async fn peak_ewma_jumps_to_slow_answers_decays_and_counts_pending() {
        let e =
            Arc::new(PeakEwma::new(BalanceConfig { default_rtt: 10 * MS, decay: Duration::from_secs(1) }));
        assert_eq!(e.cost().round(), 10e6);
        let slow = e.start();
        assert_eq!(e.cost().round(), 20e6, "one in flight doubles the cost");
        tokio::time::advance(100 * MS).await;
        drop(slow);
        // The peak is taken at once.
        assert!((e.cost() - 100e6).abs() < 1e3, "{}", e.cost());
        // Fast answers pull it down, idle time decays it towards zero.
        tokio::time::advance(Duration::from_secs(1)).await;
        let c = e.cost();
        assert!((c - 100e6 / std::f64::consts::E).abs() < 1e4, "{c}");
        tokio::time::advance(Duration::from_secs(20)).await;
        assert!(e.cost() < 1e3);
    }

    /// An endpoint answering with a fixed code after a fixed delay; counts calls.
    #[derive(Clone)]
    struct Fake {
        code: Arc<AtomicU8>,
        delay: Duration,
        calls: Arc<AtomicUsize>,
    }

    impl Service<Request<()>> for Fake {
        type Response = Response<Empty<Bytes>>;
        type Error = BoxError;
        type Future = BoxFuture<'static, Result<Self::Response, BoxError>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, _: Request<()>) -> Self::Future {
            self.calls.fetch_add(1, Ordering::SeqCst);
            let (code, delay) = (self.code.load(Ordering::SeqCst), self.delay);
            Box::pin(async move {
                tokio::time::sleep(delay).await;
                let mut resp = Response::new(Empty::new());
                resp.headers_mut().insert("grpc-status", code.to_string().parse().unwrap());
                Ok(resp)
            })
        }
    }

    struct Fleet {
        balance: Balance<Fake>,
        fakes: HashMap<SocketAddr, Fake>,
    }

    fn addr(port: u16) -> EndpointAddr {
        EndpointAddr { addr: ([10, 0, 0, 1], port).into(), host: "svc".into() }
    }

    /// Endpoints on ports `p` answering after `d` ms; all of them in the set.
    fn fleet(delays: &[(u16, u64)]) -> Fleet {
        let fakes: HashMap<SocketAddr, Fake> = delays
            .iter()
            .map(|(p, d)| {
                let fake =
                    Fake { code: Arc::new(AtomicU8::new(0)), delay: MS * *d as u32, calls: Arc::default() };
                (addr(*p).addr, fake)
            })
            .collect();
        let config = BreakerConfig { consecutive_failures: 2, ..BreakerConfig::default() };
        let make_fakes = fakes.clone();
        // Short default and decay so that tests see the estimates move.
        let ewma = BalanceConfig { default_rtt: MS, decay: Duration::from_secs(1) };
        let balance = Balance::new("svc", ewma, ClientMetrics::default(), move |a| {
            CircuitBreakerLayer::new(&config, "svc", a.to_string(), ClientMetrics::default())
                .layer(make_fakes[&a.addr].clone())
        });
        balance.set_endpoints(delays.iter().map(|(p, _)| addr(*p)));
        Fleet { balance, fakes }
    }

    impl Fleet {
        fn calls(&self, port: u16) -> usize {
            self.fakes[&addr(port).addr].calls.load(Ordering::SeqCst)
        }

        fn fail(&self, port: u16) {
            self.fakes[&addr(port).addr].code.store(tonic::Code::Unavailable as u8, Ordering::SeqCst);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_faster_endpoint_gets_most_calls() {
        let f = fleet(&[(1, 1), (2, 20)]);
        let mut svc = f.balance.clone();
        for _ in 0..200 {
            svc.call(Request::new(())).await.unwrap();
        }
        assert!(f.calls(1) > 180, "fast {} slow {}", f.calls(1), f.calls(2));
        assert!(f.calls(2) >= 1, "the slow one still gets probed");
    }

    #[tokio::test(start_paused = true)]
    async fn load_spreads_by_calls_in_flight() {
        let f = fleet(&[(1, 10), (2, 10), (3, 10)]);
        let calls: Vec<_> = (0..30).map(|_| f.balance.clone().call(Request::new(()))).collect();
        for r in futures::future::join_all(calls).await {
            r.unwrap();
        }
        for p in 1..=3 {
            assert!((6..=14).contains(&f.calls(p)), "{p}: {}", f.calls(p));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_failing_endpoint_is_ejected_and_all_open_fails_fast() {
        let f = fleet(&[(1, 1), (2, 1), (3, 1)]);
        f.fail(2);
        let mut svc = f.balance.clone();
        for _ in 0..100 {
            let _ = svc.call(Request::new(())).await.unwrap();
        }
        assert!(f.calls(2) <= 3, "two failures open it: {}", f.calls(2));
        let states: Vec<_> =
            f.balance.endpoints().into_iter().map(|e| (e.addr.addr.port(), e.state)).collect();
        assert!(states.contains(&(2, BreakerState::Open)), "{states:?}");

        f.fail(1);
        f.fail(3);
        for _ in 0..10 {
            let _ = svc.call(Request::new(())).await;
        }
        let before: usize = (1..=3).map(|p| f.calls(p)).sum();
        let start = Instant::now();
        let err = svc.call(Request::new(())).await.unwrap_err();
        assert_eq!(start.elapsed(), Duration::ZERO, "no waiting");
        assert_eq!(err.to_string(), "svc: circuit breaker open on all 3 endpoints, not calling");
        assert_eq!((1..=3).map(|p| f.calls(p)).sum::<usize>(), before, "nothing sent");
    }

    #[tokio::test(start_paused = true)]
    async fn retries_go_elsewhere_and_endpoint_changes_keep_state() {
        let f = fleet(&[(1, 1), (2, 1), (3, 1)]);
        f.balance.set_endpoints([addr(1), addr(2)]);
        for _ in 0..20 {
            let attempts = Attempts::default();
            attempts.push(addr(1).addr.to_string().into());
            let mut req = Request::new(());
            req.extensions_mut().insert(attempts);
            f.balance.clone().call(req).await.unwrap();
        }
        assert_eq!((f.calls(1), f.calls(2)), (0, 20), "the endpoint that failed the call is avoided");

        f.fail(2);
        let mut svc = f.balance.clone();
        for _ in 0..20 {
            let _ = svc.call(Request::new(())).await;
        }
        // Port 2 stays (and stays open), port 1 goes, port 3 arrives.
        f.balance.set_endpoints([addr(2), addr(3)]);
        let eps: Vec<_> = f.balance.endpoints().into_iter().map(|e| (e.addr.addr.port(), e.state)).collect();
        assert_eq!(eps, vec![(2, BreakerState::Open), (3, BreakerState::Closed)]);
        let before = f.calls(1);
        for _ in 0..10 {
            svc.call(Request::new(())).await.unwrap();
        }
        assert_eq!((f.calls(1), f.calls(3)), (before, 10));
        f.balance.set_endpoints([]);
        let err = svc.call(Request::new(())).await.unwrap_err();
        assert!(err.to_string().starts_with("svc: no endpoints"), "{err}");
    }

    #[tokio::test(start_paused = true)]
    async fn calls_wait_for_the_first_resolution() {
        let balance: Balance<Fake> =
            Balance::new("svc", BalanceConfig::default(), ClientMetrics::default(), |_| {
                unreachable!("no endpoints in this test")
            });
        let mut svc = balance.clone();
        let call = tokio::spawn(async move { svc.call(Request::new(())).await.map(|_| ()) });
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(!call.is_finished(), "waits while nothing is resolved");
        balance.resolution_failed("cannot resolve svc: no such host");
        let err = call.await.unwrap().unwrap_err();
        assert_eq!(err.to_string(), "svc: no endpoints (cannot resolve svc: no such host)");
    }
}

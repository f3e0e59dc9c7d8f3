//! gRPC health (`grpc.health.v1`) with the mesh's semantics:
//!
//! - `liveness` is SERVING while the process runs, never tied to dependencies;
//! - `readiness`, `""` and every served service's full name are SERVING while
//!   this pod can answer calls — its degraded modes included — and the server
//!   is not draining. Each dependency says how it bears on that ([`Need`]):
//!   required, one of a group (e.g. the PostgreSQL primary *or* a replica),
//!   or only reported. A shared dependency the service degrades around never
//!   takes readiness down: that would take every pod out of its Service at
//!   once, degraded answers included;
//! - `dependency:<name>` (e.g. `dependency:redis`) is SERVING while that
//!   dependency's check passes, whatever its [`Need`], for dashboards and
//!   alerts (Check and Watch); it is NOT_SERVING until the first check
//!   passed. The same state is the gauge `mesh_dependency_up{dependency}`.
//!
//! Checks run periodically in one task; a dependency counts as down after
//! `failure_threshold` consecutive failures and as up after one success.
//!
//! The service follows the `grpc.health.v1` spec (grpc/grpc
//! `doc/health-checking.md`): Check of a name the server does not know is
//! NOT_FOUND; Watch sends the current status at once, then one message per
//! change of that name's status (never a repeat), and for an unknown name
//! sends SERVICE_UNKNOWN and keeps the stream open, following the name if it
//! appears later. Watch streams end with UNAVAILABLE once the server stops
//! taking calls (after the drain delay), so they never hold up shutdown.

use std::{
    collections::BTreeMap,
    fmt,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use futures::{FutureExt, Stream, future::BoxFuture};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tonic_health::pb::{
    HealthCheckRequest, HealthCheckResponse,
    health_check_response::ServingStatus,
    health_server::{self, HealthServer},
};

use crate::metrics::{DependencyLabels, HealthMetrics};

/// The health service name that reports process liveness.
pub const LIVENESS: &str = "liveness";
/// The health service name that reports readiness to take traffic.
pub const READINESS: &str = "readiness";
/// Prefix of the health name of each dependency: `dependency:redis`, …
pub const DEPENDENCY_PREFIX: &str = "dependency:";

/// The health name under which the dependency `name` is reported, e.g.
/// `dependency:postgres-primary`.
pub fn dependency_name(name: &str) -> String {
    format!("{DEPENDENCY_PREFIX}{name}")
}

type CheckFn = dyn Fn() -> BoxFuture<'static, Result<(), String>> + Send + Sync;

/// A named dependency check, e.g. "redis" or "postgres-primary". The error
/// string is logged; it must not carry secrets.
#[derive(Clone)]
pub struct Check {
    name: String,
    f: Arc<CheckFn>,
}

impl fmt::Debug for Check {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Check").field("name", &self.name).finish()
    }
}

impl Check {
    /// A check named `name` that runs `f`.
    pub fn new<F, Fut>(name: impl Into<String>, f: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), String>> + Send + 'static,
    {
        Self { name: name.into(), f: Arc::new(move || f().boxed()) }
    }

    /// The dependency's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    async fn run(&self, timeout: Duration) -> Result<(), String> {
        match tokio::time::timeout(timeout, (self.f)()).await {
            Ok(r) => r,
            Err(_) => Err(format!("no answer within {timeout:?}")),
        }
    }
}

/// Check of another service reached through `channel` (e.g. a mesh client's
/// channel, with its balancing and breaker): passes while the service's
/// `readiness` answers SERVING (grpc.health.v1 Check). Named `name`, e.g.
/// `session`; the error says the status or the gRPC code, never an address.
pub fn remote_check<T>(name: impl Into<String>, channel: T) -> Check
where
    T: tonic::client::GrpcService<tonic::body::Body> + Clone + Send + Sync + 'static,
    T::Error: Into<tonic::codegen::StdError>,
    T::Future: Send,
    T::ResponseBody: tonic::codegen::Body<Data = tonic::codegen::Bytes> + Send + 'static,
    <T::ResponseBody as tonic::codegen::Body>::Error: Into<tonic::codegen::StdError> + Send,
{
    use tonic_health::pb::{HealthCheckRequest, health_check_response, health_client::HealthClient};
    Check::new(name, move || {
        let mut client = HealthClient::new(channel.clone());
        async move {
            let request = HealthCheckRequest { service: READINESS.to_owned() };
            match client.check(request).await {
                Ok(r) if r.get_ref().status() == health_check_response::ServingStatus::Serving => Ok(()),
                Ok(r) => Err(format!("readiness is {:?}", r.get_ref().status())),
                Err(s) => Err(format!("health check failed: {:?}", s.code())),
            }
        }
    })
}

/// How a dependency bears on readiness (it is reported under
/// `dependency:<name>` and in `mesh_dependency_up` in every case).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// The pod cannot answer anything without it: readiness follows it
    /// (e.g. the session service's Redis Cluster).
    Required,
    /// The pod can answer while at least one dependency registered with the
    /// same group name is up (e.g. `"postgres"` for the primary and the
    /// replicas of a service that serves reads while its primary is down).
    AnyOf(&'static str),
    /// The service degrades around it (a fallback, an outbox): reported
    /// only, readiness never follows it.
    Reported,
}

/// A check with its [`Need`].
#[derive(Debug, Clone)]
pub(crate) struct Dependency {
    pub(crate) check: Check,
    pub(crate) need: Need,
}

impl Dependency {
    /// The readiness group it belongs to, if any.
    fn group(&self) -> Option<&str> {
        match self.need {
            Need::Required => Some(&self.check.name),
            Need::AnyOf(g) => Some(g),
            Need::Reported => None,
        }
    }
}

/// Whether every readiness group has at least one dependency up.
fn ready_from(deps: &[Dependency], up: &BTreeMap<String, bool>) -> bool {
    let mut groups: BTreeMap<&str, bool> = BTreeMap::new();
    for d in deps {
        if let Some(g) = d.group() {
            let is_up = up.get(&d.check.name).copied().unwrap_or(false);
            *groups.entry(g).or_default() |= is_up;
        }
    }
    groups.values().all(|u| *u)
}

fn status(up: bool) -> ServingStatus {
    if up { ServingStatus::Serving } else { ServingStatus::NotServing }
}

/// The status of every known health name; a change wakes Watch streams.
type Statuses = watch::Sender<BTreeMap<String, ServingStatus>>;

/// Sets `name`'s status in `statuses`, waking watchers only on a change.
fn set_status(statuses: &Statuses, name: &str, new: ServingStatus) {
    statuses.send_if_modified(|m| m.insert(name.to_owned(), new) != Some(new));
}

/// Drives the health service. Cloneable; every clone controls the same state.
#[derive(Clone)]
pub struct Health {
    statuses: Arc<Statuses>,
    names: Arc<Vec<String>>,
    draining: Arc<AtomicBool>,
    ready_tx: Arc<watch::Sender<bool>>,
    // Serialises publications so a check round can never overwrite a drain.
    publish_lock: Arc<std::sync::Mutex<()>>,
    // Cancelled when the server stops taking calls: Watch streams end.
    closed: CancellationToken,
    metrics: HealthMetrics,
}

impl fmt::Debug for Health {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Health")
            .field("names", &self.names)
            .field("ready", &*self.ready_tx.borrow())
            .field("draining", &self.draining.load(Ordering::Relaxed))
            .finish()
    }
}

impl Health {
    /// The health state, with `liveness` SERVING, readiness (and `""` and
    /// `service_names`) NOT_SERVING and every dependency of `deps`
    /// NOT_SERVING until checked, and the gRPC service that serves it.
    pub(crate) fn new(
        service_names: Vec<String>,
        deps: &[Dependency],
        metrics: HealthMetrics,
    ) -> (Self, HealthServer<HealthService>) {
        let mut names = vec![READINESS.to_owned(), String::new()];
        names.extend(service_names);
        let health = Self {
            statuses: Arc::new(watch::channel(BTreeMap::new()).0),
            names: Arc::new(names),
            draining: Arc::new(AtomicBool::new(false)),
            ready_tx: Arc::new(watch::channel(false).0),
            publish_lock: Arc::new(std::sync::Mutex::new(())),
            closed: CancellationToken::new(),
            metrics,
        };
        set_status(&health.statuses, LIVENESS, ServingStatus::Serving);
        // Registered before serving starts, so no Check sees them unknown.
        for d in deps {
            set_status(&health.statuses, &dependency_name(&d.check.name), ServingStatus::NotServing);
            health
                .metrics
                .dependency_up
                .get_or_create(&DependencyLabels { dependency: d.check.name.clone() })
                .set(0);
        }
        health.publish(false);
        let service = HealthService { statuses: health.statuses.subscribe(), closed: health.closed.clone() };
        (health, HealthServer::new(service))
    }

    /// A receiver that sees every readiness change.
    pub fn subscribe(&self) -> watch::Receiver<bool> {
        self.ready_tx.subscribe()
    }

    /// Whether readiness is currently SERVING.
    pub fn is_ready(&self) -> bool {
        *self.ready_tx.borrow()
    }

    /// Marks the server draining: readiness goes NOT_SERVING for good.
    pub async fn drain(&self) {
        self.draining.store(true, Ordering::SeqCst);
        self.publish(false);
    }

    /// Ends every Watch stream (UNAVAILABLE): the server takes no more calls.
    pub(crate) fn close(&self) {
        self.closed.cancel();
    }

    fn publish(&self, ready: bool) {
        let _guard = self.publish_lock.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let ready = ready && !self.draining.load(Ordering::SeqCst);
        self.statuses.send_if_modified(|m| {
            let mut changed = false;
            for name in self.names.iter() {
                changed |= m.insert(name.clone(), status(ready)) != Some(status(ready));
            }
            changed
        });
        self.metrics.ready.set(i64::from(ready));
        self.ready_tx.send_replace(ready);
    }

    /// Runs the checks of `deps` every `interval` until the server drains,
    /// publishing each dependency's state and readiness.
    pub(crate) async fn run_checks(
        self,
        deps: Vec<Dependency>,
        interval: Duration,
        timeout: Duration,
        failure_threshold: u32,
    ) {
        let names = || deps.iter().map(|d| d.check.name.clone());
        let mut failures: BTreeMap<String, u32> = names().map(|n| (n, 0)).collect();
        // Dependencies start out unknown: down until their first check passes
        // (as `new` published them).
        let mut up: BTreeMap<String, bool> = names().map(|n| (n, false)).collect();
        let mut first = true;
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            if self.draining.load(Ordering::SeqCst) {
                return;
            }
            let results = futures::future::join_all(
                deps.iter().map(|d| async move { (d.check.name.clone(), d.check.run(timeout).await) }),
            )
            .await;
            for (name, result) in results {
                let count = failures.entry(name.clone()).or_default();
                let was_up = up.get(&name).copied().unwrap_or(false);
                let is_up = match &result {
                    Ok(()) => {
                        *count = 0;
                        true
                    }
                    Err(_) => {
                        *count += 1;
                        // Until a dependency has been seen up once, one failure is enough.
                        was_up && *count < failure_threshold
                    }
                };
                if is_up != was_up || (first && !is_up) {
                    match &result {
                        Ok(()) => tracing::info!(dependency = %name, "dependency up"),
                        Err(e) => tracing::warn!(dependency = %name, error = %e, "dependency down"),
                    }
                }
                set_status(&self.statuses, &dependency_name(&name), status(is_up));
                up.insert(name.clone(), is_up);
                self.metrics
                    .dependency_up
                    .get_or_create(&DependencyLabels { dependency: name })
                    .set(i64::from(is_up));
            }
            first = false;
            let ready = ready_from(&deps, &up);
            if ready != self.is_ready() && !self.draining.load(Ordering::SeqCst) {
                tracing::info!(ready, "readiness changed");
            }
            self.publish(ready);
        }
    }
}

/// The `grpc.health.v1.Health` service over a [`Health`]'s state (see the
/// module docs for its semantics).
#[derive(Debug)]
pub struct HealthService {
    statuses: watch::Receiver<BTreeMap<String, ServingStatus>>,
    closed: CancellationToken,
}

fn response(status: ServingStatus) -> HealthCheckResponse {
    HealthCheckResponse { status: status.into() }
}

#[tonic::async_trait]
impl health_server::Health for HealthService {
    async fn check(
        &self,
        request: tonic::Request<HealthCheckRequest>,
    ) -> Result<tonic::Response<HealthCheckResponse>, tonic::Status> {
        let name = &request.get_ref().service;
        match self.statuses.borrow().get(name) {
            Some(s) => Ok(tonic::Response::new(response(*s))),
            None => Err(tonic::Status::not_found(format!("unknown service name {name:?}"))),
        }
    }

    type WatchStream =
        std::pin::Pin<Box<dyn Stream<Item = Result<HealthCheckResponse, tonic::Status>> + Send>>;

    async fn watch(
        &self,
        request: tonic::Request<HealthCheckRequest>,
    ) -> Result<tonic::Response<Self::WatchStream>, tonic::Status> {
        let name = request.into_inner().service;
        Ok(tonic::Response::new(Box::pin(watch_stream(self.statuses.clone(), self.closed.clone(), name))))
    }
}

/// The status of `name`, then each change of it, until `closed` (then
/// UNAVAILABLE) or the state is dropped.
fn watch_stream(
    statuses: watch::Receiver<BTreeMap<String, ServingStatus>>,
    closed: CancellationToken,
    name: String,
) -> impl Stream<Item = Result<HealthCheckResponse, tonic::Status>> + Send {
    struct State {
        statuses: watch::Receiver<BTreeMap<String, ServingStatus>>,
        closed: CancellationToken,
        name: String,
        // The status last sent; `None` before the first message.
        last: Option<ServingStatus>,
        ended: bool,
    }
    let state = State { statuses, closed, name, last: None, ended: false };
    futures::stream::unfold(state, |mut st| async move {
        if st.ended {
            return None;
        }
        loop {
            let current = st.statuses.borrow_and_update().get(&st.name).copied();
            let current = current.unwrap_or(ServingStatus::ServiceUnknown);
            if st.last != Some(current) {
                st.last = Some(current);
                return Some((Ok(response(current)), st));
            }
            if st.closed.is_cancelled() {
                st.ended = true;
                return Some((Err(tonic::Status::unavailable("server stopping")), st));
            }
            tokio::select! {
                biased;
                changed = st.statuses.changed() => {
                    if changed.is_err() {
                        return None;
                    }
                }
                () = st.closed.cancelled() => {}
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dep(name: &str, need: Need) -> Dependency {
        Dependency { check: Check::new(name, || async { Ok(()) }), need }
    }

    fn up(states: &[(&str, bool)]) -> BTreeMap<String, bool> {
        states.iter().map(|(n, u)| ((*n).to_owned(), *u)).collect()
    }

    /// The health service of a fresh [`Health`] (names `liveness`,
    /// `readiness`, `""`, `svc`), served over a real socket.
    async fn serve_health()
    -> (Health, tonic_health::pb::health_client::HealthClient<tonic::transport::Channel>) {
        let (health, service) = Health::new(vec!["svc".to_owned()], &[], HealthMetrics::default());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        let channel =
            tonic::transport::Endpoint::from_shared(format!("http://{addr}")).unwrap().connect_lazy();
        (health, tonic_health::pb::health_client::HealthClient::new(channel))
    }

    type Watch = tonic::Streaming<HealthCheckResponse>;

    async fn watch(
        client: &mut tonic_health::pb::health_client::HealthClient<tonic::transport::Channel>,
        name: &str,
    ) -> Watch {
        client.watch(HealthCheckRequest { service: name.to_owned() }).await.unwrap().into_inner()
    }

    /// The next message within a second.
    async fn next(w: &mut Watch) -> ServingStatus {
        let msg = tokio::time::timeout(Duration::from_secs(1), w.message()).await;
        msg.expect("a message within 1 s").expect("no error").expect("stream open").status()
    }

    /// No message (and no end) arrives on `w` before the round trip of a
    /// Check on the same server: every publication made before has been
    /// applied by then, so a repeat would already be on its way.
    async fn quiet(
        w: &mut Watch,
        client: &mut tonic_health::pb::health_client::HealthClient<tonic::transport::Channel>,
    ) {
        for _ in 0..3 {
            client.check(HealthCheckRequest { service: LIVENESS.to_owned() }).await.unwrap();
        }
        let got = tokio::time::timeout(Duration::from_millis(200), w.message()).await;
        assert!(got.is_err(), "expected no message and an open stream, got {got:?}");
    }

    #[tokio::test]
    async fn check_of_an_unknown_name_is_not_found() {
        let (_health, mut client) = serve_health().await;
        let got = client.check(HealthCheckRequest { service: "no.such.Service".to_owned() }).await;
        assert_eq!(got.unwrap_err().code(), tonic::Code::NotFound);
        let got = client.check(HealthCheckRequest { service: LIVENESS.to_owned() }).await.unwrap();
        assert_eq!(got.into_inner().status(), ServingStatus::Serving);
    }

    #[tokio::test]
    async fn watch_of_an_unknown_name_stays_open_and_follows_it_once_it_appears() {
        let (health, mut client) = serve_health().await;
        let mut w = watch(&mut client, "later").await;
        assert_eq!(next(&mut w).await, ServingStatus::ServiceUnknown);
        quiet(&mut w, &mut client).await;
        set_status(&health.statuses, "later", ServingStatus::NotServing);
        assert_eq!(next(&mut w).await, ServingStatus::NotServing);
        set_status(&health.statuses, "later", ServingStatus::Serving);
        assert_eq!(next(&mut w).await, ServingStatus::Serving);
    }

    #[tokio::test]
    async fn watch_sends_only_changes() {
        let (health, mut client) = serve_health().await;
        let mut ready = watch(&mut client, READINESS).await;
        let mut svc = watch(&mut client, "svc").await;
        let mut live = watch(&mut client, LIVENESS).await;
        assert_eq!(next(&mut ready).await, ServingStatus::NotServing);
        assert_eq!(next(&mut svc).await, ServingStatus::NotServing);
        assert_eq!(next(&mut live).await, ServingStatus::Serving);
        // Every check round publishes; only the first of these is a change.
        for _ in 0..5 {
            health.publish(true);
        }
        assert_eq!(next(&mut ready).await, ServingStatus::Serving);
        assert_eq!(next(&mut svc).await, ServingStatus::Serving);
        quiet(&mut ready, &mut client).await;
        quiet(&mut svc, &mut client).await;
        quiet(&mut live, &mut client).await;
        // A change of another name wakes nobody here.
        set_status(&health.statuses, "dependency:x", ServingStatus::Serving);
        quiet(&mut ready, &mut client).await;
        health.drain().await;
        assert_eq!(next(&mut ready).await, ServingStatus::NotServing);
        health.publish(true);
        quiet(&mut ready, &mut client).await;
        assert!(!health.is_ready(), "a check round never overrides the drain");
    }

    #[tokio::test]
    async fn watch_ends_unavailable_when_the_server_closes() {
        let (health, mut client) = serve_health().await;
        let mut w = watch(&mut client, LIVENESS).await;
        assert_eq!(next(&mut w).await, ServingStatus::Serving);
        let mut unknown = watch(&mut client, "never").await;
        assert_eq!(next(&mut unknown).await, ServingStatus::ServiceUnknown);
        health.close();
        for w in [&mut w, &mut unknown] {
            let end =
                tokio::time::timeout(Duration::from_secs(1), w.message()).await.expect("ends within 1 s");
            assert_eq!(end.unwrap_err().code(), tonic::Code::Unavailable);
        }
    }

    #[test]
    fn readiness_needs_each_group_but_not_reported_dependencies() {
        let deps = [
            dep("primary", Need::AnyOf("pg")),
            dep("replica", Need::AnyOf("pg")),
            dep("redis", Need::Reported),
        ];
        assert!(ready_from(&deps, &up(&[("primary", false), ("replica", true), ("redis", false)])));
        assert!(ready_from(&deps, &up(&[("primary", true), ("replica", false), ("redis", false)])));
        assert!(!ready_from(&deps, &up(&[("primary", false), ("replica", false), ("redis", true)])));

        let deps = [dep("redis", Need::Required), dep("audit", Need::Reported)];
        assert!(!ready_from(&deps, &up(&[("redis", false), ("audit", true)])));
        assert!(ready_from(&deps, &up(&[("redis", true), ("audit", false)])));
        // Nothing required: the pod can always answer.
        assert!(ready_from(&[dep("redis", Need::Reported)], &up(&[("redis", false)])));
    }
}

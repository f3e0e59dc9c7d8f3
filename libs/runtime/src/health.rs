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

use std::{
    collections::BTreeMap,
    fmt,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use futures::{FutureExt, future::BoxFuture};
use tokio::sync::watch;
use tonic_health::{ServingStatus, server::HealthReporter};

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

/// Drives the health service. Cloneable; every clone controls the same state.
#[derive(Clone)]
pub struct Health {
    reporter: HealthReporter,
    names: Arc<Vec<String>>,
    draining: Arc<AtomicBool>,
    ready_tx: Arc<watch::Sender<bool>>,
    // Serialises publications so a check round can never overwrite a drain.
    publish_lock: Arc<tokio::sync::Mutex<()>>,
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
    pub(crate) async fn new(
        reporter: HealthReporter,
        service_names: Vec<String>,
        metrics: HealthMetrics,
    ) -> Self {
        let mut names = vec![READINESS.to_owned(), String::new()];
        names.extend(service_names);
        let health = Self {
            reporter,
            names: Arc::new(names),
            draining: Arc::new(AtomicBool::new(false)),
            ready_tx: Arc::new(watch::channel(false).0),
            publish_lock: Arc::new(tokio::sync::Mutex::new(())),
            metrics,
        };
        health.reporter.set_service_status(LIVENESS, ServingStatus::Serving).await;
        health.publish(false).await;
        health
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
        self.publish(false).await;
    }

    async fn publish(&self, ready: bool) {
        let _guard = self.publish_lock.lock().await;
        let ready = ready && !self.draining.load(Ordering::SeqCst);
        for name in self.names.iter() {
            self.reporter.set_service_status(name, status(ready)).await;
        }
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
        // Dependencies start out unknown: down until their first check passes.
        let mut up: BTreeMap<String, bool> = names().map(|n| (n, false)).collect();
        for name in names() {
            self.reporter.set_service_status(dependency_name(&name), ServingStatus::NotServing).await;
            self.metrics.dependency_up.get_or_create(&DependencyLabels { dependency: name }).set(0);
        }
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
                if is_up != was_up {
                    self.reporter.set_service_status(dependency_name(&name), status(is_up)).await;
                }
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
            self.publish(ready).await;
        }
    }
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

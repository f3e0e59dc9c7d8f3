//! gRPC health (`grpc.health.v1`) with the mesh's semantics:
//!
//! - `liveness` is SERVING while the process runs, never tied to dependencies;
//! - `readiness`, `""` and every served service's full name are SERVING only
//!   while every dependency check passes and the server is not draining.
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
        let status = if ready { ServingStatus::Serving } else { ServingStatus::NotServing };
        for name in self.names.iter() {
            self.reporter.set_service_status(name, status).await;
        }
        self.metrics.ready.set(i64::from(ready));
        self.ready_tx.send_replace(ready);
    }

    /// Runs `checks` every `interval` until the server drains, publishing readiness.
    pub(crate) async fn run_checks(
        self,
        checks: Vec<Check>,
        interval: Duration,
        timeout: Duration,
        failure_threshold: u32,
    ) {
        let mut failures: BTreeMap<String, u32> = checks.iter().map(|c| (c.name.clone(), 0)).collect();
        // Dependencies start out unknown: not ready until the first round passes.
        let mut up: BTreeMap<String, bool> = checks.iter().map(|c| (c.name.clone(), false)).collect();
        let mut first = true;
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            if self.draining.load(Ordering::SeqCst) {
                return;
            }
            let results = futures::future::join_all(
                checks.iter().map(|c| async move { (c.name.clone(), c.run(timeout).await) }),
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
                up.insert(name.clone(), is_up);
                self.metrics
                    .dependency_up
                    .get_or_create(&DependencyLabels { dependency: name })
                    .set(i64::from(is_up));
            }
            first = false;
            let ready = up.values().all(|u| *u);
            if ready != self.is_ready() && !self.draining.load(Ordering::SeqCst) {
                tracing::info!(ready, "readiness changed");
            }
            self.publish(ready).await;
        }
    }
}

//! Startup and serving, and the admission limit in front of both APIs.
//!
//! # Admission
//! At most [`EngineConfig::max_in_flight`] calls (Check, ShouldRateLimit,
//! Reset, GetRules together) are being decided at once; a call past it waits
//! for a slot, first come first served, for at most
//! [`EngineConfig::queue_wait`] (or the caller's `grpc-timeout`, if
//! shorter), and is then shed with RESOURCE_EXHAUSTED ("rate-limit service
//! overloaded …", with a `google.rpc.RetryInfo` of 250 ms), counted in
//! `mesh_ratelimit_shed_total`. Shed calls cost no
//! Redis command and decide nothing: the caller's own failure mode decides
//! them (RESOURCE_EXHAUSTED does not count against the caller's circuit
//! breaker, and is not retried). Bounding the calls bounds the Redis commands
//! in flight, so Redis answers within the deadline at any number of callers
//! instead of every call queueing past it and falling back to local limits.
//! `mesh_ratelimit_in_flight` is the number being decided.

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use mesh_proto::{
    envoy_rls::rate_limit_service_server::RateLimitServiceServer as EnvoyServer,
    ratelimit::rate_limit_service_server::RateLimitServiceServer,
};
use mesh_runtime::{
    ConfigError, ServeError, Server,
    grpc::{GRPC_TIMEOUT, parse_grpc_timeout},
};
use prometheus_client::metrics::{counter::Counter, gauge::Gauge};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::{
    Code, Status,
    body::Body,
    codegen::{BoxFuture, Service, http},
    server::NamedService,
};
use tonic_types::{ErrorDetails, StatusExt as _};

use crate::{
    Config, EngineConfig,
    api::Api,
    config::keys,
    engine::Engine,
    metrics::{Metrics, ResultLabels},
    rules::{self, Reload, Rules, RulesHandle},
    store::Store,
};

/// Why the service could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Bad configuration.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The rules could not be loaded.
    #[error("{key}: {reason}")]
    Rules {
        /// The environment variable naming the rules.
        key: &'static str,
        /// What is wrong with them.
        reason: String,
    },
    /// Listeners could not be bound.
    #[error(transparent)]
    Serve(#[from] ServeError),
}

impl mesh_runtime::StartFailure for StartError {
    /// A bad rules file is as much a configuration error as a bad variable.
    fn is_config(&self) -> bool {
        matches!(self, Self::Config(_) | Self::Rules { .. })
    }
}

/// The rate-limit service, bound and connected, ready to serve.
#[derive(Debug)]
pub struct App {
    server: Server,
    background: Vec<tokio::task::JoinHandle<()>>,
}

impl App {
    /// Loads the rules, binds the listeners and connects to Redis (in the
    /// background). Readiness never follows Redis: without it every domain
    /// answers by its failure mode; `dependency:redis` reports it.
    pub async fn build(config: Config) -> Result<Self, StartError> {
        // Rules first: a bad rules file is a configuration error at startup
        // (a reload, instead, keeps the rules in force).
        let initial = match &config.rules {
            Some(path) => {
                rules::load_path(path).map_err(|e| StartError::Rules { key: keys::RULES, reason: e.0 })?
            }
            None => {
                tracing::warn!("{} is not set: no rules, every descriptor is allowed", keys::RULES);
                Rules::empty()
            }
        };
        let mut server = Server::bind(config.server).await?;
        let metrics = Metrics::register(server.registry());
        metrics.domains.set(initial.domains.len() as i64);
        metrics.initialize(&initial);
        let handle = RulesHandle::new(initial);

        let redis = mesh_runtime::redis::connect(&config.redis)?;
        // Redis down, every domain still answers by its failure mode (the
        // local fallback limiter or a refusal): reported, never readiness.
        server.add_dependency(mesh_runtime::redis::check(&redis), mesh_runtime::Need::Reported);
        let e = &config.engine;
        let store = Store::new(redis.clone(), e, metrics.clone());
        let engine = Arc::new(Engine::new(
            handle.clone(),
            store,
            e.local_cache_size,
            e.local_cache_recheck,
            e.fallback_size,
            metrics.clone(),
            config.redis.key_prefix.clone(),
        ));

        let mut background = vec![tokio::spawn(crate::store::preload_scripts(redis))];
        if let Some(path) = &config.rules {
            let engine = engine.clone();
            background.push(rules::watch(handle, path.clone(), e.rules_poll, move |result, rules| {
                let result = match result {
                    Reload::Loaded => {
                        engine.rules_changed();
                        metrics.domains.set(rules.domains.len() as i64);
                        metrics.initialize(rules);
                        "ok"
                    }
                    Reload::Failed => "error",
                };
                metrics.reloads.get_or_create(&ResultLabels { result }).inc();
            }));
        }

        let gate = Gate::register(e, server.registry());
        let api = Api::new(engine, config.engine.rate_limit_headers);
        server.add_service(Admit { inner: RateLimitServiceServer::new(api.clone()), gate: gate.clone() });
        server.add_service(Admit { inner: EnvoyServer::new(api), gate });
        Ok(Self { server, background })
    }

    /// The gRPC address.
    pub fn local_addr(&self) -> SocketAddr {
        self.server.local_addr()
    }

    /// The metrics address.
    pub fn metrics_addr(&self) -> SocketAddr {
        self.server.metrics_addr()
    }

    /// Serves until `shutdown` resolves, then drains.
    pub async fn serve(self, shutdown: impl Future<Output = ()> + Send + 'static) -> Result<(), ServeError> {
        let result = self.server.serve(shutdown).await;
        for task in &self.background {
            task.abort();
        }
        result
    }
}

/// How long startup waits for Redis before loading the scripts anyway
/// (`EVALSHA` reloads them on `NOSCRIPT` in any case).
pub(crate) const SCRIPT_PRELOAD_WAIT: Duration = Duration::from_secs(30);

/// When a shed call is told to come back (`google.rpc.RetryInfo`): long
/// enough for the slots to have turned over many times at any sane rate.
pub(crate) const SHED_RETRY_AFTER: Duration = Duration::from_millis(250);

/// What a shed call is answered.
pub(crate) const OVERLOADED: &str =
    "rate-limit service overloaded: too many checks in flight, try again later";

/// The admission limit shared by both APIs (module docs).
#[derive(Debug)]
struct Gate {
    slots: Arc<Semaphore>,
    wait: Duration,
    /// The `google.rpc.RetryInfo` delay of a shed call.
    retry_after: Duration,
    shed: Counter,
    in_flight: Gauge,
}

impl Gate {
    fn register(config: &EngineConfig, registry: &mut prometheus_client::registry::Registry) -> Arc<Self> {
        let gate = Self {
            slots: Arc::new(Semaphore::new(config.max_in_flight)),
            wait: config.queue_wait,
            retry_after: SHED_RETRY_AFTER,
            shed: Counter::default(),
            in_flight: Gauge::default(),
        };
        registry.register(
            "mesh_ratelimit_shed",
            "Calls answered RESOURCE_EXHAUSTED without a decision: no slot freed within the queue wait",
            gate.shed.clone(),
        );
        registry.register("mesh_ratelimit_in_flight", "Calls being decided now", gate.in_flight.clone());
        Arc::new(gate)
    }

    /// A slot, or `None` (counted as shed) when none frees within the wait.
    async fn enter(&self, caller: Option<Duration>) -> Option<Slot> {
        let permit = match self.slots.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                let wait = caller.map_or(self.wait, |c| c.min(self.wait));
                match tokio::time::timeout(wait, self.slots.clone().acquire_owned()).await {
                    Ok(Ok(p)) => p,
                    _ => {
                        self.shed.inc();
                        return None;
                    }
                }
            }
        };
        self.in_flight.inc();
        Some(Slot { _permit: permit, in_flight: self.in_flight.clone() })
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

/// A gRPC service behind the [`Gate`].
#[derive(Debug, Clone)]
struct Admit<S> {
    inner: S,
    gate: Arc<Gate>,
}

impl<S: NamedService> NamedService for Admit<S> {
    const NAME: &'static str = S::NAME;
}

impl<S> Service<http::Request<Body>> for Admit<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Infallible>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        // The clone that was polled ready serves this call.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let gate = self.gate.clone();
        Box::pin(async move {
            let caller =
                req.headers().get(GRPC_TIMEOUT).and_then(|v| v.to_str().ok()).and_then(parse_grpc_timeout);
            let Some(_slot) = gate.enter(caller).await else {
                let details = ErrorDetails::with_retry_info(Some(gate.retry_after));
                let status = Status::with_error_details(Code::ResourceExhausted, OVERLOADED, details);
                return Ok(status.into_http());
            };
            inner.call(req).await
        })
    }
}

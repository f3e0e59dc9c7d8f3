//! Startup and serving.
//!
//! # Admission
//! Both APIs sit behind the runtime's admission control (`mesh_runtime::admission`):
//! at most `MESH_MAX_IN_FLIGHT` calls (Check, ShouldRateLimit, Reset, GetRules
//! together; 32 here, [`crate::config::MAX_IN_FLIGHT`]) are decided at once,
//! the rest wait up to `MESH_QUEUE_WAIT_MS` (250 ms here) and are then shed with
//! RESOURCE_EXHAUSTED and a `google.rpc.RetryInfo`, counted in
//! `mesh_server_shed_total`. Shed calls cost no Redis command and decide
//! nothing: the caller's own failure mode decides them (RESOURCE_EXHAUSTED
//! does not count against the caller's circuit breaker, and is not retried).
//! Bounding the calls bounds the Redis commands in flight, so Redis answers
//! within the deadline at any number of callers instead of every call
//! queueing past it and falling back to local limits.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use mesh_proto::{
    envoy_rls::rate_limit_service_server::RateLimitServiceServer as EnvoyServer,
    ratelimit::rate_limit_service_server::RateLimitServiceServer,
};
use mesh_runtime::{ConfigError, ServeError, Server};

use crate::{
    Config,
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
        let admin_server = config.server.clone();
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

        let audit = match &config.audit {
            Some(clients) => {
                let metrics = mesh_client::ClientMetrics::register(server.registry());
                Some(mesh_client::AuditClient::from_config(clients, &metrics)?.denial_sink())
            }
            None => None,
        };
        let admin = mesh_runtime::AdminGuard::new(
            &admin_server,
            "mesh-ratelimit",
            &[crate::api::RESET],
            audit,
            server.registry(),
        );
        let api = Api::new(engine, config.engine.rate_limit_headers, admin);
        server.add_service(RateLimitServiceServer::new(api.clone()));
        server.add_service(EnvoyServer::new(api));
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

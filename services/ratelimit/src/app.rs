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
    /// background: the service starts, not ready, while Redis is down).
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
        // Both series exist from the start, so alerts on increase() see the first error.
        let _ = metrics.reloads.get_or_create(&ResultLabels { result: "ok" });
        let _ = metrics.reloads.get_or_create(&ResultLabels { result: "error" });
        let handle = RulesHandle::new(initial);

        let redis = mesh_runtime::redis::connect(&config.redis)?;
        server.add_check(mesh_runtime::redis::check(&redis));
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
                        "ok"
                    }
                    Reload::Failed => "error",
                };
                metrics.reloads.get_or_create(&ResultLabels { result }).inc();
            }));
        }

        let api = Api::new(engine);
        server.add_service(RateLimitServiceServer::new(api.clone()));
        server.add_service(EnvoyServer::new(api));
        // So grpcurl can print the google.rpc.BadRequest details of INVALID_ARGUMENT.
        server.add_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET);
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

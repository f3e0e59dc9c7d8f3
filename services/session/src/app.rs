use std::{net::SocketAddr, sync::Arc};

use fred::{clients::Pool, interfaces::ClientLike as _};
use mesh_client::{AuditClient, ClientMetrics, RateLimitClient, config::keys as client_keys};
use mesh_proto::{
    envoy_authz::authorization_server::AuthorizationServer,
    session::session_service_server::SessionServiceServer,
};
use mesh_runtime::{ConfigError, ServeError, Server, redis::RedisConfig};
use secrecy::ExposeSecret;
use tokio::task::JoinHandle;

use crate::{
    Config,
    api::Api,
    authz::Authz,
    cache::Cache,
    config::keys,
    limiter::Limiter,
    metrics::Metrics,
    outbox::Drainer,
    pubsub::{Acks, Subscriber},
    store::{Durability, Store},
    token::{AuditHasher, Bucket},
};

/// Why the service could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Bad configuration.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Listeners could not be bound.
    #[error(transparent)]
    Serve(#[from] ServeError),
}

impl mesh_runtime::StartFailure for StartError {
    fn is_config(&self) -> bool {
        matches!(self, Self::Config(_))
    }
}

/// Notifications of new outbox events waiting for the drainer.
const NOTIFY_BUFFER: usize = 1024;

/// The session service, bound and connected, ready to serve.
#[derive(Debug)]
pub struct App {
    server: Server,
    background: Vec<JoinHandle<()>>,
    // Closed when serving ends.
    pools: Vec<Pool>,
}

fn pool(config: &RedisConfig, size: usize) -> Result<Pool, ConfigError> {
    mesh_runtime::redis::connect(&RedisConfig { pool_size: size, ..config.clone() })
}

impl App {
    /// Binds the listeners and connects to Redis (in the background: the
    /// service starts, not ready, while Redis is down). Readiness follows the
    /// Redis Cluster only: the rate-limit and audit services being away
    /// affects CreateSession (see the failure mode) and audit delivery
    /// (it waits in the outbox), never validation.
    pub async fn build(config: Config) -> Result<Self, StartError> {
        let c = &config.session;
        let admin_server = config.server.clone();
        let mut server = Server::bind(config.server).await?;
        let metrics = Metrics::register(server.registry());
        let client_metrics = ClientMetrics::register(server.registry());

        let reads = mesh_runtime::redis::connect(&config.redis)?;
        let writes = pool(&config.redis, c.write_pool_size)?;
        // Without Redis no token can be validated: readiness follows it.
        server.add_dependency(mesh_runtime::redis::check(&reads), mesh_runtime::Need::Required);
        let acks = Arc::new(Acks::default());
        let store = Store::new(
            reads.clone(),
            writes.clone(),
            config.redis.key_prefix.clone(),
            Durability { replicas: c.wait_replicas, timeout: c.wait_timeout },
            c.outbox_ttl,
            acks.clone(),
            c.invalidation_timeout,
            metrics.clone(),
        );
        let mut background = vec![tokio::spawn(crate::store::preload_scripts(reads.clone()))];
        let mut pools = vec![reads.clone(), writes];

        let ratelimit = match &config.clients.ratelimit {
            Some(_) => Some(RateLimitClient::from_config(&config.clients, &client_metrics)?),
            None => {
                tracing::warn!(
                    "{} is not set: CreateSession is not rate limited",
                    client_keys::RATELIMIT_ADDR
                );
                None
            }
        };
        // The services this one calls are reported, never readiness: without
        // them creates follow the failure mode and audit events wait.
        if let Some(r) = &ratelimit {
            let check = mesh_runtime::remote_check("ratelimit", r.channel().clone());
            server.add_dependency(check, mesh_runtime::Need::Reported);
        }
        let hasher = match &c.audit_hash_key {
            Some(k) => AuditHasher::new(k.expose_secret().as_bytes()),
            None => {
                tracing::warn!(
                    "{} is not set: audit token hashes use a random key and differ between instances",
                    keys::AUDIT_HASH_KEY
                );
                AuditHasher::random()
            }
        };
        let (notify_tx, notify_rx) = tokio::sync::mpsc::channel(NOTIFY_BUFFER);
        let mut denial_sink = None;
        let notify = match &config.clients.audit {
            Some(_) => {
                let audit = AuditClient::from_config(&config.clients, &client_metrics)?;
                denial_sink = Some(audit.denial_sink());
                let check = mesh_runtime::remote_check("audit", audit.channel().clone());
                server.add_dependency(check, mesh_runtime::Need::Reported);
                let drainer = Arc::new(Drainer::new(store.clone(), audit, hasher, c, metrics.clone()));
                background.push(tokio::spawn(drainer.run(notify_rx)));
                Some(notify_tx)
            }
            None => {
                tracing::warn!(
                    "{} is not set: audit events wait in the outbox for an instance that delivers them",
                    client_keys::AUDIT_ADDR
                );
                None
            }
        };

        // Always subscribed, even without a cache of its own: other
        // instances' revocations are acknowledged, and this one's are
        // confirmed, through the same channels.
        let cache = Arc::new(Cache::new(c.cache_max_bytes, metrics.clone()));
        let subscriber = pool(&config.redis, 1)?;
        let channels = Bucket::all().map(|b| store.channel(b)).collect();
        background.extend(
            Subscriber::new(
                subscriber.clone(),
                reads,
                acks,
                store.prefix().to_owned(),
                channels,
                cache.clone(),
                notify,
                metrics.clone(),
            )
            .spawn(),
        );
        pools.push(subscriber);

        let limiter = Limiter::new(ratelimit, c, metrics.clone());
        // Refused admin RPCs change nothing, so their audit events are sent
        // directly rather than through the outbox (mesh_runtime::authz).
        let admin = mesh_runtime::AdminGuard::new(
            &admin_server,
            crate::SOURCE_SERVICE,
            &[crate::api::REVOKE_USER_SESSIONS, crate::api::LIST_USER_SESSIONS],
            denial_sink,
            server.registry(),
        );
        let api = Api::new(store, cache, limiter, c.clone(), metrics, admin);
        server.add_service(AuthorizationServer::new(Authz::new(api.clone(), c.ext_authz.clone())));
        server.add_service(SessionServiceServer::new(api));
        Ok(Self { server, background, pools })
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
        // The outbox is durable: a drain cut short is redelivered, once.
        for task in &self.background {
            task.abort();
        }
        for pool in &self.pools {
            let _ = pool.quit().await;
        }
        result
    }
}

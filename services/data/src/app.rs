use std::net::SocketAddr;

use mesh_client::{AuditClient, ClientMetrics, RateLimitClient, SessionClient, config::keys as client_keys};
use mesh_db::{Db, DbError, MigrateMode};
use mesh_proto::data::data_service_server::DataServiceServer;
use mesh_runtime::{ConfigError, Need, ServeError, Server};
use sqlx::migrate::Migrator;
use tokio::task::JoinHandle;

use crate::{
    Config,
    api::Api,
    guard::Guard,
    metrics::Metrics,
    outbox::{Deliverer, Outbox},
};

/// The service's schema, embedded at build time (no database needed to build).
static MIGRATOR: Migrator = sqlx::migrate!("./migrations");

/// Why the service could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Bad configuration.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Listeners could not be bound.
    #[error(transparent)]
    Serve(#[from] ServeError),
    /// The database could not be prepared.
    #[error(transparent)]
    Db(#[from] DbError),
}

impl mesh_runtime::StartFailure for StartError {
    fn is_config(&self) -> bool {
        matches!(self, Self::Config(_))
    }
}

/// The data service, bound, connected and migrated, ready to serve.
#[derive(Debug)]
pub struct App {
    server: Server,
    db: Db,
    background: Vec<JoinHandle<()>>,
}

impl App {
    /// `mesh-data migrate`: runs the migrations as `MESH_DATABASE_WRITE_URL`'s
    /// login (the schema owner) and exits (see [`mesh_db::migrate_command`]).
    pub async fn migrate_command() -> std::process::ExitCode {
        mesh_db::migrate_command("mesh-data", crate::config::SCHEMA, &MIGRATOR).await
    }

    /// Binds the listeners, creates the pools, runs migrations on the primary
    /// (`MESH_DATABASE_MIGRATE=on_start`) or checks that the owner ran them
    /// (`verify`: no DDL), waiting up to the configured timeout, and connects
    /// to the session, rate-limit and audit services (lazily: they may come
    /// up later). Readiness follows PostgreSQL only, and only while neither
    /// the primary nor a replica answers: reads go on without the primary.
    pub async fn build(config: Config) -> Result<Self, StartError> {
        let c = &config.data;
        let mut server = Server::bind(config.server).await?;
        let metrics = Metrics::register(server.registry(), c.ratelimit_failure_mode.label());
        let client_metrics = ClientMetrics::register(server.registry());
        let db = Db::connect(&config.db, "mesh-data", server.registry())?;
        match config.db.migrate {
            MigrateMode::OnStart => drop(db.migrate(&MIGRATOR, config.db.migrate_timeout).await?),
            MigrateMode::Verify => {
                db.check_migrations(&MIGRATOR, config.db.migrate_timeout, "mesh-data migrate").await?;
            }
        }
        // Writes need the primary; reads are served by a replica, else the
        // primary: the pod can answer while either is up.
        server.add_dependency(db.primary_check(), Need::AnyOf("postgres"));
        if let Some(replicas) = db.replica_check() {
            server.add_dependency(replicas, Need::AnyOf("postgres"));
        }

        let session = SessionClient::from_config(&config.clients, &client_metrics)?;
        // The services this one calls are reported, never readiness: every
        // data pod shares them, so their loss would take every pod out at once.
        let check = mesh_runtime::remote_check("session", session.channel().clone());
        server.add_dependency(check, Need::Reported);
        let ratelimit = match &config.clients.ratelimit {
            Some(_) => Some(RateLimitClient::from_config(&config.clients, &client_metrics)?),
            None => {
                tracing::warn!("{} is not set: data calls are not rate limited", client_keys::RATELIMIT_ADDR);
                None
            }
        };
        if let Some(r) = &ratelimit {
            let check = mesh_runtime::remote_check("ratelimit", r.channel().clone());
            server.add_dependency(check, Need::Reported);
        }
        let mut background = Vec::new();
        let outbox = match &config.clients.audit {
            Some(_) => {
                let audit = AuditClient::from_config(&config.clients, &client_metrics)?;
                let check = mesh_runtime::remote_check("audit", audit.channel().clone());
                server.add_dependency(check, Need::Reported);
                let (outbox, tasks) = Deliverer::start(db.clone(), audit, c, metrics.clone());
                background.extend(tasks);
                outbox
            }
            None => {
                tracing::warn!(
                    "{} is not set: audit events wait in the outbox for an instance that delivers them",
                    client_keys::AUDIT_ADDR
                );
                Outbox::undelivered()
            }
        };
        let guard = Guard::new(session, ratelimit, c, metrics.clone());
        server.add_service(DataServiceServer::new(Api::new(db.clone(), guard, outbox, c, metrics)));
        Ok(Self { server, db, background })
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
        // The outbox is durable: a delivery cut short is delivered again, once.
        for task in &self.background {
            task.abort();
        }
        self.db.close().await;
        result
    }
}

use std::net::SocketAddr;

use mesh_db::{Db, DbError};
use mesh_proto::data::data_service_server::DataServiceServer;
use mesh_runtime::{ConfigError, ServeError, Server};
use sqlx::migrate::Migrator;

use crate::{Config, api::Api};

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
}

impl App {
    /// Binds the listeners, creates the pools and runs migrations on the
    /// primary (waiting up to the configured timeout for it to answer).
    pub async fn build(config: Config) -> Result<Self, StartError> {
        let mut server = Server::bind(config.server).await?;
        let db = Db::connect(&config.db, "mesh-data", server.registry())?;
        db.migrate(&MIGRATOR, config.db.migrate_timeout).await?;
        server.add_check(db.primary_check());
        server.add_service(DataServiceServer::new(Api::new(db)));
        Ok(Self { server })
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
        self.server.serve(shutdown).await
    }
}

use std::net::SocketAddr;

use mesh_proto::ratelimit::rate_limit_service_server::RateLimitServiceServer;
use mesh_runtime::{ConfigError, ServeError, Server};

use crate::{Config, api::Api};

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

/// The rate-limit service, bound and connected, ready to serve.
#[derive(Debug)]
pub struct App {
    server: Server,
}

impl App {
    /// Binds the listeners and connects to Redis (in the background: the
    /// service starts, not ready, while Redis is down).
    pub async fn build(config: Config) -> Result<Self, StartError> {
        let mut server = Server::bind(config.server).await?;
        let redis = mesh_runtime::redis::connect(&config.redis)?;
        server.add_check(mesh_runtime::redis::check(&redis));
        server.add_service(RateLimitServiceServer::new(Api::new(redis)));
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

use mesh_proto::ratelimit::SERVICE_NAME;
use mesh_ratelimit::{App, Config};
use mesh_runtime::ServerConfig;
use mesh_testkit::{Infra, Running, redis_prefix, spawn};

/// Full names the service serves (health and reflection).
pub(crate) const SERVED: &[&str] = &[SERVICE_NAME];

/// Configuration against `infra` with a fresh key prefix.
pub(crate) fn config(infra: &Infra) -> Config {
    Config { server: ServerConfig::for_tests(), redis: infra.redis_config(&redis_prefix()), rules: None }
}

/// Builds and spawns the service on 127.0.0.1:0.
pub(crate) async fn spawn_app(config: Config) -> Running {
    let app = App::build(config).await.expect("app builds");
    spawn(app.local_addr(), app.metrics_addr(), |sd| app.serve(sd))
}

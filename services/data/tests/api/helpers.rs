use mesh_data::{App, Config};
use mesh_proto::data::SERVICE_NAME;
use mesh_runtime::ServerConfig;
use mesh_testkit::{Infra, Running, TestDb, spawn};

/// Full names the service serves (health and reflection).
pub(crate) const SERVED: &[&str] = &[SERVICE_NAME];

/// Configuration against `infra` in a fresh schema.
pub(crate) async fn config(infra: &Infra) -> Config {
    let db = TestDb::new(infra).await.expect("test schema");
    Config { server: ServerConfig::for_tests(), db: db.config }
}

/// Builds (migrates) and spawns the service on 127.0.0.1:0.
pub(crate) async fn spawn_app(config: Config) -> Running {
    let app = App::build(config).await.expect("app builds");
    spawn(app.local_addr(), app.metrics_addr(), |sd| app.serve(sd))
}

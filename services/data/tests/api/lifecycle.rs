//! Boot, health, reflection, dependency loss and shutdown.

use std::time::Duration;

use mesh_client::ClientConfig;
use mesh_data::Config;
use mesh_runtime::ServerConfig;
use mesh_testkit::{Infra, PrivateInfra, TestDb, conformance};

use crate::helpers::{SERVED, data_config, spawn_app, stack};

/// The service on `infra` with a session address nothing answers on:
/// health and reflection do not depend on it.
async fn config(infra: &Infra) -> Config {
    let db = TestDb::new(infra).await.expect("test schema");
    Config {
        server: ServerConfig::for_tests(),
        db: db.config,
        clients: ClientConfig {
            session: Some(mesh_testkit::free_addr().to_string().parse().unwrap()),
            ratelimit: None,
            audit: None,
            data: None,
            stack: stack(),
        },
        data: data_config(),
    }
}

#[tokio::test]
async fn serves_health_and_reflection() {
    let _t = mesh_testkit::init_telemetry();
    let app = spawn_app(config(Infra::shared()).await).await;
    conformance::assert_serving(app.addr, SERVED, Duration::from_secs(10)).await.unwrap();
    conformance::assert_reflection(app.addr, SERVED).await.unwrap();
    app.stop().await.unwrap();
}

#[tokio::test]
async fn readiness_follows_the_postgres_primary() {
    let _t = mesh_testkit::init_telemetry();
    let private = PrivateInfra::new();
    private.start_pg().await.unwrap();
    let app = spawn_app(config(&private.infra).await).await;
    let took = conformance::assert_readiness_follows(
        app.addr,
        SERVED,
        Duration::from_secs(5),
        private.stop_pg_primary(),
        private.start_pg(),
    )
    .await
    .unwrap();
    eprintln!("readiness NOT_SERVING {took:?} after the postgres primary stopped");
    app.stop().await.unwrap();
}

#[tokio::test]
async fn sigterm_drains_and_exits_zero() {
    let infra = Infra::shared();
    let db = TestDb::new(infra).await.unwrap();
    let mut env = infra.env(&db.schema, &mesh_testkit::redis_prefix());
    env.push(("MESH_SESSION_ADDR".into(), mesh_testkit::free_addr().to_string()));
    conformance::assert_binary_serves_and_drains(env!("CARGO_BIN_EXE_mesh-data"), SERVED, env).await.unwrap();
}

#[tokio::test]
async fn bad_configuration_exits_64() {
    conformance::assert_bad_configuration_exits_64(env!("CARGO_BIN_EXE_mesh-data")).await.unwrap();
}

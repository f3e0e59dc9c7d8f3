//! Boot, health, reflection, dependency loss and shutdown.

use std::time::Duration;

use mesh_client::ClientConfig;
use mesh_data::Config;
use mesh_runtime::ServerConfig;
use mesh_testkit::{
    Infra, PrivateInfra, TestDb,
    conformance::{self, WhileDown},
    wait_for_health,
};
use tonic_health::pb::health_check_response::ServingStatus;

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
    // The session service is reported, never readiness (every pod shares it).
    let ch = mesh_testkit::channel(app.addr).await;
    wait_for_health(&ch, "dependency:session", ServingStatus::NotServing, Duration::from_secs(5))
        .await
        .unwrap();
    conformance::assert_serving(app.addr, SERVED, Duration::from_secs(1)).await.unwrap();
    conformance::assert_reflection(app.addr, SERVED).await.unwrap();
    app.stop().await.unwrap();
}

/// Reads go on from the replica while the primary is down: the pod stays
/// ready and `dependency:postgres-primary` reports the loss.
#[tokio::test]
async fn readiness_stays_while_the_primary_is_down_and_the_replica_serves() {
    let _t = mesh_testkit::init_telemetry();
    let private = PrivateInfra::new();
    private.start_pg().await.unwrap();
    let app = spawn_app(config(&private.infra).await).await;
    let ch = mesh_testkit::channel(app.addr).await;
    wait_for_health(&ch, "dependency:postgres-replica", ServingStatus::Serving, Duration::from_secs(20))
        .await
        .unwrap();
    let took = conformance::assert_dependency_loss(
        &app,
        SERVED,
        "postgres-primary",
        WhileDown::StaysReady,
        Duration::from_secs(5),
        private.stop_pg_primary(),
        private.start_pg(),
    )
    .await
    .unwrap();
    eprintln!("dependency:postgres-primary NOT_SERVING {took:?} after the primary stopped");

    // Neither the primary nor a replica: the pod cannot answer at all.
    private.stop_pg_primary().await.unwrap();
    wait_for_health(&ch, "dependency:postgres-primary", ServingStatus::NotServing, Duration::from_secs(5))
        .await
        .unwrap();
    conformance::assert_dependency_loss(
        &app,
        SERVED,
        "postgres-replica",
        WhileDown::NotReady,
        Duration::from_secs(5),
        async {
            private.stop_pg_replica().await?;
            Ok(())
        },
        private.start_pg(),
    )
    .await
    .unwrap();
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

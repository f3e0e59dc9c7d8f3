//! Boot, health, reflection, dependency loss and shutdown.

use std::time::Duration;

use mesh_testkit::{
    Infra, PrivateInfra,
    conformance::{self, WhileDown},
};

use crate::helpers::{SERVED, config, spawn_app};

#[tokio::test]
async fn serves_health_and_reflection() {
    let _t = mesh_testkit::init_telemetry();
    let app = spawn_app(config(Infra::shared())).await;
    conformance::assert_serving(app.addr, SERVED, Duration::from_secs(10)).await.unwrap();
    conformance::assert_reflection(app.addr, SERVED).await.unwrap();
    app.stop().await.unwrap();
}

/// Without Redis no token can be validated: the pod cannot answer at all,
/// so readiness follows the cluster, and `dependency:redis` reports it.
#[tokio::test]
async fn readiness_follows_the_redis_cluster() {
    let _t = mesh_testkit::init_telemetry();
    let private = PrivateInfra::new();
    private.start_redis().await.unwrap();
    let app = spawn_app(config(&private.infra)).await;
    let took = conformance::assert_dependency_loss(
        &app,
        SERVED,
        "redis",
        WhileDown::NotReady,
        Duration::from_secs(5),
        private.stop_redis(),
        private.start_redis(),
    )
    .await
    .unwrap();
    eprintln!("readiness NOT_SERVING {took:?} after the redis cluster stopped");
    app.stop().await.unwrap();
}

#[tokio::test]
async fn sigterm_drains_and_exits_zero() {
    let env = Infra::shared().env("unused", &mesh_testkit::redis_prefix());
    conformance::assert_binary_serves_and_drains(env!("CARGO_BIN_EXE_mesh-session"), SERVED, env)
        .await
        .unwrap();
}

#[tokio::test]
async fn bad_configuration_exits_64() {
    conformance::assert_bad_configuration_exits_64(env!("CARGO_BIN_EXE_mesh-session")).await.unwrap();
}

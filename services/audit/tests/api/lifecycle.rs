//! Boot, health, reflection, dependency loss and shutdown.

use std::time::Duration;

use mesh_proto::audit::{EventFilter, QueryRequest};
use mesh_testkit::{
    Infra, PrivateInfra,
    conformance::{self, WhileDown},
    wait_for_health,
};
use tonic_health::pb::health_check_response::ServingStatus;

use crate::helpers::{SERVED, append, client, config, event, eventually, spawn_app};

#[tokio::test]
async fn serves_health_and_reflection() {
    let _t = mesh_testkit::init_telemetry();
    let app = spawn_app(config(Infra::shared()).await).await;
    conformance::assert_serving(app.addr, SERVED, Duration::from_secs(10)).await.unwrap();
    conformance::assert_reflection(app.addr, SERVED).await.unwrap();
    app.stop().await.unwrap();
}

/// Query is served by the replica while the primary is down: the pod stays
/// ready and `dependency:postgres-primary` reports the loss; the first
/// Append after the primary is back succeeds. Without the replica too, the
/// pod cannot answer.
#[tokio::test]
async fn readiness_stays_while_the_primary_is_down_and_queries_go_on() {
    let _t = mesh_testkit::init_telemetry();
    let private = PrivateInfra::new();
    private.start_pg().await.unwrap();
    let app = spawn_app(config(&private.infra).await).await;
    let mut c = client(&app).await;
    append(&mut c, event("alice", "login"), "k1").await.unwrap();
    let ch = mesh_testkit::channel(app.addr).await;
    wait_for_health(&ch, "dependency:postgres-replica", ServingStatus::Serving, Duration::from_secs(20))
        .await
        .unwrap();
    let alice = QueryRequest {
        filter: Some(EventFilter { actor_id: "alice".into(), ..Default::default() }),
        ..Default::default()
    };
    // The replica has the event before the primary goes.
    eventually(Duration::from_secs(20), "the replica has the event", || {
        let (mut c, q) = (c.clone(), alice.clone());
        async move { (c.query(q).await.ok()?.into_inner().events.len() == 1).then_some(()) }
    })
    .await;

    let took = conformance::assert_dependency_loss(
        &app,
        SERVED,
        "postgres-primary",
        WhileDown::StaysReady,
        Duration::from_secs(5),
        async {
            private.stop_pg_primary().await?;
            wait_for_health(
                &ch,
                "dependency:postgres-primary",
                ServingStatus::NotServing,
                Duration::from_secs(5),
            )
            .await?;
            let events = c.clone().query(alice.clone()).await?.into_inner().events;
            anyhow::ensure!(events.len() == 1, "query while the primary is down: {events:?}");
            Ok(())
        },
        private.start_pg(),
    )
    .await
    .unwrap();
    eprintln!("dependency:postgres-primary NOT_SERVING {took:?} after the primary stopped");
    // The restart closed the writer's idle connections: the first Append
    // after it must not fail on one of them.
    append(&mut c, event("alice", "logout"), "k2")
        .await
        .expect("the first append after the primary's restart");

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
        private.stop_pg_replica(),
        private.start_pg(),
    )
    .await
    .unwrap();
    app.stop().await.unwrap();
}

#[tokio::test]
async fn sigterm_drains_and_exits_zero() {
    let infra = Infra::shared();
    let db = mesh_testkit::TestDb::new(infra).await.unwrap();
    let env = infra.env(&db.schema, &mesh_testkit::redis_prefix());
    conformance::assert_binary_serves_and_drains(env!("CARGO_BIN_EXE_mesh-audit"), SERVED, env)
        .await
        .unwrap();
}

#[tokio::test]
async fn bad_configuration_exits_64() {
    conformance::assert_bad_configuration_exits_64(env!("CARGO_BIN_EXE_mesh-audit")).await.unwrap();
}

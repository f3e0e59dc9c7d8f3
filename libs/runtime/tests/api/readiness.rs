//! Readiness follows what the pod needs to answer; every dependency is
//! reported under `dependency:<name>` and in `mesh_dependency_up`.

use std::time::Duration;

use mesh_runtime::{Need, ServerConfig};
use mesh_testkit::{
    channel,
    conformance::{self, WhileDown},
    health_status, wait_for_health,
};
use tonic_health::pb::health_check_response::ServingStatus;

use crate::helpers::{ECHO, Switch, spawn_echo};

#[tokio::test]
async fn readiness_follows_a_required_dependency_and_liveness_none() {
    let dep = Switch::default(); // down from the start
    let app = spawn_echo(ServerConfig::for_tests(), vec![(dep.check("switch"), Need::Required)]).await;
    let ch = channel(app.addr).await;

    // Down from the start: never ready, but alive.
    wait_for_health(&ch, "dependency:switch", ServingStatus::NotServing, Duration::from_secs(2))
        .await
        .unwrap();
    assert_eq!(health_status(&ch, "readiness").await.unwrap(), ServingStatus::NotServing);
    assert_eq!(health_status(&ch, ECHO).await.unwrap(), ServingStatus::NotServing);
    assert_eq!(health_status(&ch, "liveness").await.unwrap(), ServingStatus::Serving);

    dep.set(true);
    let down = conformance::assert_dependency_loss(
        &app,
        &[ECHO],
        "switch",
        WhileDown::NotReady,
        Duration::from_secs(2),
        async {
            dep.set(false);
            Ok(())
        },
        async {
            dep.set(true);
            Ok(())
        },
    )
    .await
    .unwrap();
    assert!(down < Duration::from_secs(2));
    app.stop().await.unwrap();
}

#[tokio::test]
async fn readiness_ignores_a_reported_dependency_and_needs_one_of_a_group() {
    let (primary, replica, cache) = (Switch::up(), Switch::up(), Switch::up());
    let app = spawn_echo(
        ServerConfig::for_tests(),
        vec![
            (primary.check("primary"), Need::AnyOf("db")),
            (replica.check("replica"), Need::AnyOf("db")),
            (cache.check("cache"), Need::Reported),
        ],
    )
    .await;
    let ch = channel(app.addr).await;

    // A reported dependency down: reported, readiness stays.
    conformance::assert_dependency_loss(
        &app,
        &[ECHO],
        "cache",
        WhileDown::StaysReady,
        Duration::from_secs(2),
        async {
            cache.set(false);
            Ok(())
        },
        async {
            cache.set(true);
            Ok(())
        },
    )
    .await
    .unwrap();

    // One of the group down: the other serves, readiness stays.
    cache.set(false);
    conformance::assert_dependency_loss(
        &app,
        &[ECHO],
        "primary",
        WhileDown::StaysReady,
        Duration::from_secs(2),
        async {
            primary.set(false);
            Ok(())
        },
        async {
            primary.set(true);
            Ok(())
        },
    )
    .await
    .unwrap();

    // The whole group down: the pod cannot answer.
    primary.set(false);
    conformance::assert_dependency_loss(
        &app,
        &[ECHO],
        "replica",
        WhileDown::NotReady,
        Duration::from_secs(2),
        async {
            replica.set(false);
            Ok(())
        },
        async {
            replica.set(true);
            Ok(())
        },
    )
    .await
    .unwrap();
    assert_eq!(health_status(&ch, "dependency:primary").await.unwrap(), ServingStatus::NotServing);
    assert_eq!(health_status(&ch, "dependency:cache").await.unwrap(), ServingStatus::NotServing);
    app.stop().await.unwrap();
}

#[tokio::test]
async fn one_failed_check_is_tolerated_below_the_threshold() {
    let dep = Switch::up();
    let mut config = ServerConfig::for_tests();
    config.health_failure_threshold = 3;
    config.health_interval = Duration::from_millis(300);
    let app = spawn_echo(config, vec![(dep.check("switch"), Need::Required)]).await;
    let ch = channel(app.addr).await;
    wait_for_health(&ch, "readiness", ServingStatus::Serving, Duration::from_secs(2)).await.unwrap();

    // One failed round (shorter than the threshold) must not flip readiness.
    dep.set(false);
    tokio::time::sleep(Duration::from_millis(350)).await;
    dep.set(true);
    for _ in 0..10 {
        assert_eq!(health_status(&ch, "readiness").await.unwrap(), ServingStatus::Serving);
        assert_eq!(health_status(&ch, "dependency:switch").await.unwrap(), ServingStatus::Serving);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Three failed rounds do.
    dep.set(false);
    wait_for_health(&ch, "readiness", ServingStatus::NotServing, Duration::from_secs(3)).await.unwrap();
    assert_eq!(health_status(&ch, "dependency:switch").await.unwrap(), ServingStatus::NotServing);
    app.stop().await.unwrap();
}

#[tokio::test]
async fn a_remote_service_is_reported_by_its_own_readiness() {
    // The service called: ready while its switch is on.
    let remote_dep = Switch::up();
    let remote =
        spawn_echo(ServerConfig::for_tests(), vec![(remote_dep.check("switch"), Need::Required)]).await;
    let remote_ch = channel(remote.addr).await;
    let check = mesh_runtime::remote_check("echo", remote_ch);
    let app = spawn_echo(ServerConfig::for_tests(), vec![(check, Need::Reported)]).await;

    // Its readiness going NOT_SERVING is reported; this pod stays ready.
    conformance::assert_dependency_loss(
        &app,
        &[ECHO],
        "echo",
        WhileDown::StaysReady,
        Duration::from_secs(2),
        async {
            remote_dep.set(false);
            Ok(())
        },
        async {
            remote_dep.set(true);
            Ok(())
        },
    )
    .await
    .unwrap();
    // Gone altogether: reported the same.
    remote.stop().await.unwrap();
    let ch = channel(app.addr).await;
    wait_for_health(&ch, "dependency:echo", ServingStatus::NotServing, Duration::from_secs(5)).await.unwrap();
    assert_eq!(health_status(&ch, "readiness").await.unwrap(), ServingStatus::Serving);
    app.stop().await.unwrap();
}

use std::time::Duration;

use mesh_runtime::ServerConfig;
use mesh_testkit::{channel, conformance, health_status, wait_for_health};
use tonic_health::pb::health_check_response::ServingStatus;

use crate::helpers::{ECHO, Switch, spawn_echo};

#[tokio::test]
async fn readiness_needs_every_check_and_liveness_needs_none() {
    let dep = Switch::default(); // down from the start
    let app = spawn_echo(ServerConfig::for_tests(), vec![dep.check()]).await;
    let ch = channel(app.addr).await;

    // Down from the start: never ready, but alive.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(health_status(&ch, "readiness").await.unwrap(), ServingStatus::NotServing);
    assert_eq!(health_status(&ch, ECHO).await.unwrap(), ServingStatus::NotServing);
    assert_eq!(health_status(&ch, "liveness").await.unwrap(), ServingStatus::Serving);

    dep.set(true);
    let up = conformance::assert_readiness_follows(
        app.addr,
        &[ECHO],
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
    assert!(up < Duration::from_secs(2));
    app.stop().await.unwrap();
}

#[tokio::test]
async fn one_failed_check_is_tolerated_below_the_threshold() {
    let dep = Switch::up();
    let mut config = ServerConfig::for_tests();
    config.health_failure_threshold = 3;
    config.health_interval = Duration::from_millis(300);
    let app = spawn_echo(config, vec![dep.check()]).await;
    let ch = channel(app.addr).await;
    wait_for_health(&ch, "readiness", ServingStatus::Serving, Duration::from_secs(2)).await.unwrap();

    // One failed round (shorter than the threshold) must not flip readiness.
    dep.set(false);
    tokio::time::sleep(Duration::from_millis(350)).await;
    dep.set(true);
    for _ in 0..10 {
        assert_eq!(health_status(&ch, "readiness").await.unwrap(), ServingStatus::Serving);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Three failed rounds do.
    dep.set(false);
    wait_for_health(&ch, "readiness", ServingStatus::NotServing, Duration::from_secs(3)).await.unwrap();
    app.stop().await.unwrap();
}

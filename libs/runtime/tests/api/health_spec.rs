//! `grpc.health.v1` as the spec (grpc/grpc `doc/health-checking.md`) and
//! grpc_health_probe expect it, on a served echo server: Watch sends a
//! status once per change however many check rounds run, an unknown name is
//! SERVICE_UNKNOWN on an open stream, and open Watch streams end
//! (UNAVAILABLE) when the server stops instead of holding the grace period.

use std::time::{Duration, Instant};

use mesh_runtime::{Need, ServerConfig};
use mesh_testkit::{channel, wait_for_health};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

use crate::helpers::{ECHO, Switch, spawn_echo};

type Watch = tonic::Streaming<tonic_health::pb::HealthCheckResponse>;

async fn watch(ch: &tonic::transport::Channel, name: &str) -> Watch {
    HealthClient::new(ch.clone())
        .watch(HealthCheckRequest { service: name.into() })
        .await
        .unwrap()
        .into_inner()
}

/// Every message `w` sends within `window` (the stream must stay open).
async fn messages_within(w: &mut Watch, window: Duration) -> Vec<ServingStatus> {
    let deadline = tokio::time::Instant::now() + window;
    let mut got = Vec::new();
    loop {
        match tokio::time::timeout_at(deadline, w.message()).await {
            Err(_) => return got,
            Ok(Ok(Some(m))) => got.push(m.status()),
            Ok(other) => panic!("the stream ended: {other:?} after {got:?}"),
        }
    }
}

#[tokio::test]
async fn watch_sends_each_change_once_over_many_check_rounds() {
    let config = ServerConfig::for_tests();
    let rounds = config.health_interval * 5;
    let dep = Switch::up();
    let app = spawn_echo(config, vec![(dep.check("switch"), Need::Required)]).await;
    let ch = channel(app.addr).await;
    wait_for_health(&ch, "readiness", ServingStatus::Serving, Duration::from_secs(5)).await.unwrap();

    let mut names = Vec::new();
    for name in ["readiness", "liveness", "", ECHO, "dependency:switch"] {
        names.push((name, watch(&ch, name).await));
    }
    // The current status at once, then nothing over five check rounds.
    let got = futures::future::join_all(names.iter_mut().map(|(_, w)| messages_within(w, rounds))).await;
    for ((name, _), got) in names.iter().zip(got) {
        assert_eq!(got, [ServingStatus::Serving], "{name:?} over five rounds");
    }

    dep.set(false);
    let got = messages_within(&mut names[0].1, rounds).await;
    assert_eq!(got, [ServingStatus::NotServing], "readiness after the dependency went down");
    dep.set(true);
    let got = messages_within(&mut names[4].1, rounds).await;
    assert_eq!(
        got,
        [ServingStatus::NotServing, ServingStatus::Serving],
        "dependency:switch through one outage"
    );
    let got = messages_within(&mut names[1].1, Duration::ZERO).await;
    assert!(got.is_empty(), "liveness never changed, yet sent {got:?}");
    app.stop().await.unwrap();
}

#[tokio::test]
async fn watch_of_an_unknown_name_is_service_unknown_on_an_open_stream() {
    let config = ServerConfig::for_tests();
    let rounds = config.health_interval * 3;
    let app = spawn_echo(config, vec![]).await;
    let ch = channel(app.addr).await;
    let mut w = watch(&ch, "no.such.Service").await;
    let got = messages_within(&mut w, rounds).await;
    assert_eq!(got, [ServingStatus::ServiceUnknown]);
    app.stop().await.unwrap();
}

#[tokio::test]
async fn open_watch_streams_end_unavailable_and_do_not_hold_up_shutdown() {
    let mut config = ServerConfig::for_tests();
    config.drain_delay = Duration::from_millis(100);
    config.shutdown_grace = Duration::from_secs(30);
    let app = spawn_echo(config, vec![]).await;
    let ch = channel(app.addr).await;
    wait_for_health(&ch, "readiness", ServingStatus::Serving, Duration::from_secs(5)).await.unwrap();
    let mut ready = watch(&ch, "readiness").await;
    let mut unknown = watch(&ch, "no.such.Service").await;
    assert_eq!(ready.message().await.unwrap().unwrap().status(), ServingStatus::Serving);
    assert_eq!(unknown.message().await.unwrap().unwrap().status(), ServingStatus::ServiceUnknown);

    let started = Instant::now();
    app.stop().await.unwrap();
    let took = started.elapsed();
    assert!(took < Duration::from_secs(5), "shutdown took {took:?} with two Watch streams open");
    assert_eq!(ready.message().await.unwrap().unwrap().status(), ServingStatus::NotServing);
    for w in [&mut ready, &mut unknown] {
        let end = w.message().await.unwrap_err();
        assert_eq!(end.code(), tonic::Code::Unavailable, "{end:?}");
    }
}

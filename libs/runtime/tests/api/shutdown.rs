use std::time::{Duration, Instant};

use mesh_runtime::ServerConfig;
use mesh_testkit::{
    channel,
    echo::{EchoRequest, EchoServiceClient},
    health_status, wait_for_health,
};
use tonic_health::pb::health_check_response::ServingStatus;

use crate::helpers::spawn_echo;

#[tokio::test]
async fn drain_flips_readiness_first_and_finishes_in_flight_calls() {
    let mut config = ServerConfig::for_tests();
    config.drain_delay = Duration::from_millis(300);
    let mut app = spawn_echo(config, vec![]).await;
    let addr = app.addr;
    let ch = channel(addr).await;
    wait_for_health(&ch, "readiness", ServingStatus::Serving, Duration::from_secs(2)).await.unwrap();

    let mut client = EchoServiceClient::new(ch.clone());
    let in_flight = tokio::spawn(async move {
        client.echo(EchoRequest { payload: b"still here".to_vec(), delay_ms: 800 }).await
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let stop_started = Instant::now();
    app.begin_stop();

    // Within the drain delay the server still answers, NOT_SERVING.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(health_status(&ch, "readiness").await.unwrap(), ServingStatus::NotServing);
    assert_eq!(health_status(&ch, "liveness").await.unwrap(), ServingStatus::Serving);

    let reply = in_flight.await.unwrap().expect("the in-flight call completes");
    assert_eq!(reply.into_inner().payload, b"still here");
    app.join().await.unwrap();
    assert!(stop_started.elapsed() >= Duration::from_millis(600), "waited for the call");

    // Gone: new connections are refused.
    assert!(tokio::net::TcpStream::connect(addr).await.is_err(), "listener closed");
}

#[tokio::test]
async fn calls_longer_than_the_grace_period_are_cut_off() {
    let mut config = ServerConfig::for_tests();
    config.shutdown_grace = Duration::from_millis(300);
    let mut app = spawn_echo(config, vec![]).await;
    let addr = app.addr;
    let mut client = EchoServiceClient::new(channel(addr).await);
    let in_flight =
        tokio::spawn(async move { client.echo(EchoRequest { payload: vec![], delay_ms: 10_000 }).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = Instant::now();
    app.begin_stop();
    app.join().await.unwrap();
    let took = started.elapsed();
    assert!(took < Duration::from_secs(2), "shutdown took {took:?} with a 300 ms grace");
    assert!(in_flight.await.unwrap().is_err(), "the cut-off call fails");
    assert!(tokio::net::TcpStream::connect(addr).await.is_err(), "listener closed");
}

//! Admission control: calls past the in-flight limit are shed fast with
//! RetryInfo while health still answers; long requests are refused; a
//! connection past the limit is closed at once.

use std::time::{Duration, Instant};

use mesh_runtime::ServerConfig;
use mesh_testkit::{
    channel,
    echo::{EchoRequest, EchoServiceClient},
    eventually,
    grpc::metric_value,
    health_status, scrape_metrics,
};
use tokio::io::AsyncReadExt as _;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_types::StatusExt as _;

use crate::helpers::spawn_echo;

async fn metric(addr: std::net::SocketAddr, name: &str, labels: &[&str]) -> f64 {
    let text = scrape_metrics(addr).await.unwrap();
    metric_value(&text, name, labels).unwrap_or(0.0)
}

#[tokio::test]
async fn a_call_past_the_in_flight_limit_is_shed_fast_with_retry_info_and_health_still_answers() {
    let mut config = ServerConfig::for_tests();
    config.limits.max_in_flight = 2;
    config.limits.queue_wait = Duration::from_millis(50);
    let app = spawn_echo(config, vec![]).await;
    let ch = channel(app.addr).await;
    let slow: Vec<_> = (0..2)
        .map(|_| {
            let mut c = EchoServiceClient::new(ch.clone());
            tokio::spawn(
                async move { c.echo(EchoRequest { payload: b"slow".to_vec(), delay_ms: 1500 }).await },
            )
        })
        .collect();
    eventually(Duration::from_secs(5), "both slow calls in flight", || async {
        (metric(app.metrics_addr, "mesh_server_in_flight", &[]).await == 2.0).then_some(())
    })
    .await;

    let start = Instant::now();
    let shed = EchoServiceClient::new(ch.clone())
        .echo(EchoRequest { payload: b"third".to_vec(), delay_ms: 0 })
        .await
        .unwrap_err();
    let took = start.elapsed();
    assert_eq!(shed.code(), Code::ResourceExhausted, "{shed:?}");
    assert!(shed.message().contains("overloaded"), "{shed:?}");
    let retry = shed.get_details_retry_info().and_then(|r| r.retry_delay);
    assert_eq!(retry, Some(mesh_runtime::admission::SHED_RETRY_AFTER));
    assert!(took >= Duration::from_millis(50), "waited the queue wait first: {took:?}");
    assert!(took < Duration::from_millis(1000), "shed before a slot freed: {took:?}");
    // Health is never shed.
    assert_eq!(health_status(&ch, "readiness").await.unwrap(), ServingStatus::Serving);
    let shed_count = metric(app.metrics_addr, "mesh_server_shed_total", &["grpc_method=\"Echo\""]).await;
    assert_eq!(shed_count, 1.0);

    for s in slow {
        s.await.unwrap().expect("admitted calls complete");
    }
    EchoServiceClient::new(ch.clone())
        .echo(EchoRequest { payload: b"after".to_vec(), delay_ms: 0 })
        .await
        .expect("a slot is free again");
    assert_eq!(metric(app.metrics_addr, "mesh_server_in_flight", &[]).await, 0.0);
    app.stop().await.unwrap();
}

#[tokio::test]
async fn a_long_request_is_invalid_argument_and_a_connection_past_the_limit_is_closed() {
    let mut config = ServerConfig::for_tests();
    config.limits.max_message_bytes = 1024;
    config.limits.max_connections = 1;
    let app = spawn_echo(config, vec![]).await;
    let ch = channel(app.addr).await;
    let mut c = EchoServiceClient::new(ch.clone());
    let err = c.echo(EchoRequest { payload: vec![7; 2000], delay_ms: 0 }).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("longer than the limit of 1024 bytes"), "{err:?}");
    c.echo(EchoRequest { payload: vec![7; 500], delay_ms: 0 }).await.expect("a short one passes");

    // The one connection allowed is the channel's: another is closed at once.
    let mut second = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(Duration::from_secs(5), second.read(&mut buf)).await;
    assert!(matches!(read, Ok(Ok(0)) | Ok(Err(_))), "closed, not kept open: {read:?}");
    assert_eq!(metric(app.metrics_addr, "mesh_server_connections_refused_total", &[]).await, 1.0);
    assert_eq!(metric(app.metrics_addr, "mesh_server_connections", &[]).await, 1.0);
    app.stop().await.unwrap();
}

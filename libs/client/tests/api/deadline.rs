//! Deadlines across hops: the caller's budget shrinks on the way down, and a
//! spent budget stops the chain instead of calling.

use std::time::Duration;

use mesh_client::{ClientMetrics, StackConfig};
use mesh_testkit::{
    echo::{EchoRequest, EchoServiceClient},
    free_addr,
};
use tonic::Code;

use crate::helpers::{Hop, echo, echo_channel};

/// `(hop, budget in ms, request id)` from each line a hop added.
fn hops_seen(payload: &str) -> Vec<(String, f64, String)> {
    payload
        .lines()
        .filter_map(|l| {
            let mut it = l.split(' ');
            let name = it.next()?.to_owned();
            let budget = it.next()?.strip_prefix("budget_ms=")?.parse().ok()?;
            let rid = it.next()?.strip_prefix("request_id=")?.to_owned();
            Some((name, budget, rid))
        })
        .collect()
}

#[tokio::test]
async fn a_200ms_deadline_arrives_as_at_most_200ms_at_the_second_hop() {
    let _t = mesh_testkit::init_telemetry();
    let second = Hop::start("second", free_addr(), &[]).await;
    let first = Hop::start("first", free_addr(), &[("MESH_ECHO_NEXT_ADDR", second.addr.to_string())]).await;
    let client = EchoServiceClient::new(echo_channel(
        &[first.addr],
        StackConfig::default(),
        &ClientMetrics::default(),
    ));

    let mut req = tonic::Request::new(EchoRequest { payload: b"end".to_vec(), delay_ms: 0 });
    req.set_timeout(Duration::from_millis(200));
    let payload = echo(&client, req).await.unwrap();
    let seen = hops_seen(&payload);
    assert_eq!(seen.len(), 2, "{payload}");
    let ((h1, b1, r1), (h2, b2, r2)) = (&seen[0], &seen[1]);
    assert_eq!((h1.as_str(), h2.as_str()), ("first", "second"));
    assert!(*b1 > 0.0 && *b1 <= 200.0, "first hop got {b1} ms");
    // The second hop gets what was left, less the 5 ms margin.
    assert!(*b2 > 0.0 && *b2 <= b1 - 5.0, "second hop got {b2} ms after {b1} ms");
    assert_eq!(r1, r2, "one request id across hops");
    assert!(payload.ends_with("end"));

    // Without a deadline of its own, a call gets the default (10 s) and passes it on.
    let payload = echo(&client, EchoRequest::default()).await.unwrap();
    let seen = hops_seen(&payload);
    assert!(seen[0].1 <= 10_000.0 && seen[0].1 > 9_000.0, "{payload}");
    assert!(seen[1].1 < seen[0].1, "{payload}");
}

#[tokio::test]
async fn a_spent_budget_fails_fast_instead_of_calling_the_next_hop() {
    let _t = mesh_testkit::init_telemetry();
    let second = Hop::start("second", free_addr(), &[]).await;
    // The first hop keeps 800 ms for itself out of what it inherits.
    let first = Hop::start(
        "first",
        free_addr(),
        &[("MESH_ECHO_NEXT_ADDR", second.addr.to_string()), ("MESH_CLIENT_DEADLINE_MARGIN_MS", "800".into())],
    )
    .await;
    let client = EchoServiceClient::new(echo_channel(
        &[first.addr],
        StackConfig::default(),
        &ClientMetrics::default(),
    ));

    // 1 s, of which the first hop spends 300 ms: 700 ms left is less than its margin.
    let mut req = tonic::Request::new(EchoRequest { payload: vec![], delay_ms: 300 });
    req.set_timeout(Duration::from_secs(1));
    let start = std::time::Instant::now();
    let err = echo(&client, req).await.unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    assert!(err.message().contains("budget was spent"), "{err:?}");
    assert!(start.elapsed() < Duration::from_millis(900), "failed fast, not at the deadline");
    let echo_method = r#"grpc_method="Echo""#;
    assert_eq!(second.metric("grpc_server_started_total", &[echo_method]).await, 0.0, "never called");
    assert_eq!(first.metric("mesh_client_deadline_exhausted_total", &[echo_method]).await, 1.0);
    assert_eq!(
        first.metric("grpc_server_handled_total", &[echo_method, r#"grpc_code="DEADLINE_EXCEEDED""#]).await,
        1.0
    );
}

#[tokio::test]
async fn a_server_cut_at_the_callers_deadline_records_deadline_exceeded() {
    let _t = mesh_testkit::init_telemetry();
    let hop = Hop::start("slow", free_addr(), &[]).await;
    // A bare tonic client sends grpc-timeout and enforces it with a timer
    // that started before the request left, so either side may end the call
    // first: the server's timer, or the caller's reset arriving a little
    // before the deadline as the server counts it (within the server's slack).
    let mut client = EchoServiceClient::new(mesh_testkit::channel(hop.addr).await);
    let mut req = tonic::Request::new(EchoRequest { payload: vec![], delay_ms: 5_000 });
    req.set_timeout(Duration::from_millis(1_000));
    let start = std::time::Instant::now();
    let err = client.echo(req).await.unwrap_err();
    assert!(start.elapsed() < Duration::from_millis(3_000), "cut at the deadline: {err:?}");
    // The call ran out of time, it was not abandoned: DEADLINE_EXCEEDED in
    // the metrics, not CANCELLED.
    let echo_method = r#"grpc_method="Echo""#;
    let exceeded = [echo_method, r#"grpc_code="DEADLINE_EXCEEDED""#];
    let start = std::time::Instant::now();
    while hop.metric("grpc_server_handled_total", &exceeded).await < 1.0 {
        assert!(start.elapsed() < Duration::from_secs(5), "never recorded as DEADLINE_EXCEEDED");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        hop.metric("grpc_server_handled_total", &[echo_method, r#"grpc_code="CANCELLED""#]).await,
        0.0
    );
}

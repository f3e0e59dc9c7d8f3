//! Per-RPC metrics, request ids and server spans.

use std::time::Duration;

use mesh_runtime::{ServerConfig, telemetry};
use mesh_testkit::{
    channel,
    echo::{EchoRequest, EchoServiceClient},
    grpc::metric_value,
    otlp::OtlpReceiver,
    scrape_metrics,
};
use tonic::metadata::MetadataValue;

use crate::helpers::spawn_echo;

#[tokio::test]
async fn every_rpc_is_counted_by_method_and_code() {
    let app = spawn_echo(ServerConfig::for_tests(), vec![]).await;
    let ch = channel(app.addr).await;
    let mut client = EchoServiceClient::new(ch.clone());
    for _ in 0..3 {
        client.echo(EchoRequest { payload: b"x".to_vec(), delay_ms: 0 }).await.unwrap();
    }
    // A method the server does not have: UNIMPLEMENTED, labelled "unknown"
    // so callers cannot create label values at will.
    let mut raw = tonic::client::Grpc::new(ch.clone());
    raw.ready().await.unwrap();
    let status = raw
        .unary::<EchoRequest, EchoRequest, _>(
            tonic::Request::new(EchoRequest::default()),
            "/mesh.testkit.echo.v1.EchoService/NoSuchMethod".parse().unwrap(),
            tonic_prost::ProstCodec::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unimplemented);

    let text = scrape_metrics(app.metrics_addr).await.unwrap();
    let ok =
        metric_value(&text, "grpc_server_handled_total", &[r#"grpc_method="Echo""#, r#"grpc_code="OK""#]);
    assert_eq!(ok, Some(3.0), "{text}");
    let unknown = metric_value(
        &text,
        "grpc_server_handled_total",
        &[r#"grpc_method="unknown""#, r#"grpc_code="UNIMPLEMENTED""#],
    );
    assert_eq!(unknown, Some(1.0), "{text}");
    assert!(!text.contains("NoSuchMethod"));
    let count = metric_value(&text, "grpc_server_handling_seconds_count", &[r#"grpc_method="Echo""#]);
    assert_eq!(count, Some(3.0));
    assert_eq!(metric_value(&text, "mesh_ready", &[]), Some(1.0));
    app.stop().await.unwrap();
}

#[tokio::test]
async fn request_ids_are_kept_or_minted_and_returned() {
    let app = spawn_echo(ServerConfig::for_tests(), vec![]).await;
    let mut client = EchoServiceClient::new(channel(app.addr).await);

    let mut req = tonic::Request::new(EchoRequest::default());
    req.metadata_mut().insert("x-request-id", MetadataValue::from_static("req-123"));
    let resp = client.echo(req).await.unwrap();
    assert_eq!(resp.metadata().get("x-request-id").unwrap(), "req-123");

    let resp = client.echo(EchoRequest::default()).await.unwrap();
    let minted = resp.metadata().get("x-request-id").unwrap().to_str().unwrap().to_owned();
    assert_eq!(minted.len(), 36, "a uuid: {minted}");

    // Oversized or non-printable ids are replaced, not propagated.
    let mut req = tonic::Request::new(EchoRequest::default());
    req.metadata_mut().insert("x-request-id", "x".repeat(500).parse().unwrap());
    let resp = client.echo(req).await.unwrap();
    assert_eq!(resp.metadata().get("x-request-id").unwrap().len(), 36);
    app.stop().await.unwrap();
}

#[tokio::test]
async fn server_spans_continue_the_callers_trace() {
    let receiver = OtlpReceiver::start().await;
    let telemetry = telemetry::init_for_tests("mesh-echo-test", Some(receiver.endpoint()));
    let app = spawn_echo(ServerConfig::for_tests(), vec![]).await;
    let mut client = EchoServiceClient::new(channel(app.addr).await);

    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let parent = "00f067aa0ba902b7";
    let mut req = tonic::Request::new(EchoRequest::default());
    req.metadata_mut().insert("traceparent", format!("00-{trace_id}-{parent}-01").parse().unwrap());
    req.metadata_mut().insert("x-request-id", MetadataValue::from_static("trace-req-1"));
    client.echo(req).await.unwrap();
    telemetry.flush().await;

    let spans =
        receiver.wait_for(Duration::from_secs(10), |s| s.iter().any(|s| s.trace_id == trace_id)).await;
    let span = spans
        .iter()
        .find(|s| s.trace_id == trace_id)
        .unwrap_or_else(|| panic!("no span in the caller's trace: {spans:#?}"));
    assert_eq!(span.parent_span_id, parent);
    assert_eq!(span.kind, 2, "server span");
    assert_eq!(span.name, "mesh.testkit.echo.v1.EchoService/Echo");
    assert_eq!(span.service, "mesh-echo-test");
    assert_eq!(span.attr("rpc.system"), Some("grpc"));
    assert_eq!(span.attr("rpc.service"), Some("mesh.testkit.echo.v1.EchoService"));
    assert_eq!(span.attr("rpc.method"), Some("Echo"));
    assert_eq!(span.attr("rpc.grpc.status_code"), Some("0"));
    assert_eq!(span.attr("request_id"), Some("trace-req-1"));
    app.stop().await.unwrap();
    telemetry.shutdown().await;
}

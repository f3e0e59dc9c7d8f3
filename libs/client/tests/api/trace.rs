//! One call across two services and Redis is one trace: every hop exports
//! its spans (as separate processes) and they form a tree.

use std::time::Duration;

use mesh_client::{ClientMetrics, StackConfig};
use mesh_runtime::telemetry;
use mesh_testkit::{
    Infra,
    echo::{EchoRequest, EchoServiceClient},
    free_addr,
    otlp::{OtlpReceiver, Span},
    redis_prefix,
};
use tracing::Instrument;

use crate::helpers::{Hop, echo, echo_channel};

fn one<'a>(spans: &'a [Span], what: &str, f: impl Fn(&Span) -> bool) -> &'a Span {
    let found: Vec<&Span> = spans.iter().filter(|s| f(s)).collect();
    assert_eq!(found.len(), 1, "{what}: {found:#?}\nall spans: {spans:#?}");
    found[0]
}

fn assert_rpc(span: &Span) {
    assert_eq!(span.name, "mesh.testkit.echo.v1.EchoService/Echo");
    assert_eq!(span.attr("rpc.system"), Some("grpc"));
    assert_eq!(span.attr("rpc.service"), Some("mesh.testkit.echo.v1.EchoService"));
    assert_eq!(span.attr("rpc.method"), Some("Echo"));
    assert_eq!(span.attr("rpc.grpc.status_code"), Some("0"));
}

#[tokio::test]
async fn one_call_across_two_services_and_redis_is_one_trace_tree() {
    let receiver = OtlpReceiver::start().await;
    let telemetry = telemetry::init_for_tests("mesh-client-test", Some(receiver.endpoint()));
    let otel = |name: &str| {
        vec![
            ("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint()),
            ("OTEL_SERVICE_NAME", name.to_owned()),
            ("OTEL_BSP_SCHEDULE_DELAY", "100".to_owned()),
        ]
    };
    let infra = Infra::shared();
    let mut env_b = otel("hop-b");
    env_b.push(("MESH_REDIS_URLS", infra.redis_urls().join(",")));
    env_b.push(("MESH_REDIS_KEY_PREFIX", redis_prefix()));
    let mut hop_b = Hop::start("b", free_addr(), &env_b).await;
    let mut env_a = otel("hop-a");
    // By name: hop-a resolves it (and records the address it resolved to).
    env_a.push(("MESH_ECHO_NEXT_ADDR", format!("localhost:{}", hop_b.addr.port())));
    let mut hop_a = Hop::start("a", free_addr(), &env_a).await;

    let client = EchoServiceClient::new(echo_channel(
        &[hop_a.addr],
        StackConfig::default(),
        &ClientMetrics::default(),
    ));
    let root = tracing::info_span!("checkout");
    let payload =
        echo(&client, EchoRequest { payload: b"x".to_vec(), delay_ms: 0 }).instrument(root).await.unwrap();
    let request_id = payload.lines().next().and_then(|l| l.split("request_id=").nth(1)).unwrap().to_owned();

    // Draining flushes each hop's spans; then ours.
    hop_a.stop().await;
    hop_b.stop().await;
    telemetry.flush().await;
    let spans = receiver
        .wait_for(Duration::from_secs(15), |s| {
            s.iter().any(|s| s.service == "hop-b" && s.attr("db.system.name") == Some("redis"))
                && s.iter().filter(|s| s.kind == 3).count() >= 2
                && s.iter().filter(|s| s.kind == 2 && s.name.ends_with("/Echo")).count() >= 2
        })
        .await;

    let root = one(&spans, "the test's root span", |s| s.name == "checkout");
    let trace: Vec<Span> = spans.iter().filter(|s| s.trace_id == root.trace_id).cloned().collect();
    let is_echo = |s: &Span| s.name.ends_with("/Echo");
    let client_test = one(&trace, "test client span", |s| s.service == "mesh-client-test" && s.kind == 3);
    let server_a = one(&trace, "hop-a server span", |s| s.service == "hop-a" && s.kind == 2 && is_echo(s));
    let client_a = one(&trace, "hop-a client span", |s| s.service == "hop-a" && s.kind == 3);
    let server_b = one(&trace, "hop-b server span", |s| s.service == "hop-b" && s.kind == 2 && is_echo(s));
    let redis =
        one(&trace, "hop-b redis span", |s| s.service == "hop-b" && s.attr("db.system.name").is_some());

    // The tree: root → client → server(a) → client(a) → server(b) → redis.
    assert_eq!(client_test.parent_span_id, root.span_id);
    assert_eq!(server_a.parent_span_id, client_test.span_id);
    assert_eq!(client_a.parent_span_id, server_a.span_id);
    assert_eq!(server_b.parent_span_id, client_a.span_id);
    assert_eq!(redis.parent_span_id, server_b.span_id);

    for s in [client_test, server_a, client_a, server_b] {
        assert_rpc(s);
        assert_eq!(s.attr("request_id"), Some(request_id.as_str()), "{s:#?}");
    }
    for (client, server) in [(client_test, &hop_a), (client_a, &hop_b)] {
        assert_eq!(
            client.int_attr("server.port"),
            Some(i64::from(server.addr.port())),
            "an int, as the conventions say"
        );
    }
    assert_eq!(client_test.attr("server.address"), Some("127.0.0.1"));
    assert_eq!(client_test.attr("network.peer.address"), None, "same as server.address");
    assert_eq!(client_a.attr("server.address"), Some("localhost"));
    assert_eq!(client_a.attr("network.peer.address"), Some("127.0.0.1"));
    assert_eq!(redis.kind, 3);
    assert_eq!(redis.attr("db.system.name"), Some("redis"));
    assert_eq!(redis.attr("db.operation.name"), Some("INCR"));
    telemetry.shutdown().await;
}

#[tokio::test]
async fn a_breaker_opening_is_an_event_of_the_call_that_opened_it() {
    let receiver = OtlpReceiver::start().await;
    let telemetry = telemetry::init_for_tests("mesh-client-test", Some(receiver.endpoint()));
    let config = StackConfig {
        retry: mesh_tower::RetryConfig { max_attempts: 1, ..Default::default() },
        breaker: mesh_tower::BreakerConfig {
            consecutive_failures: 2,
            success_rate: 0.0,
            ..Default::default()
        },
        ..StackConfig::default()
    };
    // Nothing listens there: connections are refused.
    let client = EchoServiceClient::new(echo_channel(&[free_addr()], config, &ClientMetrics::default()));
    for _ in 0..3 {
        let err = echo(&client, EchoRequest::default()).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unavailable);
    }
    telemetry.flush().await;
    let opened = |s: &Span| s.kind == 3 && s.events.iter().any(|e| e == "circuit breaker opened");
    let spans = receiver.wait_for(Duration::from_secs(10), |spans| spans.iter().any(opened)).await;
    let span = one(&spans, "the client span of the second call", opened);
    assert_eq!(span.attr("rpc.grpc.status_code"), Some("14"));
    telemetry.shutdown().await;
}

//! Every instance down: breakers open, calls fail fast without touching the
//! network, and the breakers close once the instances are back.

use std::{
    io::ErrorKind,
    time::{Duration, Instant},
};

use mesh_client::StackConfig;
use mesh_testkit::{
    echo::{EchoRequest, EchoServiceClient},
    free_addr,
};
use mesh_tower::{BreakerConfig, BreakerState, DeadlineConfig};
use tonic::Code;

use crate::helpers::{Hop, echo, echo_channel, registered_metrics, sample};

#[tokio::test]
async fn with_every_instance_down_calls_fail_fast_and_recover_when_they_return() {
    let _t = mesh_testkit::init_telemetry();
    let mut hops = vec![Hop::start("a", free_addr(), &[]).await, Hop::start("b", free_addr(), &[]).await];
    let deadline = Duration::from_secs(2);
    let config = StackConfig {
        deadline: DeadlineConfig { default_timeout: Some(deadline), ..DeadlineConfig::default() },
        breaker: BreakerConfig {
            consecutive_failures: 2,
            success_rate: 0.0,
            // Open for 2.4–3.6 s: the fail-fast checks below fit well within it.
            open_base: Duration::from_secs(3),
            open_max: Duration::from_secs(3),
            ..BreakerConfig::default()
        },
        ..StackConfig::default()
    };
    let (registry, metrics) = registered_metrics();
    let channel = echo_channel(&[hops[0].addr, hops[1].addr], config, &metrics);
    let client = EchoServiceClient::new(channel.clone());
    echo(&client, EchoRequest::default()).await.unwrap();

    for h in &mut hops {
        h.kill().await;
    }
    // Refused connections count against each endpoint until both breakers open.
    let mut open = false;
    for _ in 0..20 {
        let err = echo(&client, EchoRequest::default()).await.unwrap_err();
        assert_eq!(err.code(), Code::Unavailable, "{err:?}");
        if err.message() == "echo: circuit breaker open on all 2 endpoints, not calling" {
            open = true;
            break;
        }
    }
    assert!(open, "the breakers never opened: {:?}", channel.endpoints());

    // While open: an answer at once, and not even a connection attempt
    // (listeners on the instances' ports see nobody).
    let listeners: Vec<_> = hops
        .iter()
        .map(|h| {
            let l = std::net::TcpListener::bind(h.addr).unwrap();
            l.set_nonblocking(true).unwrap();
            l
        })
        .collect();
    for _ in 0..10 {
        let start = Instant::now();
        let err = echo(&client, EchoRequest::default()).await.unwrap_err();
        let took = start.elapsed();
        assert_eq!(err.code(), Code::Unavailable);
        assert!(err.message().contains("circuit breaker open"), "{err:?}");
        assert!(took < deadline / 10, "failing fast took {took:?}");
    }
    for l in &listeners {
        assert_eq!(
            l.accept().map(|_| ()).unwrap_err().kind(),
            ErrorKind::WouldBlock,
            "a connection was attempted"
        );
    }
    drop(listeners);
    assert!(sample(&registry, "mesh_client_circuit_rejected_total", &[r#"upstream="echo""#]) >= 10.0);

    // Back: after the open time a probe goes through and closes each breaker.
    for h in &mut hops {
        h.restart().await;
    }
    let start = Instant::now();
    let mut served = 0;
    while channel.endpoints().iter().any(|e| e.state != BreakerState::Closed) {
        assert!(start.elapsed() < Duration::from_secs(20), "still not closed: {:?}", channel.endpoints());
        if echo(&client, EchoRequest::default()).await.is_ok() {
            served += 1;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(served > 0);
    for _ in 0..20 {
        echo(&client, EchoRequest::default()).await.unwrap();
    }
    for h in &hops {
        let ep = format!(r#"endpoint="{}""#, h.addr);
        assert_eq!(sample(&registry, "mesh_client_circuit_state", &[&ep]), 0.0);
        for state in ["open", "half_open", "closed"] {
            let s = format!(r#"state="{state}""#);
            assert!(
                sample(&registry, "mesh_client_circuit_transitions_total", &[&ep, &s]) >= 1.0,
                "{ep} {state}"
            );
        }
    }
}

/// An Echo request the first hop refuses as `metadata` asks (see the example's docs).
fn refused(metadata: &[(&'static str, &str)]) -> tonic::Request<EchoRequest> {
    let mut req = tonic::Request::new(EchoRequest::default());
    for (k, v) in metadata {
        req.metadata_mut().insert(*k, v.parse().unwrap());
    }
    req
}

#[tokio::test]
async fn refusals_and_short_deadlines_never_open_the_breaker_of_a_healthy_instance() {
    let _t = mesh_testkit::init_telemetry();
    let hop = Hop::start("a", free_addr(), &[]).await;
    let config = StackConfig {
        breaker: BreakerConfig { consecutive_failures: 2, success_rate: 0.0, ..BreakerConfig::default() },
        ..StackConfig::default()
    };
    let (_registry, metrics) = registered_metrics();
    let channel = echo_channel(&[hop.addr], config, &metrics);
    let client = EchoServiceClient::new(channel.clone());
    let closed = || channel.endpoints().iter().all(|e| e.state == BreakerState::Closed);

    // Throttled users, bad input, missing things, no session, version conflicts:
    // the endpoint answered, so it works.
    for code in [Code::ResourceExhausted, Code::InvalidArgument, Code::NotFound, Code::Unauthenticated] {
        for _ in 0..5 {
            let err =
                echo(&client, refused(&[("x-echo-code", &(code as i32).to_string())])).await.unwrap_err();
            assert_eq!(err.code(), code, "{err:?}");
        }
    }
    for code in [Code::PermissionDenied, Code::Aborted, Code::FailedPrecondition] {
        let err = echo(&client, refused(&[("x-echo-code", &(code as i32).to_string())])).await.unwrap_err();
        assert_eq!(err.code(), code, "{err:?}");
    }
    assert!(closed(), "a refusal opened the breaker: {:?}", channel.endpoints());
    // A caller that leaves itself 40 ms for a 300 ms call: its own deadline.
    for _ in 0..4 {
        let mut req = tonic::Request::new(EchoRequest { payload: vec![], delay_ms: 300 });
        req.set_timeout(Duration::from_millis(40));
        assert_eq!(echo(&client, req).await.unwrap_err().code(), Code::DeadlineExceeded);
    }
    assert!(closed(), "the caller's short deadline opened the breaker: {:?}", channel.endpoints());
    echo(&client, EchoRequest::default()).await.expect("the healthy instance serves everyone");

    // What does say the endpoint is unhealthy still opens it.
    let mut open = false;
    for _ in 0..4 {
        let err = echo(&client, refused(&[("x-echo-code", "14")])).await.unwrap_err();
        assert_eq!(err.code(), Code::Unavailable);
        open |= err.message().contains("circuit breaker open");
    }
    assert!(open && !closed(), "UNAVAILABLE never opened the breaker: {:?}", channel.endpoints());
}

#[tokio::test]
async fn retries_wait_as_long_as_the_server_pushes_back_and_not_at_all_when_it_says_no() {
    let _t = mesh_testkit::init_telemetry();
    let hop = Hop::start("a", free_addr(), &[]).await;
    let config = StackConfig {
        // The breaker stays out of this: UNAVAILABLE is answered on purpose.
        breaker: BreakerConfig { consecutive_failures: 1000, success_rate: 0.0, ..BreakerConfig::default() },
        ..StackConfig::default()
    };
    let (registry, metrics) = registered_metrics();
    let client = EchoServiceClient::new(echo_channel(&[hop.addr], config, &metrics));
    let retries = || sample(&registry, "mesh_client_retries_total", &[r#"grpc_method="Echo""#]);
    // Three attempts, each told to wait before the next.
    let timed = |metadata: &'static [(&'static str, &'static str)]| {
        let client = client.clone();
        async move {
            let start = Instant::now();
            let err = echo(&client, refused(metadata)).await.unwrap_err();
            assert_eq!(err.code(), Code::Unavailable, "{err:?}");
            start.elapsed()
        }
    };

    // grpc-retry-pushback-ms: exactly that long (the backoff alone is 25–65 ms for two).
    let took = timed(&[("x-echo-code", "14"), ("x-echo-pushback", "300")]).await;
    assert!(took >= Duration::from_millis(600) && took < Duration::from_secs(2), "{took:?}");
    assert_eq!(retries(), 2.0);
    // google.rpc.RetryInfo: at least that long.
    let took = timed(&[("x-echo-code", "14"), ("x-echo-retry-delay-ms", "250")]).await;
    assert!(took >= Duration::from_millis(500) && took < Duration::from_secs(2), "{took:?}");
    assert_eq!(retries(), 4.0);
    // Negative or malformed pushback: do not retry (gRPC A6); longer than
    // the client's longest backoff: the caller gets the answer at once.
    for pushback in ["-1", "soon", "60000"] {
        let metadata: &'static [(&'static str, &'static str)] = match pushback {
            "-1" => &[("x-echo-code", "14"), ("x-echo-pushback", "-1")],
            "soon" => &[("x-echo-code", "14"), ("x-echo-pushback", "soon")],
            _ => &[("x-echo-code", "14"), ("x-echo-pushback", "60000")],
        };
        let took = timed(metadata).await;
        assert!(took < Duration::from_millis(500), "{pushback}: {took:?}");
        assert_eq!(retries(), 4.0, "{pushback}: retried");
    }
    // Without pushback, the client's own backoff: two retries, well under 600 ms.
    let took = timed(&[("x-echo-code", "14")]).await;
    assert!(took < Duration::from_millis(500), "{took:?}");
    assert_eq!(retries(), 6.0);
}

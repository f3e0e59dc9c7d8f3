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

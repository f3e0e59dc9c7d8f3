//! An instance killed behind the balancer: it is ejected, the others serve.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use mesh_client::StackConfig;
use mesh_testkit::{
    echo::{EchoRequest, EchoServiceClient},
    free_addr,
};
use mesh_tower::{BreakerConfig, BreakerState};

use crate::helpers::{Hop, echo, echo_channel, registered_metrics, sample};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_killed_behind_the_balancer_is_ejected_and_calls_keep_succeeding() {
    let _t = mesh_testkit::init_telemetry();
    let mut hops = Vec::new();
    for i in 0..3 {
        hops.push(Hop::start(&format!("echo-{i}"), free_addr(), &[]).await);
    }
    let config = StackConfig {
        breaker: BreakerConfig {
            consecutive_failures: 3,
            success_rate: 0.0,
            // Long enough to stay open for the rest of the test.
            open_base: Duration::from_secs(60),
            open_max: Duration::from_secs(60),
            ..BreakerConfig::default()
        },
        ..StackConfig::default()
    };
    let (registry, metrics) = registered_metrics();
    let addrs: Vec<_> = hops.iter().map(|h| h.addr).collect();
    let channel = echo_channel(&addrs, config, &metrics);
    let client = EchoServiceClient::new(channel.clone());

    // Every instance takes a share.
    for _ in 0..60 {
        echo(&client, EchoRequest::default()).await.unwrap();
    }
    for h in &hops {
        assert!(h.served().await > 0.0, "{} served nothing", h.addr);
    }

    // Four callers call back to back while one instance is SIGKILLed.
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicUsize::new(0));
    let failures = Arc::new(Mutex::new(Vec::new()));
    let callers: Vec<_> = (0..4)
        .map(|_| {
            let (client, stop, done, failures) =
                (client.clone(), stop.clone(), done.clone(), failures.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    match echo(&client, EchoRequest { payload: b"x".to_vec(), delay_ms: 1 }).await {
                        Ok(_) => done.fetch_add(1, Ordering::Relaxed),
                        Err(s) => {
                            failures.lock().unwrap().push(s);
                            0
                        }
                    };
                }
            })
        })
        .collect();
    let wait_for = |n: usize| {
        let done = done.clone();
        async move {
            let start = Instant::now();
            while done.load(Ordering::Relaxed) < n {
                assert!(start.elapsed() < Duration::from_secs(30), "calls stalled");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    };
    wait_for(100).await;
    let before = [hops[0].served().await, hops[2].served().await];
    hops[1].kill().await;
    let at_kill = done.load(Ordering::Relaxed);
    wait_for(at_kill + 400).await;
    stop.store(true, Ordering::Relaxed);
    for c in callers {
        c.await.unwrap();
    }

    let failures = std::mem::take(&mut *failures.lock().unwrap());
    assert!(failures.is_empty(), "{} calls failed, first: {:?}", failures.len(), failures.first());
    let states: Vec<_> = channel.endpoints().into_iter().map(|e| (e.addr.addr, e.state)).collect();
    for (addr, state) in &states {
        let want = if *addr == hops[1].addr { BreakerState::Open } else { BreakerState::Closed };
        assert_eq!(*state, want, "{addr}: {states:?}");
    }
    assert!(hops[0].served().await > before[0] && hops[2].served().await > before[1], "the others took over");
    let killed = format!(r#"endpoint="{}""#, hops[1].addr);
    assert_eq!(sample(&registry, "mesh_client_circuit_state", &[&killed]), 2.0);
    assert_eq!(
        sample(&registry, "mesh_client_circuit_transitions_total", &[&killed, r#"state="open""#]),
        1.0
    );
    // The calls cut by the kill were repeated elsewhere.
    assert!(sample(&registry, "mesh_client_retries_total", &[r#"grpc_method="Echo""#]) >= 1.0);
}

//! Redis trouble never hangs a caller: a master dies mid-test, answers keep
//! coming within the deadline under each domain's failure mode, and once the
//! cluster has failed over, Redis decides again.

use std::time::{Duration, Instant};

use mesh_proto::ratelimit::rate_limit_service_client::RateLimitServiceClient;
use mesh_ratelimit::Config;
use mesh_testkit::PrivateInfra;
use tonic::transport::Channel;

use crate::helpers::{RulesFile, client, config_with, hit, metric, spawn_app};

const RULES: &str = r#"
domain: open
failure_mode: fail_open
descriptors:
  - key: user
    rate_limit: { unit: hour, requests_per_unit: 1000 }
---
domain: closed
failure_mode: fail_closed
descriptors:
  - key: user
    rate_limit: { unit: hour, requests_per_unit: 1000 }
"#;

/// Far above the 100 ms Redis deadline: a call slower than this hung.
const NEVER_SLOWER: Duration = Duration::from_secs(2);

/// One hit per user in both domains; returns what decided each.
async fn round(c: &mut RateLimitServiceClient<Channel>, users: &[String]) -> Vec<String> {
    let mut seen = Vec::new();
    for u in users {
        for domain in ["open", "closed"] {
            let start = Instant::now();
            let a = hit(c, domain, &[("user", u)]).await;
            let took = start.elapsed();
            assert!(took < NEVER_SLOWER, "{domain}/{u} took {took:?}");
            if a.decided_by == "fail-closed" {
                assert!(!a.ok(), "fail_closed refuses");
            }
            if a.decided_by == "fail-open" {
                assert!(a.ok(), "fail_open allows within the local limits");
            }
            seen.push(a.decided_by);
        }
    }
    seen
}

#[tokio::test]
async fn a_dead_master_falls_back_within_the_deadline_then_redis_decides_again() {
    let _t = mesh_testkit::init_telemetry();
    let private = PrivateInfra::new();
    private.start_redis().await.unwrap();
    let rules = RulesFile::new(RULES);
    let mut config: Config = config_with(&private.infra, &rules);
    config.engine.redis_timeout = Duration::from_millis(100);
    config.engine.breaker_min_requests = 5;
    config.engine.breaker_window = Duration::from_secs(1);
    config.engine.breaker_open = Duration::from_millis(200);
    let app = spawn_app(config).await;
    let mut c = client(&app).await;
    // Enough users that some live on every master.
    let users: Vec<String> = (0..24).map(|i| format!("u{i}")).collect();
    let seen = round(&mut c, &users).await;
    assert!(seen.iter().all(|d| d == "redis"), "{seen:?}");

    let masters = private.redis_masters().await.unwrap();
    private.kill_redis_node(masters[0]).unwrap();

    // While the cluster notices (cluster-node-timeout 2 s) and promotes a
    // replica, every answer still comes, from the failure modes.
    let (mut open, mut closed) = (false, false);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !(open && closed) {
        assert!(Instant::now() < deadline, "the failure modes never decided");
        let seen = round(&mut c, &users).await;
        open |= seen.iter().any(|d| d == "fail-open");
        closed |= seen.iter().any(|d| d == "fail-closed");
    }

    // After the failover, Redis decides every call again.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let seen = round(&mut c, &users).await;
        if seen.iter().all(|d| d == "redis") {
            break;
        }
        assert!(Instant::now() < deadline, "redis never decided again: {seen:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(metric(&app, "mesh_ratelimit_fallback_decisions_total", &["mode=\"fail_open\""]).await >= 1.0);
    assert!(metric(&app, "mesh_ratelimit_fallback_decisions_total", &["mode=\"fail_closed\""]).await >= 1.0);
    assert!(metric(&app, "mesh_ratelimit_redis_breaker_transitions_total", &["state=\"open\""]).await >= 1.0);
    app.stop().await.unwrap();
}

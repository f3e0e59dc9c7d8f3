//! Every decision path answers the same: Redis, the over-limit cache, the
//! fail-open fallback and fail-closed report each descriptor's code, limit,
//! remaining and reset by the same rules (Envoy RLS semantics).

use std::time::Duration;

use mesh_proto::ratelimit::{
    Code, Descriptor, DescriptorStatus, rate_limit_service_client::RateLimitServiceClient,
};
use mesh_ratelimit::Config;
use mesh_testkit::Infra;

use crate::helpers::{Answer, RulesFile, check, client, config_with, desc, spawn_app};

const RULES: &str = r#"
domain: paths
failure_mode: fail_open
descriptors:
  - key: tenant
    rate_limit: { unit: hour, requests_per_unit: 100, name: broad }
    descriptors:
      - key: user
        rate_limit: { unit: hour, requests_per_unit: 2, name: granular }
---
domain: paths_closed
failure_mode: fail_closed
descriptors:
  - key: tenant
    rate_limit: { unit: hour, requests_per_unit: 100, name: broad }
    descriptors:
      - key: user
        rate_limit: { unit: hour, requests_per_unit: 2, name: granular }
"#;

/// A broad 100/h descriptor and a granular 2/h one.
fn call() -> Vec<Descriptor> {
    vec![desc(&[("tenant", "t")], None), desc(&[("tenant", "t"), ("user", "u")], None)]
}

fn ms(d: Option<prost_types::Duration>) -> Option<i64> {
    d.map(|d| d.seconds * 1000 + i64::from(d.nanos) / 1_000_000)
}

/// The same status, durations within `slack` (the runs are moments apart).
fn assert_same(a: &DescriptorStatus, b: &DescriptorStatus, what: &str) {
    let slack = 2_000;
    assert_eq!(a.code, b.code, "{what}: code");
    assert_eq!(a.current_limit, b.current_limit, "{what}: current_limit");
    assert_eq!(a.limit_remaining, b.limit_remaining, "{what}: limit_remaining");
    for (x, y, field) in [
        (ms(a.duration_until_reset), ms(b.duration_until_reset), "duration_until_reset"),
        (ms(a.retry_after), ms(b.retry_after), "retry_after"),
    ] {
        match (x, y) {
            (Some(x), Some(y)) => assert!((x - y).abs() <= slack, "{what}: {field} {x} vs {y}"),
            (x, y) => assert_eq!(x.is_some(), y.is_some(), "{what}: {field} {x:?} vs {y:?}"),
        }
    }
}

async fn six(c: &mut RateLimitServiceClient<tonic::transport::Channel>, domain: &str) -> Vec<Answer> {
    let mut out = Vec::new();
    for _ in 0..6 {
        out.push(check(c, domain, call()).await);
    }
    out
}

/// A port nothing listens on.
fn closed_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

#[tokio::test]
async fn every_decision_path_answers_the_same() {
    let _t = mesh_testkit::init_telemetry();
    let rules = RulesFile::new(RULES);

    // Redis decides calls 1-3, the over-limit cache 4-6.
    let app = spawn_app(config_with(Infra::shared(), &rules)).await;
    let mut c = client(&app).await;
    let redis = six(&mut c, "paths").await;
    let by: Vec<&str> = redis.iter().map(|a| a.decided_by.as_str()).collect();
    assert_eq!(by, ["redis", "redis", "redis", "local-cache", "local-cache", "local-cache"]);
    for (n, a) in redis.iter().enumerate() {
        let (broad, granular) = (&a.resp.statuses[0], &a.resp.statuses[1]);
        assert_eq!(a.ok(), n < 2, "call {}", n + 1);
        assert_eq!(broad.code(), Code::Ok, "call {}", n + 1);
        assert_eq!(broad.limit_remaining, 99 - n.min(1) as u32, "call {}: the broad limit", n + 1);
        assert_eq!(granular.code(), if n < 2 { Code::Ok } else { Code::OverLimit });
        assert_eq!(granular.limit_remaining, 1 - n.min(1) as u32);
        for s in [broad, granular] {
            assert!(s.current_limit.is_some() && s.duration_until_reset.is_some(), "call {}: {s:?}", n + 1);
        }
        assert!(ms(granular.retry_after).is_some() == (n >= 2));
        if n >= 3 {
            for i in 0..2 {
                assert_same(
                    &a.resp.statuses[i],
                    &redis[2].resp.statuses[i],
                    &format!("cache call {} [{i}]", n + 1),
                );
            }
        }
    }
    app.stop().await.unwrap();

    // Redis unreachable: the fail-open fallback answers the same sequence the same way.
    let mut config: Config = config_with(Infra::shared(), &rules);
    config.redis = Infra { redis_ports: vec![closed_port()], ..Infra::shared().clone() }.redis_config("x:");
    config.engine.redis_timeout = Duration::from_millis(200);
    let app = spawn_app(config).await;
    let mut c = RateLimitServiceClient::new(mesh_testkit::channel(app.addr).await);
    let open = six(&mut c, "paths").await;
    for (n, (a, r)) in open.iter().zip(&redis).enumerate() {
        assert_eq!(a.decided_by, "fail-open", "call {}", n + 1);
        assert_eq!(a.resp.overall_code, r.resp.overall_code, "call {}", n + 1);
        for i in 0..2 {
            assert_same(&a.resp.statuses[i], &r.resp.statuses[i], &format!("fail-open call {} [{i}]", n + 1));
        }
    }

    // fail_closed: every descriptor over, with its limit, nothing left, and when to come back.
    let closed = check(&mut c, "paths_closed", call()).await;
    assert_eq!(closed.decided_by, "fail-closed");
    assert!(!closed.ok());
    for (s, r) in closed.resp.statuses.iter().zip(&redis[0].resp.statuses) {
        assert_eq!(s.code(), Code::OverLimit);
        assert_eq!(s.current_limit, r.current_limit);
        assert_eq!(s.limit_remaining, 0);
        assert!(s.duration_until_reset.is_some() && s.retry_after.is_some(), "{s:?}");
    }
    app.stop().await.unwrap();
}

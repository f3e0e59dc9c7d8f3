//! CreateSession is rate limited per user and per client IP by the real
//! rate-limit service; when that service cannot answer, the failure mode decides.

use std::{path::PathBuf, time::Duration};

use mesh_proto::session::ListUserSessionsRequest;
use mesh_ratelimit::EngineConfig;
use mesh_runtime::ServerConfig;
use mesh_session::FailureMode;
use mesh_testkit::{Infra, Running, free_addr, redis_prefix, spawn};
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_types::StatusExt;

use crate::helpers::{Fixture, config, create_req};

const RULES: &str = r#"
domain: session
failure_mode: fail_closed
descriptors:
  - key: user_id
    rate_limit: { unit: minute, requests_per_unit: 3, name: create_per_user }
  - key: client_ip
    rate_limit: { unit: minute, requests_per_unit: 5, name: create_per_ip }
"#;

/// The real rate-limit service with [`RULES`], and the directory of its rules file.
async fn spawn_ratelimit() -> (Running, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let path: PathBuf = dir.path().join("session.yaml");
    std::fs::write(&path, RULES).unwrap();
    let config = mesh_ratelimit::Config {
        server: ServerConfig::for_tests(),
        redis: Infra::shared().redis_config(&redis_prefix()),
        rules: Some(path),
        // Generous: a loaded CI machine must not fall back to the failure mode.
        engine: EngineConfig { redis_timeout: Duration::from_secs(2), ..EngineConfig::default() },
        audit: None,
    };
    let app = mesh_ratelimit::App::build(config).await.expect("ratelimit builds");
    let running = spawn(app.local_addr(), app.metrics_addr(), |sd| app.serve(sd));
    let ch = mesh_testkit::channel(running.addr).await;
    mesh_testkit::wait_for_health(&ch, "readiness", ServingStatus::Serving, Duration::from_secs(20))
        .await
        .unwrap();
    (running, dir)
}

#[tokio::test]
async fn create_is_rate_limited_per_user_and_per_client_ip() {
    let _t = mesh_testkit::init_telemetry();
    let (rl, _rules) = spawn_ratelimit().await;
    let mut config = config(Infra::shared());
    config.clients.ratelimit = Some(rl.addr.to_string().parse().unwrap());
    let mut f = Fixture::new(config).await;

    // Per user: 3 a minute, whatever the address.
    for n in 0..3 {
        f.c.create_session(create_req("mallory", &format!("10.9.0.{n}"))).await.unwrap();
    }
    let s = f.c.create_session(create_req("mallory", "10.9.0.9")).await.unwrap_err();
    assert_eq!(s.code(), Code::ResourceExhausted, "{}", s.message());
    let retry = s.get_details_retry_info().expect("RetryInfo").retry_delay.expect("a delay");
    assert!(retry > Duration::ZERO && retry <= Duration::from_secs(120), "{retry:?}");
    assert_eq!(s.message(), s.message().to_lowercase());
    let listed = f.c.list_user_sessions(ListUserSessionsRequest { user_id: "mallory".into() }).await.unwrap();
    assert_eq!(listed.into_inner().sessions.len(), 3, "a refused create writes nothing");

    // Per client IP: 5 a minute, whoever the user.
    for n in 0..5 {
        f.c.create_session(create_req(&format!("user-{n}"), "10.8.0.1")).await.unwrap();
    }
    let s = f.c.create_session(create_req("user-5", "10.8.0.1")).await.unwrap_err();
    assert_eq!(s.code(), Code::ResourceExhausted);
    // The same address in another spelling is the same counter.
    let s = f.c.create_session(create_req("user-6", "::ffff:10.8.0.1")).await.unwrap_err();
    assert_eq!(s.code(), Code::ResourceExhausted);
    // Another address is not limited.
    f.c.create_session(create_req("user-5", "10.8.0.2")).await.unwrap();

    assert_eq!(f.metric("mesh_session_ratelimited_total", &[]).await, 3.0);
    assert_eq!(f.metric("mesh_session_created_total", &[]).await, 9.0);
    f.app.stop().await.unwrap();
    rl.stop().await.unwrap();
}

#[tokio::test]
async fn an_unreachable_rate_limiter_fails_closed_by_default_and_open_if_configured() {
    let _t = mesh_testkit::init_telemetry();
    let nowhere = free_addr().to_string().parse().unwrap();
    let mut closed = config(Infra::shared());
    closed.clients.ratelimit = Some(nowhere);
    let mut open = closed.clone();
    open.session.ratelimit_failure_mode = FailureMode::FailOpen;
    open.redis.key_prefix = redis_prefix();

    let mut f = Fixture::new(closed).await;
    let s = f.c.create_session(create_req("oscar", "10.7.0.1")).await.unwrap_err();
    assert_eq!(s.code(), Code::Unavailable, "{}", s.message());
    assert_eq!(f.metric("mesh_session_ratelimit_unavailable_total", &["mode=\"fail_closed\""]).await, 1.0);
    // Creating is refused, but the service stays ready: validation does not need the rate limiter.
    let ch = mesh_testkit::channel(f.app.addr).await;
    assert_eq!(mesh_testkit::health_status(&ch, "readiness").await.unwrap(), ServingStatus::Serving);
    f.app.stop().await.unwrap();

    let mut f = Fixture::new(open).await;
    let made = f.c.create_session(create_req("oscar", "10.7.0.1")).await.unwrap().into_inner();
    assert!(made.token.starts_with("msess_"));
    assert_eq!(f.metric("mesh_session_ratelimit_unavailable_total", &["mode=\"fail_open\""]).await, 1.0);
    f.app.stop().await.unwrap();
}

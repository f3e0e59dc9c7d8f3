//! Limits against the real Redis Cluster: exactness, sharing between
//! instances, the algorithms, all-or-nothing across slots, shadow mode.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use mesh_proto::ratelimit::{CheckRequest, Code};
use mesh_testkit::Infra;
use tonic_types::StatusExt;

use crate::helpers::{RulesFile, check, client, config_with, desc, hit, metric, spawn_app};

const RULES: &str = r#"
domain: t
descriptors:
  - key: fixed
    rate_limit: { unit: day, requests_per_unit: 5, algorithm: fixed_window, name: fixed }
  - key: sliding
    rate_limit: { unit: hour, requests_per_unit: 5, name: sliding }
  - key: bucket
    rate_limit: { unit: hour, requests_per_unit: 1, algorithm: token_bucket, burst: 5, name: bucket }
  - key: fast_bucket
    rate_limit: { unit: second, requests_per_unit: 10, algorithm: token_bucket, burst: 3 }
  - key: per_second
    rate_limit: { unit: second, requests_per_unit: 5, name: per_second }
  - key: big
    rate_limit: { unit: hour, requests_per_unit: 10, name: big }
  - key: small
    rate_limit: { unit: hour, requests_per_unit: 1, name: small }
  - key: shadow
    shadow_mode: true
    rate_limit: { unit: hour, requests_per_unit: 1, name: shadowed }
  - key: route
    value: chat
    descriptors:
      - key: user_id
        rate_limit: { unit: minute, requests_per_unit: 30, name: chat_per_user }
      - key: user_id
        value: vip
        rate_limit: { unlimited: true }
  - key: plan
    value: pro
    rate_limit: { unit: hour, requests_per_unit: 100, name: pro, replaces: [{ name: small }] }
"#;

#[tokio::test]
async fn the_limit_is_exact_at_n_for_every_algorithm() {
    let _t = mesh_testkit::init_telemetry();
    let rules = RulesFile::new(RULES);
    let app = spawn_app(config_with(Infra::shared(), &rules)).await;
    let mut c = client(&app).await;
    for key in ["fixed", "sliding", "bucket"] {
        for i in 0..5u32 {
            let a = hit(&mut c, "t", &[(key, "u1")]).await;
            assert!(a.ok(), "{key}: hit {} refused: {a:?}", i + 1);
            assert_eq!(a.decided_by, "redis");
            assert_eq!(a.remaining(0), 4 - i, "{key}");
            let limit = a.resp.statuses[0].current_limit.clone().unwrap();
            assert_eq!(limit.name, key);
        }
        let a = hit(&mut c, "t", &[(key, "u1")]).await;
        assert_eq!(a.resp.overall_code(), Code::OverLimit, "{key}: hit 6 allowed");
        let s = &a.resp.statuses[0];
        assert_eq!(s.code(), Code::OverLimit);
        assert_eq!(s.limit_remaining, 0);
        let retry = s.retry_after.unwrap();
        assert!(retry.seconds > 0 || retry.nanos > 0, "{key}: retry_after {retry:?}");
        // Another value of the same key has a counter of its own.
        assert!(hit(&mut c, "t", &[(key, "u2")]).await.ok());
    }
    assert_eq!(metric(&app, "mesh_ratelimit_over_limit_total", &["rule=\"fixed\""]).await, 1.0);
    assert_eq!(metric(&app, "mesh_ratelimit_total_hits_total", &["rule=\"sliding\""]).await, 7.0);
    app.stop().await.unwrap();
}

#[tokio::test]
async fn two_instances_share_counters() {
    let _t = mesh_testkit::init_telemetry();
    let rules = RulesFile::new(RULES);
    let config = config_with(Infra::shared(), &rules);
    let (a, b) = (spawn_app(config.clone()).await, spawn_app(config).await);
    let (mut ca, mut cb) = (client(&a).await, client(&b).await);
    let mut allowed = 0;
    for i in 0..10 {
        let c = if i % 2 == 0 { &mut ca } else { &mut cb };
        if hit(c, "t", &[("big", "shared")]).await.ok() {
            allowed += 1;
        }
    }
    assert_eq!(allowed, 10);
    assert!(!hit(&mut ca, "t", &[("big", "shared")]).await.ok());
    assert!(!hit(&mut cb, "t", &[("big", "shared")]).await.ok());
    a.stop().await.unwrap();
    b.stop().await.unwrap();
}

#[tokio::test]
async fn the_sliding_window_does_not_allow_twice_the_limit_across_a_boundary() {
    let _t = mesh_testkit::init_telemetry();
    let rules = RulesFile::new(RULES);
    let app = spawn_app(config_with(Infra::shared(), &rules)).await;
    let mut c = client(&app).await;
    // Redis runs on this machine: its clock is ours. Fill the per-second
    // limit late in one second...
    let ms = || SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() % 1000;
    while ms() < 750 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut first = 0;
    for _ in 0..5 {
        first += u32::from(hit(&mut c, "t", &[("per_second", "x")]).await.ok());
    }
    // ...then try again just after the boundary: a fixed window would allow
    // five more; the weighted previous window leaves room for at most a few.
    while ms() >= 750 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut second = 0;
    for _ in 0..5 {
        second += u32::from(hit(&mut c, "t", &[("per_second", "x")]).await.ok());
    }
    assert_eq!(first, 5);
    assert!(second < 5, "{second} allowed right after the boundary");
    app.stop().await.unwrap();
}

#[tokio::test]
async fn the_token_bucket_honours_burst_then_rate() {
    let _t = mesh_testkit::init_telemetry();
    let rules = RulesFile::new(RULES);
    let app = spawn_app(config_with(Infra::shared(), &rules)).await;
    let mut c = client(&app).await;
    // 10/s sustained, bursts of 3: three at once, then one per 100 ms.
    for _ in 0..3 {
        assert!(hit(&mut c, "t", &[("fast_bucket", "x")]).await.ok());
    }
    let refused = hit(&mut c, "t", &[("fast_bucket", "x")]).await;
    assert!(!refused.ok());
    let retry = refused.resp.statuses[0].retry_after.unwrap();
    let retry = Duration::new(retry.seconds as u64, retry.nanos as u32);
    assert!(retry <= Duration::from_millis(100), "retry_after {retry:?}");
    // The local cache refuses the key until then, without Redis.
    let cached = hit(&mut c, "t", &[("fast_bucket", "x")]).await;
    if !cached.ok() {
        assert!(cached.decided_by == "local-cache" || cached.decided_by == "redis");
    }
    tokio::time::sleep(retry + Duration::from_millis(20)).await;
    let again = hit(&mut c, "t", &[("fast_bucket", "x")]).await;
    assert!(again.ok(), "{again:?}");
    // A hits_addend above the burst can never fit: no retry_after.
    let huge = check(&mut c, "t", vec![desc(&[("fast_bucket", "y")], Some(4))]).await;
    assert!(!huge.ok());
    assert!(huge.resp.statuses[0].retry_after.is_none());
    app.stop().await.unwrap();
}

/// The Redis key of a descriptor, as the service builds it (to pick values on different slots).
fn slot(prefix: &str, entries: &str) -> u16 {
    fred::util::redis_keyslot(format!("{prefix}rl:{{t|{entries}}}:sw:3600").as_bytes())
}

#[tokio::test]
async fn an_over_limit_call_consumes_nothing_on_other_slots() {
    let _t = mesh_testkit::init_telemetry();
    let rules = RulesFile::new(RULES);
    let config = config_with(Infra::shared(), &rules);
    let prefix = config.redis.key_prefix.clone();
    let app = spawn_app(config).await;
    let mut c = client(&app).await;
    // Values whose keys sit on slots owned by different masters (3 masters: thirds of the slots).
    let big_slot = slot(&prefix, "big=a");
    let small = (0..100)
        .map(|i| format!("s{i}"))
        .find(|v| slot(&prefix, &format!("small={v}")) / 5462 != big_slot / 5462)
        .unwrap();
    assert!(hit(&mut c, "t", &[("small", &small)]).await.ok());
    for round in 0..3 {
        let both =
            check(&mut c, "t", vec![desc(&[("big", "a")], Some(3)), desc(&[("small", &small)], None)]).await;
        assert!(!both.ok(), "round {round}");
        assert_eq!(both.resp.statuses[0].code(), Code::Ok);
        assert_eq!(both.resp.statuses[1].code(), Code::OverLimit);
        // Nothing was taken from `big`: a check without hits sees all 10.
        let peek = check(&mut c, "t", vec![desc(&[("big", "a")], Some(0))]).await;
        assert!(peek.ok());
        assert_eq!(peek.remaining(0), 10, "round {round}: {peek:?}");
    }
    // The first round went through both slots (commit, then give back).
    assert_eq!(metric(&app, "mesh_ratelimit_compensations_total", &["result=\"ok\""]).await, 3.0);
    // And the limits still hold exactly afterwards.
    let mut allowed = 0;
    for _ in 0..12 {
        allowed += u32::from(hit(&mut c, "t", &[("big", "a")]).await.ok());
    }
    assert_eq!(allowed, 10);
    app.stop().await.unwrap();
}

#[tokio::test]
async fn shadow_mode_reports_over_limit_but_allows() {
    let _t = mesh_testkit::init_telemetry();
    let rules = RulesFile::new(RULES);
    let app = spawn_app(config_with(Infra::shared(), &rules)).await;
    let mut c = client(&app).await;
    let first = hit(&mut c, "t", &[("shadow", "x")]).await;
    assert!(first.ok() && first.resp.statuses[0].code() == Code::Ok);
    assert!(first.resp.statuses[0].shadow_mode);
    for _ in 0..3 {
        let a = hit(&mut c, "t", &[("shadow", "x")]).await;
        assert!(a.ok(), "a shadow rule never refuses");
        assert_eq!(a.resp.statuses[0].code(), Code::OverLimit);
        assert!(a.resp.statuses[0].shadow_mode);
    }
    assert_eq!(metric(&app, "mesh_ratelimit_shadow_mode_total", &["rule=\"shadowed\""]).await, 3.0);
    app.stop().await.unwrap();
}

#[tokio::test]
async fn unknown_descriptors_unlimited_and_replaces_follow_envoy() {
    let _t = mesh_testkit::init_telemetry();
    let rules = RulesFile::new(RULES);
    let app = spawn_app(config_with(Infra::shared(), &rules)).await;
    let mut c = client(&app).await;
    for (domain, entries) in [
        ("t", vec![("nothing", "x")]),
        ("no-such-domain", vec![("big", "a")]),
        ("t", vec![("route", "chat")]),
    ] {
        for _ in 0..3 {
            let a = hit(&mut c, domain, &entries).await;
            assert!(a.ok(), "{domain} {entries:?}");
            assert!(a.resp.statuses[0].current_limit.is_none());
            assert_eq!(a.decided_by, "rules");
        }
    }
    // A more specific value wins: vip is unlimited, others get 30/minute.
    let vip = hit(&mut c, "t", &[("route", "chat"), ("user_id", "vip")]).await;
    assert!(vip.ok());
    assert_eq!(vip.remaining(0), u32::MAX);
    let user = hit(&mut c, "t", &[("route", "chat"), ("user_id", "7")]).await;
    assert_eq!(user.resp.statuses[0].current_limit.as_ref().unwrap().name, "chat_per_user");
    // `replaces`: with the pro plan's descriptor present, `small` does not apply.
    for _ in 0..3 {
        let a = check(&mut c, "t", vec![desc(&[("plan", "pro")], None), desc(&[("small", "p")], None)]).await;
        assert!(a.ok());
        assert!(a.resp.statuses[1].current_limit.is_none());
    }
    app.stop().await.unwrap();
}

#[tokio::test]
async fn bad_input_is_invalid_argument_and_consumes_nothing() {
    let _t = mesh_testkit::init_telemetry();
    let rules = RulesFile::new(RULES);
    let app = spawn_app(config_with(Infra::shared(), &rules)).await;
    let mut c = client(&app).await;
    let good = || desc(&[("small", "bad-input")], None);
    let cases: Vec<(CheckRequest, &str)> = vec![
        (CheckRequest { domain: String::new(), descriptors: vec![good()], hits_addend: 0 }, "domain"),
        (CheckRequest { domain: "t".into(), descriptors: vec![], hits_addend: 0 }, "descriptors"),
        (
            CheckRequest { domain: "t".into(), descriptors: vec![good(), desc(&[], None)], hits_addend: 0 },
            "descriptors[1].entries",
        ),
        (
            CheckRequest {
                domain: "t".into(),
                descriptors: vec![good(), desc(&[("", "v")], None)],
                hits_addend: 0,
            },
            "descriptors[1].entries[0].key",
        ),
        (
            CheckRequest {
                domain: "t".into(),
                descriptors: (0..65).map(|_| good()).collect(),
                hits_addend: 0,
            },
            "descriptors",
        ),
        (
            CheckRequest { domain: "t".into(), descriptors: vec![good()], hits_addend: 2_000_000_000 },
            "hits_addend",
        ),
        (
            CheckRequest {
                domain: "t".into(),
                descriptors: vec![good(), desc(&[("k", "v")], Some(u32::MAX))],
                hits_addend: 0,
            },
            "descriptors[1].hits_addend",
        ),
    ];
    for (req, field) in cases {
        let status = c.check(req).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{field}");
        let bad = status.get_details_bad_request().expect("field violations");
        assert!(bad.field_violations.iter().any(|v| v.field == field), "{field}: {bad:?}");
        assert_eq!(status.message(), status.message().to_lowercase());
    }
    // None of them consumed the one hit `small` allows.
    assert!(hit(&mut c, "t", &[("small", "bad-input")]).await.ok());
    app.stop().await.unwrap();
}

#[tokio::test]
async fn keys_over_their_limit_are_refused_from_the_local_cache() {
    let _t = mesh_testkit::init_telemetry();
    let rules = RulesFile::new(RULES);
    let app = spawn_app(config_with(Infra::shared(), &rules)).await;
    let mut c = client(&app).await;
    assert!(hit(&mut c, "t", &[("small", "hot")]).await.ok());
    let first = hit(&mut c, "t", &[("small", "hot")]).await;
    assert!(!first.ok());
    assert_eq!(first.decided_by, "redis");
    // The same key again: no Redis round trip, same answer, a full retry_after.
    let cached = hit(&mut c, "t", &[("small", "hot")]).await;
    assert!(!cached.ok());
    assert_eq!(cached.decided_by, "local-cache");
    let retry = cached.resp.statuses[0].retry_after.unwrap();
    assert!(retry.seconds > 60, "an hourly limit's retry_after, got {retry:?}");
    // A call that also carries a key the cache does not know asks Redis once (to
    // answer that descriptor too), is refused whole, nothing consumed elsewhere; the
    // same call again comes from the cache with the same answer.
    let pair = || vec![desc(&[("big", "cold")], None), desc(&[("small", "hot")], None)];
    let both = check(&mut c, "t", pair()).await;
    assert!(!both.ok());
    assert_eq!(both.decided_by, "redis");
    assert_eq!(both.resp.statuses[0].limit_remaining, 10);
    let again = check(&mut c, "t", pair()).await;
    assert!(!again.ok());
    assert_eq!(again.decided_by, "local-cache");
    assert_eq!(again.resp.statuses[0].limit_remaining, 10);
    assert_eq!(again.resp.statuses[0].current_limit, both.resp.statuses[0].current_limit);
    let peek = check(&mut c, "t", vec![desc(&[("big", "cold")], Some(0))]).await;
    assert_eq!(peek.remaining(0), 10);
    assert_eq!(
        metric(&app, "mesh_ratelimit_over_limit_with_local_cache_total", &["rule=\"small\""]).await,
        2.0
    );
    app.stop().await.unwrap();
}

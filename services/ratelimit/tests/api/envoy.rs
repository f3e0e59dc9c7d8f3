//! Envoy's `ShouldRateLimit` on the same engine as `Check`.

use mesh_proto::{
    envoy::extensions::common::ratelimit::v3::{RateLimitDescriptor, rate_limit_descriptor},
    envoy_rls::{RateLimitRequest, rate_limit_response, rate_limit_service_client::RateLimitServiceClient},
    ratelimit::Code,
};
use mesh_testkit::Infra;

use crate::helpers::{RulesFile, check, client, config_with, desc, spawn_app};

const RULES: &str = r#"
domain: edge
descriptors:
  - key: remote_address
    rate_limit: { unit: hour, requests_per_unit: 4, name: per_ip }
  - key: path
    value: /api/*
    rate_limit: { unit: hour, requests_per_unit: 100 }
"#;

fn envoy_req(domain: &str, entries: &[(&str, &str)], hits: Option<u64>) -> RateLimitRequest {
    RateLimitRequest {
        domain: domain.into(),
        descriptors: vec![RateLimitDescriptor {
            entries: entries
                .iter()
                .map(|(k, v)| rate_limit_descriptor::Entry { key: (*k).into(), value: (*v).into() })
                .collect(),
            limit: None,
            hits_addend: hits,
        }],
        hits_addend: 0,
    }
}

#[tokio::test]
async fn should_rate_limit_gives_the_same_answers_as_check() {
    let _t = mesh_testkit::init_telemetry();
    let rules = RulesFile::new(RULES);
    let app = spawn_app(config_with(Infra::shared(), &rules)).await;
    let mut mesh = client(&app).await;
    let mut envoy = RateLimitServiceClient::new(mesh_testkit::channel(app.addr).await);

    // Both APIs count against the same counter, alternately, and agree on
    // every code and remaining count.
    for i in 0..6u32 {
        let ip = [("remote_address", "10.0.0.1")];
        let (code, remaining, name) = if i % 2 == 0 {
            let r = envoy.should_rate_limit(envoy_req("edge", &ip, None)).await.unwrap().into_inner();
            let s = &r.statuses[0];
            assert_eq!(r.overall_code, s.code);
            let code =
                if r.overall_code() == rate_limit_response::Code::Ok { Code::Ok } else { Code::OverLimit };
            let limit = s.current_limit.clone().unwrap();
            assert_eq!(limit.unit(), rate_limit_response::rate_limit::Unit::Hour);
            assert_eq!(limit.requests_per_unit, 4);
            (code, s.limit_remaining, limit.name)
        } else {
            let a = check(&mut mesh, "edge", vec![desc(&ip, None)]).await;
            let s = &a.resp.statuses[0];
            (a.resp.overall_code(), s.limit_remaining, s.current_limit.clone().unwrap().name)
        };
        let want = if i < 4 { Code::Ok } else { Code::OverLimit };
        assert_eq!(code, want, "call {i}");
        assert_eq!(remaining, 3u32.saturating_sub(i), "call {i}");
        assert_eq!(name, "per_ip");
    }

    // Wildcard values, unknown descriptors and per-descriptor hits_addend.
    let r = envoy
        .should_rate_limit(envoy_req("edge", &[("path", "/api/users")], Some(10)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.overall_code(), rate_limit_response::Code::Ok);
    assert_eq!(r.statuses[0].limit_remaining, 90);
    let a = check(&mut mesh, "edge", vec![desc(&[("path", "/api/users")], Some(0))]).await;
    assert_eq!(a.remaining(0), 90);
    let r = envoy.should_rate_limit(envoy_req("edge", &[("user", "x")], None)).await.unwrap().into_inner();
    assert_eq!(r.overall_code(), rate_limit_response::Code::Ok);
    assert!(r.statuses[0].current_limit.is_none());

    // Bad input is refused the same way.
    let e = envoy.should_rate_limit(envoy_req("", &[("k", "v")], None)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    app.stop().await.unwrap();
}

#[tokio::test]
async fn a_descriptor_limit_override_applies_as_in_envoy() {
    use mesh_proto::envoy::r#type::v3::RateLimitUnit;
    let _t = mesh_testkit::init_telemetry();
    let rules = RulesFile::new(RULES);
    let app = spawn_app(config_with(Infra::shared(), &rules)).await;
    // Ready first: before Redis answers, decisions come from the failure mode.
    drop(client(&app).await);
    let mut envoy = RateLimitServiceClient::new(mesh_testkit::channel(app.addr).await);
    let req = || {
        let mut r = envoy_req("edge", &[("tenant", "acme")], None);
        r.descriptors[0].limit = Some(rate_limit_descriptor::RateLimitOverride {
            requests_per_unit: 2,
            unit: RateLimitUnit::Hour.into(),
        });
        r
    };
    let codes: Vec<rate_limit_response::Code> = {
        let mut v = Vec::new();
        for _ in 0..3 {
            v.push(envoy.should_rate_limit(req()).await.unwrap().into_inner().overall_code());
        }
        v
    };
    use rate_limit_response::Code as C;
    assert_eq!(codes, [C::Ok, C::Ok, C::OverLimit]);
    // Unknown domains ignore overrides, as Envoy's ratelimit does.
    let mut r = req();
    r.domain = "unknown".into();
    assert_eq!(envoy.should_rate_limit(r).await.unwrap().into_inner().overall_code(), C::Ok);
    app.stop().await.unwrap();
}

/// The response headers of an answer, by name.
fn header_map(r: &mesh_proto::envoy_rls::RateLimitResponse) -> std::collections::HashMap<String, String> {
    r.response_headers_to_add.iter().map(|h| (h.key.clone(), h.value.clone())).collect()
}

#[tokio::test]
async fn ratelimit_headers_are_sent_when_the_domain_asks_for_them() {
    let _t = mesh_testkit::init_telemetry();
    let rules = RulesFile::new(
        r#"
domain: headers
rate_limit_headers: DRAFT_VERSION_03
descriptors:
  - key: remote_address
    rate_limit: { unit: minute, requests_per_unit: 3, name: per_ip }
  - key: route
    rate_limit: { unit: hour, requests_per_unit: 100 }
---
domain: quiet
descriptors:
  - key: remote_address
    rate_limit: { unit: minute, requests_per_unit: 3 }
---
domain: silenced
rate_limit_headers: NONE
descriptors:
  - key: remote_address
    rate_limit: { unit: minute, requests_per_unit: 3 }
"#,
    );
    let app = spawn_app(config_with(Infra::shared(), &rules)).await;
    drop(client(&app).await);
    let mut envoy = RateLimitServiceClient::new(mesh_testkit::channel(app.addr).await);
    let ip = format!("10.9.{}.{}", std::process::id() % 250, rand_octet());
    let req = |domain: &str| {
        let mut r = envoy_req(domain, &[("remote_address", &ip)], None);
        r.descriptors.push(envoy_req(domain, &[("route", "orders")], None).descriptors.remove(0));
        r
    };
    for (i, remaining) in [2, 1, 0, 0].into_iter().enumerate() {
        let r = envoy.should_rate_limit(req("headers")).await.unwrap().into_inner();
        let over = i == 3;
        assert_eq!(r.overall_code() == rate_limit_response::Code::OverLimit, over, "call {i}");
        let h = header_map(&r);
        // The closest limit (per ip) leads, then every limit's policy.
        assert_eq!(h["x-ratelimit-limit"], r#"3, 3;w=60;name="per_ip", 100;w=3600"#, "call {i}");
        assert_eq!(h["x-ratelimit-remaining"], remaining.to_string(), "call {i}");
        // The closest limit's own reset, in whole seconds rounded up.
        let until = r.statuses[0].duration_until_reset.unwrap();
        let want = until.seconds as u64 + u64::from(until.nanos > 0);
        assert_eq!(h["x-ratelimit-reset"], want.to_string(), "call {i}");
        assert!(want >= 1, "call {i}");
    }
    // Off by default.
    let r = envoy.should_rate_limit(req("quiet")).await.unwrap().into_inner();
    assert!(r.response_headers_to_add.is_empty(), "{:?}", r.response_headers_to_add);
    app.stop().await.unwrap();

    // On for the whole service, unless a domain says NONE.
    let mut config = config_with(Infra::shared(), &rules);
    config.engine.rate_limit_headers = mesh_ratelimit::RateLimitHeaders::DraftVersion03;
    let app = spawn_app(config).await;
    drop(client(&app).await);
    let mut envoy = RateLimitServiceClient::new(mesh_testkit::channel(app.addr).await);
    let r = envoy.should_rate_limit(req("quiet")).await.unwrap().into_inner();
    assert_eq!(header_map(&r).get("x-ratelimit-limit").map(String::as_str), Some("3, 3;w=60"));
    let r = envoy.should_rate_limit(req("silenced")).await.unwrap().into_inner();
    assert!(r.response_headers_to_add.is_empty(), "{:?}", r.response_headers_to_add);
    app.stop().await.unwrap();
}

fn rand_octet() -> u8 {
    (std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos() % 250) as u8
}

//! Bad input, whatever layer rejects it (tonic's decoder or the service's
//! validation): a clear INVALID_ARGUMENT naming the field (or
//! DEADLINE_EXCEEDED for a deadline already past), and no counter moved.

use mesh_proto::ratelimit::{CheckRequest, GetRulesRequest};
use mesh_testkit::{
    Infra,
    raw::{Wire, unary},
};
use prost::Message as _;
use tonic::Code;
use tonic_types::StatusExt as _;

use crate::helpers::{RulesFile, check, client, config_with, desc, spawn_app};

const CHECK: &str = "/mesh.ratelimit.v1.RateLimitService/Check";

const RULES: &str = r#"
domain: t
descriptors:
  - key: user
    rate_limit: { unit: hour, requests_per_unit: 3, name: per_user }
"#;

fn assert_invalid(s: &tonic::Status, field: &str) {
    assert_eq!(s.code(), Code::InvalidArgument, "{field}: {s:?}");
    assert!(s.message().starts_with("invalid request: "), "{s:?}");
    let bad = s.get_details_bad_request().expect("field violations");
    assert!(bad.field_violations.iter().any(|v| v.field.starts_with(field)), "{field}: {bad:?}");
}

/// One descriptor `user=<user>` with one hit, hand-encoded, with `entry`
/// replacing the entry's encoding.
fn check_with_entry(entry: Wire) -> Wire {
    Wire::new().bytes(1, b"t").message(2, &Wire::new().message(1, &entry))
}

#[tokio::test]
async fn bad_checks_are_invalid_argument_naming_the_field_and_consume_nothing() {
    let rules = RulesFile::new(RULES);
    let app = spawn_app(config_with(Infra::shared(), &rules)).await;
    let mut c = client(&app).await;
    let user = |u: &str| vec![desc(&[("user", u)], Some(1))];
    let raw: &[(&str, Wire, &str)] = &[
        (
            "value not utf-8",
            check_with_entry(Wire::new().bytes(1, b"user").bytes(2, b"bad\xff")),
            "descriptors.entries.value",
        ),
        (
            "key not utf-8",
            check_with_entry(Wire::new().bytes(1, b"us\xc0er").bytes(2, b"bad")),
            "descriptors.entries.key",
        ),
        ("domain not utf-8", Wire::new().bytes(1, b"\xfe"), "domain"),
        // A varint where the descriptor message is expected.
        ("wrong wire type", Wire::new().bytes(1, b"t").varint_field(2, 1), "descriptors"),
    ];
    for (what, body, field) in raw {
        let s = unary(app.addr, CHECK, body.encode(), &[]).await.expect_err(what);
        assert_invalid(&s, field);
    }
    let many = CheckRequest {
        domain: "t".into(),
        descriptors: (0..10_000).map(|_| desc(&[("user", "bad")], Some(1))).collect(),
        hits_addend: 0,
    };
    assert_invalid(&c.check(many).await.unwrap_err(), "descriptors");
    let long = CheckRequest {
        domain: "t".into(),
        descriptors: vec![desc(&[("user", &"v".repeat(1 << 20))], Some(1))],
        hits_addend: 0,
    };
    assert_invalid(&c.check(long).await.unwrap_err(), "descriptors[0].entries[0].value");
    let hits = CheckRequest { domain: "t".into(), descriptors: user("bad"), hits_addend: u32::MAX };
    assert_invalid(&c.check(hits).await.unwrap_err(), "hits_addend");
    assert_invalid(&c.check(CheckRequest::default()).await.unwrap_err(), "domain");
    assert_invalid(&c.get_rules(GetRulesRequest::default()).await.unwrap_err(), "domain");
    // A deadline already past: refused before anything is counted.
    let body = CheckRequest { domain: "t".into(), descriptors: user("bad"), hits_addend: 0 }.encode_to_vec();
    for timeout in ["0n", "0m"] {
        let s = unary(app.addr, CHECK, &body, &[("grpc-timeout", timeout)]).await.expect_err(timeout);
        assert_eq!(s.code(), Code::DeadlineExceeded, "{timeout}: {s:?}");
    }
    // Not one of them consumed a hit of `user=bad` (check only: 0 hits).
    let a = check(&mut c, "t", vec![desc(&[("user", "bad")], Some(0))]).await;
    assert_eq!(a.remaining(0), 3);
    app.stop().await.unwrap();
}

#[tokio::test]
async fn injection_strings_are_just_values() {
    let rules = RulesFile::new(RULES);
    let app = spawn_app(config_with(Infra::shared(), &rules)).await;
    let mut c = client(&app).await;
    // Redis-protocol, Lua, hash-tag and JSON metacharacters in keys and values.
    let evil = ["x\r\nFLUSHALL\r\n", "'; redis.call('FLUSHALL') --", "}{user}{", r#"{"$gt":""}"#, "*"];
    for v in evil {
        let a = check(&mut c, "t", vec![desc(&[("user", v)], Some(1))]).await;
        assert!(a.ok() && a.remaining(0) == 2, "{v:?}: {:?}", a.resp);
        let a = check(&mut c, "t", vec![desc(&[(v, "x")], Some(1))]).await;
        assert!(a.ok(), "{v:?} as a key");
    }
    // Each counted on its own: a second hit of one leaves the others alone.
    let a = check(&mut c, "t", vec![desc(&[("user", evil[0])], Some(1))]).await;
    assert_eq!(a.remaining(0), 1);
    let a = check(&mut c, "t", vec![desc(&[("user", "someone-else")], Some(0))]).await;
    assert_eq!(a.remaining(0), 3);
    app.stop().await.unwrap();
}

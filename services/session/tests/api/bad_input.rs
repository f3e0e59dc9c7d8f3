//! Bad input, whatever layer rejects it (tonic's decoder or the service's
//! validation): a clear INVALID_ARGUMENT naming the field (UNAUTHENTICATED
//! for a token that is not one, DEADLINE_EXCEEDED for a deadline already
//! past), and no session created or changed.

use mesh_proto::session::{
    CreateSessionRequest, RevokeSessionRequest, RevokeUserSessionsRequest, ValidateSessionRequest,
};
use mesh_testkit::{
    Infra,
    raw::{Wire, unary},
};
use prost::Message as _;
use tonic::Code;
use tonic_types::StatusExt as _;

use crate::helpers::{Fixture, config, create, create_req, list, validate};

const CREATE: &str = "/mesh.session.v1.SessionService/CreateSession";
const VALIDATE: &str = "/mesh.session.v1.SessionService/ValidateSession";

fn assert_invalid(s: &tonic::Status, field: &str) {
    assert_eq!(s.code(), Code::InvalidArgument, "{field}: {s:?}");
    assert!(s.message().starts_with("invalid request: "), "{s:?}");
    let bad = s.get_details_bad_request().expect("field violations");
    assert!(bad.field_violations.iter().any(|v| v.field.starts_with(field)), "{field}: {bad:?}");
}

#[tokio::test]
async fn undecodable_requests_are_invalid_argument_naming_the_field() {
    let mut f = Fixture::new(config(Infra::shared())).await;
    let user = "bad-input-undecodable";
    let valid = create_req(user, "10.1.2.3").encode_to_vec();
    let with = |extra: Wire| [valid.as_slice(), extra.encode()].concat();
    let cases: &[(&str, &str, Vec<u8>, &str)] = &[
        ("user id not utf-8", CREATE, with(Wire::new().bytes(1, b"bad-input-\xff")), "user_id"),
        (
            "attribute not utf-8",
            CREATE,
            with(Wire::new().message(2, &Wire::new().bytes(1, b"k").bytes(2, b"\xed\xa0\x80"))),
            "attributes",
        ),
        // A string where a Duration message is expected.
        ("wrong type", CREATE, with(Wire::new().bytes(3, b"10 minutes")), "idle_timeout"),
        (
            "user agent not utf-8",
            CREATE,
            with(Wire::new().message(5, &Wire::new().bytes(2, b"\x80"))),
            "client",
        ),
        ("token not utf-8", VALIDATE, Wire::new().bytes(1, b"msess_\xff").encode().to_vec(), "token"),
    ];
    for (what, path, body, field) in cases {
        let s = unary(f.app.addr, path, body, &[]).await.expect_err(what);
        assert_invalid(&s, field);
    }
    assert!(list(&mut f, user).await.is_empty());
}

#[tokio::test]
async fn empty_oversize_and_huge_requests_change_nothing() {
    let mut f = Fixture::new(config(Infra::shared())).await;
    let user = "bad-input-huge";
    let s = f.c.create_session(CreateSessionRequest::default()).await.unwrap_err();
    assert_invalid(&s, "user_id");
    let s = f.c.create_session(create_req(&"u".repeat(1 << 20), "10.1.2.3")).await.unwrap_err();
    assert_invalid(&s, "user_id");
    let mut many = create_req(user, "10.1.2.3");
    many.attributes = (0..10_000).map(|i| (format!("k{i}"), "v".repeat(100))).collect();
    assert_invalid(&f.c.create_session(many).await.unwrap_err(), "attributes");
    assert_invalid(&f.c.revoke_session(RevokeSessionRequest::default()).await.unwrap_err(), "target");
    let s = f.c.revoke_user_sessions(RevokeUserSessionsRequest::default()).await.unwrap_err();
    assert!(matches!(s.code(), Code::InvalidArgument | Code::PermissionDenied), "{s:?}");
    // A token is either a valid one or UNAUTHENTICATED, whatever its size.
    for t in ["", "x", &"a".repeat(1 << 20)] {
        assert_eq!(validate(&mut f.c, t, false).await.unwrap_err(), Code::Unauthenticated);
    }
    assert!(list(&mut f, user).await.is_empty());
}

#[tokio::test]
async fn injection_strings_are_just_ids() {
    let mut f = Fixture::new(config(Infra::shared())).await;
    let victim = "bad-input-victim";
    let kept = create(&mut f.c, victim).await;
    for user in [
        "*",
        "bad-input-'; DROP TABLE sessions; --",
        r#"{"$ne":null}"#,
        "{session:000}:*",
        "bad-input-victim*",
    ] {
        match f.c.create_session(create_req(user, "10.1.2.3")).await {
            Ok(r) => {
                let r = r.into_inner();
                assert_eq!(r.session.unwrap().user_id, user);
                assert_eq!(list(&mut f, user).await.len(), 1, "{user:?}");
            }
            Err(s) => assert_invalid(&s, "user_id"),
        }
    }
    // The other user's session is untouched, and only theirs is listed.
    assert_eq!(list(&mut f, victim).await, [kept.session.unwrap().id]);
    assert!(validate(&mut f.c, &kept.token, false).await.is_ok());
}

#[tokio::test]
async fn a_deadline_already_past_creates_nothing() {
    let mut f = Fixture::new(config(Infra::shared())).await;
    let user = "bad-input-late";
    let body = create_req(user, "10.1.2.3").encode_to_vec();
    for timeout in ["0n", "0m", "0S"] {
        let s = unary(f.app.addr, CREATE, &body, &[("grpc-timeout", timeout)]).await.expect_err(timeout);
        assert_eq!(s.code(), Code::DeadlineExceeded, "{timeout}: {s:?}");
    }
    let token = create(&mut f.c, "bad-input-on-time").await.token;
    let v = ValidateSessionRequest { token, touch: true }.encode_to_vec();
    let s = unary(f.app.addr, VALIDATE, &v, &[("grpc-timeout", "0n")]).await.unwrap_err();
    assert_eq!(s.code(), Code::DeadlineExceeded);
    assert!(list(&mut f, user).await.is_empty());
}

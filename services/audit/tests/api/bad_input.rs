//! Bad input, whatever layer rejects it (tonic's decoder or the service's
//! validation): a clear INVALID_ARGUMENT naming the field (or
//! DEADLINE_EXCEEDED for a deadline already past), and nothing appended.

use mesh_proto::audit::{AppendRequest, AuditEvent, EventFilter, QueryRequest};
use mesh_testkit::raw::{Wire, unary};
use prost::Message as _;
use tonic::Code;

use crate::helpers::{Fixture, append, event};

const APPEND: &str = "/mesh.audit.v1.AuditService/Append";

/// Rows in the chain (read on the primary, not a lagging replica).
async fn rows(f: &Fixture) -> i64 {
    let mut owner = f.owner().await;
    sqlx::query_scalar("select count(*) from audit_events").fetch_one(&mut owner).await.unwrap()
}

/// A valid event's encoding with `extra` fields appended (a later
/// occurrence of a field replaces the earlier one).
fn event_with(extra: Wire) -> Wire {
    let mut b = event("u-bad", "document.put").encode_to_vec();
    b.extend_from_slice(extra.encode());
    Wire::new().bytes(1, &b).bytes(2, b"bad-input-key")
}

fn assert_invalid(r: Result<impl std::fmt::Debug, tonic::Status>, field: &str) {
    let s = r.expect_err("bad input is refused");
    assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
    assert!(s.message().starts_with("invalid request: ") && s.message().contains(field), "{s:?}");
}

#[tokio::test]
async fn metadata_nested_past_the_decoders_limit_is_invalid_argument_naming_the_field() {
    let f = Fixture::new().await;
    let deep = Wire::nested_struct("k", 45);
    let r = unary(f.app.addr, APPEND, event_with(Wire::new().message(12, &deep)).encode(), &[]).await;
    let s = r.expect_err("too deep to decode");
    assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
    assert!(s.message().contains("event.metadata.fields"), "{s:?}");
    assert!(s.message().contains("recursion limit"), "{s:?}");
    // The same violation as the service's own, in google.rpc.BadRequest.
    use tonic_types::StatusExt as _;
    let details = s.get_error_details();
    let v = &details.bad_request().expect("BadRequest details").field_violations;
    assert!(v[0].field.starts_with("event.metadata.fields"), "{v:?}");
    assert_eq!(rows(&f).await, 0);
}

#[tokio::test]
async fn undecodable_requests_are_invalid_argument_and_append_nothing() {
    let f = Fixture::new().await;
    let cases: &[(&str, Vec<u8>, &str)] = &[
        (
            "action not utf-8",
            event_with(Wire::new().bytes(6, b"doc\xff\xfe.put")).encode().to_vec(),
            "event.action",
        ),
        (
            "actor id not utf-8",
            event_with(Wire::new().message(5, &Wire::new().bytes(1, b"user").bytes(2, b"\xc3\x28")))
                .encode()
                .to_vec(),
            "event.actor.id",
        ),
        // A varint where the event message is expected.
        ("wrong wire type", Wire::new().varint_field(1, 7).encode().to_vec(), "invalid request: event: "),
        // Not protobuf at all: a field header that promises more than there is.
        ("truncated", vec![0x0a, 0xff, 0x01, 0x00], "request"),
    ];
    for (what, body, field) in cases {
        let r = unary(f.app.addr, APPEND, body, &[]).await;
        let s = r.expect_err(what);
        assert_eq!(s.code(), Code::InvalidArgument, "{what}: {s:?}");
        assert!(s.message().contains(field), "{what}: {s:?}");
    }
    assert_eq!(rows(&f).await, 0);
}

#[tokio::test]
async fn empty_oversize_and_huge_requests_are_invalid_argument_naming_the_field() {
    let mut f = Fixture::new().await;
    let c = &mut f.client;
    assert_invalid(c.append(AppendRequest::default()).await, "event");
    assert_invalid(append(c, AuditEvent::default(), "k-empty").await, "event.action");
    let mut long = event("u-1", "document.put");
    long.action = "a".repeat(100_000);
    assert_invalid(append(c, long, "k-long").await, "event.action");
    // 100,000 metadata fields (about 1.3 MB): refused by the service's limits.
    let number = |i: i32| prost_types::Value { kind: Some(prost_types::value::Kind::NumberValue(i.into())) };
    let fields = (0..100_000).map(|i| (format!("k{i}"), number(i))).collect();
    let mut huge = event("u-1", "document.put");
    huge.metadata = Some(prost_types::Struct { fields });
    assert_invalid(append(c, huge, "k-huge").await, "event.metadata");
    let filter = EventFilter { actor_id: "x".repeat(10_000), ..Default::default() };
    assert_invalid(
        c.query(QueryRequest { filter: Some(filter), page_size: 10, page_token: String::new() }).await,
        "filter.actor_id",
    );
    assert_invalid(
        c.query(QueryRequest {
            filter: None,
            page_size: 10,
            page_token: "'; drop table audit_events; --".into(),
        })
        .await,
        "page_token",
    );
    assert_eq!(rows(&f).await, 0);
}

#[tokio::test]
async fn injection_strings_are_stored_as_text_and_change_nothing_else() {
    let mut f = Fixture::new().await;
    let sql = "x'); delete from audit_events; --";
    let json = r#"{"$where":"1==1","__proto__":{"admin":true}}"#;
    let mut e = event(sql, "document.put");
    e.resource.as_mut().unwrap().id = json.into();
    let first = append(&mut f.client, event("u-0", "document.put"), "k-0").await.unwrap();
    let r = append(&mut f.client, e, "k-1").await;
    match r {
        Ok(_) => {
            let mut owner = f.owner().await;
            let (actor, resource): (String, String) =
                sqlx::query_as("select actor_id, resource_id from audit_events where sequence = $1")
                    .bind(first.sequence as i64 + 1)
                    .fetch_one(&mut owner)
                    .await
                    .unwrap();
            assert_eq!((actor.as_str(), resource.as_str()), (sql, json));
            assert_eq!(rows(&f).await, 2);
        }
        Err(s) => {
            assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
            assert_eq!(rows(&f).await, 1);
        }
    }
}

#[tokio::test]
async fn a_deadline_already_past_appends_nothing() {
    let mut f = Fixture::new().await;
    let body =
        AppendRequest { event: Some(event("u-late", "document.put")), idempotency_key: "k-late".into() };
    for timeout in ["0n", "0m", "0S"] {
        let r = unary(f.app.addr, APPEND, &body.encode_to_vec(), &[("grpc-timeout", timeout)]).await;
        let s = r.expect_err("no time to append");
        assert_eq!(s.code(), Code::DeadlineExceeded, "{timeout}: {s:?}");
    }
    // Nothing was handed on to be committed later either: appends commit in
    // order, so once a later one is acknowledged an earlier one would show.
    append(&mut f.client, event("u-on-time", "document.put"), "k-on-time").await.unwrap();
    assert_eq!(rows(&f).await, 1);
}

//! Bad input, whatever layer rejects it (tonic's decoder or the service's
//! validation): a clear INVALID_ARGUMENT naming the field (or
//! DEADLINE_EXCEEDED for a deadline already past), and nothing written,
//! nothing audited.

use mesh_proto::data::{
    BatchOperation, BatchRequest, DeleteOperation, GetRequest, PutRequest, QueryRequest, batch_operation::Op,
};
use mesh_testkit::raw::{Wire, unary};
use prost::Message as _;
use serde_json::json;
use tonic::Code;
use tonic_types::StatusExt as _;

use crate::helpers::{Fixture, doc};

const PUT: &str = "/mesh.data.v1.DataService/Put";

fn assert_invalid(s: &tonic::Status, field: &str) {
    assert_eq!(s.code(), Code::InvalidArgument, "{field}: {s:?}");
    assert!(s.message().starts_with("invalid request: "), "{s:?}");
    let bad = s.get_details_bad_request().expect("field violations");
    assert!(bad.field_violations.iter().any(|v| v.field.starts_with(field)), "{field}: {bad:?}");
}

fn put(key: &str, d: serde_json::Value) -> PutRequest {
    PutRequest { collection: "bad".into(), key: key.into(), document: Some(doc(d)), expected_version: None }
}

/// Nothing stored under `key` and nothing audited about it.
async fn untouched(f: &Fixture, key: &str) {
    let get = GetRequest { collection: "bad".into(), key: key.into(), consistency_token: String::new() };
    assert_eq!(f.c.get(get).await.unwrap_err().code(), Code::NotFound, "{key}");
    assert!(f.mesh.audit_events(&format!("bad/{key}")).await.is_empty(), "{key}");
}

#[tokio::test]
async fn undecodable_requests_are_invalid_argument_naming_the_field() {
    let f = Fixture::new("bad-input-raw").await;
    let bearer = format!("Bearer {}", f.token);
    let auth = [("authorization", bearer.as_str())];
    let valid = put("k-raw", json!({"a": 1})).encode_to_vec();
    let with = |extra: Wire| [valid.as_slice(), extra.encode()].concat();
    let cases: &[(&str, Vec<u8>, &str)] = &[
        ("collection not utf-8", with(Wire::new().bytes(1, b"bad\xff")), "collection"),
        ("key not utf-8", with(Wire::new().bytes(2, b"k-raw\xc3")), "key"),
        (
            "document nested 45 deep",
            with(Wire::new().message(3, &Wire::nested_struct("k", 45))),
            "document.fields",
        ),
        // A string where the document message is expected.
        ("wrong type", with(Wire::new().bytes(3, br#"{"a": 1}"#)), "document"),
    ];
    for (what, body, field) in cases {
        let s = unary(f.app.addr, PUT, body, &auth).await.expect_err(what);
        assert_invalid(&s, field);
    }
    untouched(&f, "k-raw").await;
}

#[tokio::test]
async fn empty_oversize_and_huge_requests_change_nothing() {
    let f = Fixture::new("bad-input-huge").await;
    assert_invalid(&f.c.put(PutRequest::default()).await.unwrap_err(), "collection");
    assert_invalid(&f.c.put(put(&"k".repeat(100_000), json!({}))).await.unwrap_err(), "key");
    let s = f.c.put(put("k-big", json!({"v": "x".repeat(5 << 20)}))).await.unwrap_err();
    assert!(matches!(s.code(), Code::InvalidArgument | Code::OutOfRange | Code::ResourceExhausted), "{s:?}");
    let ops = (0..100_000)
        .map(|i| BatchOperation {
            op: Some(Op::Delete(DeleteOperation {
                collection: "bad".into(),
                key: format!("k{i}"),
                expected_version: None,
            })),
        })
        .collect();
    assert_invalid(&f.c.batch(BatchRequest { ops }).await.unwrap_err(), "ops");
    let filter = doc(json!({"f": "x".repeat(2 << 20)}));
    let q =
        QueryRequest { collection: "bad".into(), filter: Some(filter), page_size: 10, ..Default::default() };
    assert_invalid(&f.c.query(q).await.unwrap_err(), "filter");
    for key in ["k-big", "k0", "k99999"] {
        untouched(&f, key).await;
    }
}

#[tokio::test]
async fn injection_strings_are_stored_and_matched_as_data() {
    let f = Fixture::new("bad-input-injection").await;
    f.c.put(put("plain", json!({"owner": "alice"}))).await.unwrap();
    let key = "k'); delete from documents; --";
    let evil = json!({"owner": "') or 1=1 --", "$where": "this.a == 1", "__proto__": {"admin": true}});
    f.c.put(put(key, evil.clone())).await.unwrap();
    let got =
        f.c.get(GetRequest { collection: "bad".into(), key: key.into(), consistency_token: String::new() });
    assert_eq!(got.await.unwrap().document, Some(doc(evil)));
    // A filter made of injection strings matches only what holds them as values.
    for filter in [json!({"owner": "') or 1=1 --"}), json!({"owner": {"$ne": null}})] {
        let q = QueryRequest {
            collection: "bad".into(),
            filter: Some(doc(filter.clone())),
            page_size: 10,
            ..Default::default()
        };
        let keys: Vec<String> = f.c.query(q).await.unwrap().documents.into_iter().map(|d| d.key).collect();
        let want: &[&str] = if filter["owner"].is_string() { &[key] } else { &[] };
        assert_eq!(keys, want, "{filter}");
    }
    let q = QueryRequest { collection: "bad".into(), page_token: "' or 1=1 --".into(), ..Default::default() };
    assert_invalid(&f.c.query(q).await.unwrap_err(), "page_token");
    let g =
        GetRequest { collection: "bad".into(), key: "plain".into(), consistency_token: "0/0'; --".into() };
    assert_invalid(&f.c.get(g).await.unwrap_err(), "consistency_token");
}

#[tokio::test]
async fn a_deadline_already_past_writes_nothing() {
    let f = Fixture::new("bad-input-late").await;
    let bearer = format!("Bearer {}", f.token);
    let body = put("k-late", json!({"a": 1})).encode_to_vec();
    for timeout in ["0n", "0m", "0S"] {
        let headers = [("authorization", bearer.as_str()), ("grpc-timeout", timeout)];
        let s = unary(f.app.addr, PUT, &body, &headers).await.expect_err(timeout);
        assert_eq!(s.code(), Code::DeadlineExceeded, "{timeout}: {s:?}");
    }
    untouched(&f, "k-late").await;
}

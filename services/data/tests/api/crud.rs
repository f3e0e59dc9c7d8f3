//! Documents, versions and preconditions, batches all-or-nothing, and bad
//! input refused with nothing written — through the whole mesh.

use mesh_proto::data::{
    BatchOperation, BatchRequest, DeleteOperation, DeleteRequest, GetRequest, PutOperation, PutRequest,
    batch_operation::Op,
};
use serde_json::json;
use tonic::Code;
use tonic_types::StatusExt;

use crate::helpers::{Fixture, doc};

fn put(collection: &str, key: &str, d: serde_json::Value, expected: Option<u64>) -> PutRequest {
    PutRequest {
        collection: collection.into(),
        key: key.into(),
        document: Some(doc(d)),
        expected_version: expected,
    }
}

fn get(collection: &str, key: &str, token: &str) -> GetRequest {
    GetRequest { collection: collection.into(), key: key.into(), consistency_token: token.into() }
}

fn batch_put(collection: &str, key: &str, d: serde_json::Value, expected: Option<u64>) -> BatchOperation {
    BatchOperation {
        op: Some(Op::Put(PutOperation {
            collection: collection.into(),
            key: key.into(),
            document: Some(doc(d)),
            expected_version: expected,
        })),
    }
}

fn batch_delete(collection: &str, key: &str, expected: Option<u64>) -> BatchOperation {
    BatchOperation {
        op: Some(Op::Delete(DeleteOperation {
            collection: collection.into(),
            key: key.into(),
            expected_version: expected,
        })),
    }
}

#[tokio::test]
async fn documents_are_versioned_and_preconditions_hold() {
    let _t = mesh_testkit::init_telemetry();
    let f = Fixture::new("alice").await;
    let c = &f.c;

    // Create: version 1; "must not exist" now fails, naming both sides.
    let v1 = c.put(put("orders", "o-1", json!({"status": "open", "n": 1}), Some(0))).await.unwrap();
    assert_eq!(v1.version, 1);
    let s = c.put(put("orders", "o-1", json!({"status": "x"}), Some(0))).await.unwrap_err();
    assert_eq!(s.code(), Code::Aborted, "{}", s.message());
    assert_eq!(
        s.message(),
        "version conflict on orders/o-1: expected no document (expected_version 0), it is at version 1"
    );
    let info = s.get_details_error_info().expect("ErrorInfo");
    assert_eq!((info.reason.as_str(), info.metadata["actual_version"].as_str()), ("VERSION_MISMATCH", "1"));

    // Conditional and unconditional updates bump the version by one.
    let v2 = c.put(put("orders", "o-1", json!({"status": "paid"}), Some(1))).await.unwrap();
    assert_eq!(v2.version, 2);
    let s = c.put(put("orders", "o-1", json!({"status": "lost"}), Some(1))).await.unwrap_err();
    assert_eq!(s.code(), Code::Aborted);
    assert!(s.message().ends_with("expected version 1, it is at version 2"), "{}", s.message());
    let v3 = c.put(put("orders", "o-1", json!({"status": "shipped"}), None)).await.unwrap();
    assert_eq!(v3.version, 3);
    let got = c.get(get("orders", "o-1", &v3.consistency_token)).await.unwrap();
    assert_eq!((got.version, got.document), (3, Some(doc(json!({"status": "shipped"})))));
    assert!(got.updated_at.is_some());

    // Missing documents: NOT_FOUND on Get, ABORTED for an expected version.
    let s = c.get(get("orders", "nope", "")).await.unwrap_err();
    assert_eq!((s.code(), s.message()), (Code::NotFound, "document orders/nope not found"));
    let s = c.put(put("orders", "nope", json!({}), Some(4))).await.unwrap_err();
    assert!(s.message().ends_with("expected version 4, the document does not exist"), "{}", s.message());

    // Delete with a stale version fails; with the right one it goes, once.
    let del = |expected| DeleteRequest {
        collection: "orders".into(),
        key: "o-1".into(),
        expected_version: expected,
    };
    assert_eq!(c.delete(del(Some(2))).await.unwrap_err().code(), Code::Aborted);
    let gone = c.delete(del(Some(3))).await.unwrap();
    assert!(gone.existed);
    let s = c.get(get("orders", "o-1", &gone.consistency_token)).await.unwrap_err();
    assert_eq!(s.code(), Code::NotFound);
    // Deleting what is not there changes nothing (and says so).
    assert!(!c.delete(del(None)).await.unwrap().existed);
    // Created again, it starts over at version 1.
    assert_eq!(c.put(put("orders", "o-1", json!({}), Some(0))).await.unwrap().version, 1);

    assert_eq!(f.metric("mesh_data_writes_total", &["op=\"put\""]).await, 4.0);
    assert_eq!(f.metric("mesh_data_writes_total", &["op=\"delete\""]).await, 1.0);
    assert_eq!(f.metric("mesh_data_version_conflicts_total", &[]).await, 4.0);
}

#[tokio::test]
async fn a_batch_is_all_or_nothing_and_names_the_operation_that_failed() {
    let _t = mesh_testkit::init_telemetry();
    let f = Fixture::new("bob").await;
    let c = &f.c;
    c.put(put("inv", "a", json!({"qty": 1}), None)).await.unwrap();
    c.put(put("inv", "b", json!({"qty": 2}), None)).await.unwrap();

    // The third operation's precondition fails: the first two are undone.
    let s = c
        .batch(BatchRequest {
            ops: vec![
                batch_put("inv", "a", json!({"qty": 10}), Some(1)),
                batch_put("inv", "new", json!({"qty": 0}), Some(0)),
                batch_delete("inv", "b", Some(7)),
            ],
        })
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::Aborted);
    assert_eq!(s.message(), "version conflict on ops[2] (inv/b): expected version 7, it is at version 1");
    assert_eq!(s.get_details_error_info().unwrap().metadata["op_index"], "2");
    let a = c.get(get("inv", "a", "")).await.unwrap();
    assert_eq!((a.version, a.document), (1, Some(doc(json!({"qty": 1})))));
    assert_eq!(c.get(get("inv", "new", "")).await.unwrap_err().code(), Code::NotFound);

    // The same batch with the right versions applies in order; an operation
    // sees the ones before it (here: a put after a put of the same key).
    let ok = c
        .batch(BatchRequest {
            ops: vec![
                batch_put("inv", "a", json!({"qty": 10}), Some(1)),
                batch_put("inv", "new", json!({"qty": 0}), Some(0)),
                batch_delete("inv", "b", Some(1)),
                batch_put("inv", "a", json!({"qty": 11}), Some(2)),
                batch_delete("inv", "never", None),
            ],
        })
        .await
        .unwrap();
    let versions: Vec<(u64, bool)> = ok.results.iter().map(|r| (r.version, r.existed)).collect();
    assert_eq!(versions, [(2, false), (1, false), (0, true), (3, false), (0, false)]);
    let a = c.get(get("inv", "a", &ok.consistency_token)).await.unwrap();
    assert_eq!((a.version, a.document), (3, Some(doc(json!({"qty": 11})))));
    assert_eq!(c.get(get("inv", "b", &ok.consistency_token)).await.unwrap_err().code(), Code::NotFound);
}

#[tokio::test]
async fn bad_input_is_refused_with_its_fields_and_nothing_is_written() {
    let _t = mesh_testkit::init_telemetry();
    let f = Fixture::with_rules("carol", crate::helpers::OPEN_RULES, |c| c.data.max_batch_ops = 3).await;
    let c = &f.c;
    c.put(put("kv", "keep", json!({"v": 1}), None)).await.unwrap();

    let fields = |s: tonic::Status| -> Vec<String> {
        assert_eq!(s.code(), Code::InvalidArgument, "{}", s.message());
        assert!(s.message().starts_with(char::is_lowercase), "messages start lowercase: {}", s.message());
        s.get_details_bad_request()
            .expect("BadRequest")
            .field_violations
            .into_iter()
            .map(|v| v.field)
            .collect()
    };
    let long = "k".repeat(257);
    let s = c.put(PutRequest {
        collection: String::new(),
        key: long.clone(),
        document: None,
        expected_version: None,
    });
    assert_eq!(fields(s.await.unwrap_err()), ["collection", "key", "document"]);
    let s = c.put(put("a/b", "k", json!({}), None)).await.unwrap_err();
    assert_eq!(fields(s), ["collection"]);
    let big = json!({"s": "x".repeat(mesh_data::MAX_DOCUMENT_BYTES)});
    assert_eq!(fields(c.put(put("kv", "big", big, None)).await.unwrap_err()), ["document"]);
    let nul = json!({"a": {"b": ["ok", "bad\u{0}"]}});
    assert_eq!(fields(c.put(put("kv", "nul", nul.clone(), None)).await.unwrap_err()), ["document.a.b[1]"]);

    // A batch with one bad document is refused whole; nothing else is harmed.
    let s = c
        .batch(BatchRequest {
            ops: vec![batch_put("kv", "keep", json!({"v": 2}), None), batch_put("kv", "nul", nul, None)],
        })
        .await
        .unwrap_err();
    assert_eq!(fields(s), ["ops[1].put.document.a.b[1]"]);
    let s = c.batch(BatchRequest { ops: vec![batch_delete("kv", "keep", None); 4] }).await.unwrap_err();
    assert_eq!(fields(s), ["ops"]);
    let s = c.batch(BatchRequest { ops: vec![BatchOperation { op: None }] }).await.unwrap_err();
    assert_eq!(fields(s), ["ops[0]"]);
    let s = c.get(GetRequest { collection: "kv".into(), key: "keep".into(), consistency_token: "x".into() });
    assert_eq!(fields(s.await.unwrap_err()), ["consistency_token"]);

    let keep = c.get(get("kv", "keep", "")).await.unwrap();
    assert_eq!((keep.version, keep.document), (1, Some(doc(json!({"v": 1})))));
    for key in ["big", "nul"] {
        assert_eq!(c.get(get("kv", key, "")).await.unwrap_err().code(), Code::NotFound);
    }
    assert_eq!(f.metric("mesh_data_writes_total", &["op=\"put\""]).await, 1.0);
    f.app.stop().await.unwrap();
}

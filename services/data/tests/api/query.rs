//! Query: JSON containment, keyset pages in key order, page tokens bound to
//! their query, defaults and caps.

use mesh_proto::data::{BatchOperation, BatchRequest, PutOperation, QueryRequest, batch_operation::Op};
use serde_json::json;
use tonic::Code;
use tonic_types::StatusExt;

use crate::helpers::{Fixture, doc};

#[tokio::test]
async fn pages_walk_the_matches_in_key_order_with_tokens_bound_to_the_query() {
    let _t = mesh_testkit::init_telemetry();
    let f = Fixture::new("frank").await;
    let c = &f.c;
    let ops = (0..1200)
        .map(|i| {
            let status = if i % 3 == 0 { "open" } else { "done" };
            BatchOperation {
                op: Some(Op::Put(PutOperation {
                    collection: "tickets".into(),
                    key: format!("t{i:05}"),
                    document: Some(doc(
                        json!({"status": status, "tags": ["x", format!("n{}", i % 7)], "n": i}),
                    )),
                    expected_version: None,
                })),
            }
        })
        .collect::<Vec<_>>();
    let mut token = String::new();
    for chunk in ops.chunks(400) {
        token = c.batch(BatchRequest { ops: chunk.to_vec() }).await.unwrap().consistency_token;
    }
    // Another collection with the same documents must not show up.
    c.batch(BatchRequest {
        ops: vec![BatchOperation {
            op: Some(Op::Put(PutOperation {
                collection: "other".into(),
                key: "t00000".into(),
                document: Some(doc(json!({"status": "open"}))),
                expected_version: None,
            })),
        }],
    })
    .await
    .unwrap();

    let query = |filter: serde_json::Value, page_size: u32, page_token: String| QueryRequest {
        collection: "tickets".into(),
        filter: Some(doc(filter)),
        page_size,
        page_token,
        consistency_token: token.clone(),
    };
    // Filter: status open (400 documents), pages of 150.
    let mut keys = Vec::new();
    let mut next = String::new();
    let mut pages = 0;
    loop {
        let p = c.query(query(json!({"status": "open"}), 150, next)).await.unwrap();
        pages += 1;
        assert!(p.documents.len() <= 150);
        keys.extend(p.documents.iter().map(|d| {
            assert_eq!(d.collection, "tickets");
            d.key.clone()
        }));
        if p.next_page_token.is_empty() {
            break;
        }
        next = p.next_page_token;
    }
    let want: Vec<String> = (0..1200).filter(|i| i % 3 == 0).map(|i| format!("t{i:05}")).collect();
    assert_eq!(keys, want);
    assert_eq!(pages, 3);

    // Containment reaches into arrays and combines conditions.
    let p = c.query(query(json!({"status": "open", "tags": ["n3"]}), 1000, String::new())).await.unwrap();
    let want: Vec<String> =
        (0..1200).filter(|i| i % 3 == 0 && i % 7 == 3).map(|i| format!("t{i:05}")).collect();
    assert_eq!(p.documents.iter().map(|d| d.key.clone()).collect::<Vec<_>>(), want);
    assert!(p.next_page_token.is_empty());

    // No filter: all 1200; default page 50; a page size over 1000 is coerced down.
    let p = c.query(QueryRequest { collection: "tickets".into(), ..Default::default() }).await.unwrap();
    assert_eq!(p.documents.len(), mesh_data::DEFAULT_PAGE_SIZE);
    let p = c
        .query(QueryRequest { collection: "tickets".into(), page_size: 5000, ..Default::default() })
        .await
        .unwrap();
    assert_eq!(p.documents.len(), mesh_data::MAX_PAGE_SIZE);
    assert!(!p.next_page_token.is_empty());

    // A token used with another filter, or garbage: INVALID_ARGUMENT.
    let first = c.query(query(json!({"status": "open"}), 10, String::new())).await.unwrap();
    for (filter, page_token) in [
        (json!({"status": "done"}), first.next_page_token.clone()),
        (json!({"status": "open"}), "bm90LWEtdG9rZW4".to_owned()),
        (json!({"status": "open"}), "%%%".to_owned()),
    ] {
        let s = c.query(query(filter, 10, page_token)).await.unwrap_err();
        assert_eq!(s.code(), Code::InvalidArgument, "{}", s.message());
        assert_eq!(s.get_details_bad_request().unwrap().field_violations[0].field, "page_token");
    }
    let s = c
        .query(QueryRequest {
            collection: "other".into(),
            page_token: first.next_page_token,
            filter: Some(doc(json!({"status": "open"}))),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument, "a token of another collection");
}

#[tokio::test]
async fn pages_of_large_documents_stay_under_the_message_limit() {
    let _t = mesh_testkit::init_telemetry();
    let f = Fixture::new("frank").await;
    let mut token = String::new();
    for i in 0..7 {
        let big = json!({"i": i, "blob": "x".repeat(900_000)});
        let put = mesh_proto::data::PutRequest {
            collection: "blobs".into(),
            key: format!("b{i}"),
            document: Some(doc(big)),
            expected_version: None,
        };
        token = f.c.put(put).await.unwrap().consistency_token;
    }
    // A client with gRPC's default 4 MiB decoding limit reads every page.
    let mut next = String::new();
    let mut pages = Vec::new();
    loop {
        let p =
            f.c.query(QueryRequest {
                collection: "blobs".into(),
                page_size: 100,
                page_token: next,
                consistency_token: token.clone(),
                ..Default::default()
            })
            .await
            .unwrap();
        pages.push(p.documents.iter().map(|d| d.key.clone()).collect::<Vec<_>>());
        if p.next_page_token.is_empty() {
            break;
        }
        next = p.next_page_token;
    }
    assert_eq!(pages, [vec!["b0", "b1", "b2"], vec!["b3", "b4", "b5"], vec!["b6"]]);
}

//! Metadata comes back exactly as appended, through PostgreSQL, by every
//! read (Query, Tail, Export) and Verify never raises a false alarm; a
//! damaged row is named, never an outage; chains hashed before hash
//! version 2 keep verifying.

use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use chrono::Utc;
use futures::StreamExt as _;
use mesh_audit::chain::{Event, GENESIS, HashVersion, Outcome};
use mesh_proto::audit::{
    AuditEvent, EventFilter, ExportRequest, QueryRequest, TailRequest, VerifyRequest,
    audit_service_client::AuditServiceClient,
};
use mesh_testkit::Infra;

use crate::helpers::cli;
use proptest::{
    prelude::*,
    test_runner::{Config as ProptestConfig, TestRunner},
};
use prost::Message as _;
use prost_types::{ListValue, Struct, Value, value::Kind};
use tonic::{Code, transport::Channel};

use crate::helpers::{Fixture, append, event, eventually, psql, superuser_url};

fn num(n: f64) -> Value {
    Value { kind: Some(Kind::NumberValue(n)) }
}

fn text(s: &str) -> Value {
    Value { kind: Some(Kind::StringValue(s.into())) }
}

/// The values, the extremes of binary64, unicode and escapes.
fn extremes() -> Struct {
    let fields = [
        ("a", num(123456789.12345679)),
        ("b", num(123456789012345678901.0)),
        ("max", num(f64::MAX)),
        ("min", num(-f64::MAX)),
        ("tiny", num(5e-324)),
        ("neg_tiny", num(-5e-324)),
        ("neg_zero", num(-0.0)),
        ("beyond_2_53", num(9_007_199_254_740_993.0)),
        ("third", num(1.0 / 3.0)),
        ("s \"é\"\n", text("\u{1F600}\\\"\u{1}\u{2028}")),
        (
            "nested",
            Value {
                kind: Some(Kind::ListValue(ListValue {
                    values: vec![num(0.1 + 0.2), Value { kind: Some(Kind::NullValue(0)) }, text("")],
                })),
            },
        ),
    ];
    Struct { fields: fields.into_iter().map(|(k, v)| (k.to_owned(), v)).collect() }
}

/// The event at `sequence`, from a replica or the primary.
async fn query_one(client: &AuditServiceClient<Channel>, resource_id: &str) -> AuditEvent {
    let filter = EventFilter { resource_id: resource_id.into(), ..Default::default() };
    eventually(Duration::from_secs(10), "the event is queryable", || {
        let mut c = client.clone();
        let filter = filter.clone();
        async move {
            let r = c.query(QueryRequest { filter: Some(filter), ..Default::default() }).await.unwrap();
            r.into_inner().events.pop()
        }
    })
    .await
}

/// The metadata of each exported line in `from..=to`, read back exactly.
async fn export_metadata(client: &mut AuditServiceClient<Channel>, from: u64, to: u64) -> Vec<Struct> {
    let req = ExportRequest { filter: None, from_sequence: from, to_sequence: to };
    let mut stream = client.export(req).await.unwrap().into_inner();
    let mut out = Vec::new();
    while let Some(chunk) = stream.next().await {
        for line in chunk.unwrap().lines.lines() {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            out.push(mesh_proto::json::from_json(v["metadata"].as_object().unwrap()));
        }
    }
    out
}

fn with_metadata(resource_id: &str, metadata: Struct) -> AuditEvent {
    let mut e = event("nums", "numbers.put");
    e.resource.as_mut().unwrap().id = resource_id.into();
    e.metadata = Some(metadata);
    e
}

#[tokio::test]
async fn metadata_round_trips_bit_for_bit_through_every_read_and_verifies() {
    let _t = mesh_testkit::init_telemetry();
    let mut f = Fixture::new().await;
    let sent = extremes();
    let ack = append(&mut f.client, with_metadata("r1", sent.clone()), "").await.unwrap();
    // an event after the extreme one: reads that reach past it still work
    append(&mut f.client, with_metadata("r2", Struct::default()), "").await.unwrap();
    let want = sent.encode_to_vec();

    let got = query_one(&f.client, "r1").await;
    assert_eq!(got.sequence, ack.sequence);
    assert_eq!(got.metadata.unwrap().encode_to_vec(), want, "Query returns the bits appended");
    let all = crate::helpers::query_all(&mut f.client, QueryRequest::default()).await;
    assert_eq!(all.len(), 2);

    let mut tail =
        f.client.tail(TailRequest { filter: None, after_sequence: Some(0) }).await.unwrap().into_inner();
    let first = tokio::time::timeout(Duration::from_secs(20), tail.next()).await.unwrap().unwrap().unwrap();
    assert_eq!(first.metadata.unwrap().encode_to_vec(), want, "Tail returns the bits appended");
    let second = tokio::time::timeout(Duration::from_secs(20), tail.next()).await.unwrap().unwrap().unwrap();
    assert_eq!(second.sequence, 2);

    let exported = export_metadata(&mut f.client, 0, 0).await;
    assert_eq!(exported.len(), 2);
    assert_eq!(exported[0].encode_to_vec(), want, "Export returns the bits appended");

    let v = f.client.verify(VerifyRequest::default()).await.unwrap().into_inner();
    assert!(v.ok && v.checked == 2, "{v:?}");
    let url = Infra::shared().pg_primary_url();
    let (code, out) = cli(&["verify", "--database-url", &url, "--schema", &f.db.schema]).await;
    assert_eq!(code, 0, "{out}");
}

#[tokio::test]
async fn a_damaged_row_is_named_by_reads_verify_and_the_cli_and_other_reads_go_on() {
    let _t = mesh_testkit::init_telemetry();
    let mut f = Fixture::new().await;
    for r in ["r1", "r2", "r3"] {
        append(&mut f.client, with_metadata(r, extremes()), "").await.unwrap();
    }
    let s = &f.db.schema;
    let (ok, err) = psql(
        &superuser_url(Infra::shared()),
        &format!(
            "set session_replication_role = replica; \
             update {s}.audit_events set metadata_pb = '\\xff' where sequence = 2; \
             update {s}.audit_events set metadata = '{{\"a\": 1}}' where sequence = 3"
        ),
    )
    .await;
    assert!(ok, "superuser tampering: {err}");

    // a read that reaches the row names it; one that does not is served
    let err = eventually(Duration::from_secs(10), "query reaches the damaged row", || {
        let mut c = f.client.clone();
        async move { c.query(QueryRequest::default()).await.err() }
    })
    .await;
    assert_eq!(err.code(), Code::DataLoss, "{err:?}");
    assert!(err.message().contains("event 2 cannot be read"), "{}", err.message());
    assert_eq!(query_one(&f.client, "r1").await.sequence, 1);
    let export_err = eventually(Duration::from_secs(10), "export reaches the damaged row", || {
        let mut c = f.client.clone();
        async move {
            let mut stream = c.export(ExportRequest::default()).await.unwrap().into_inner();
            while let Some(chunk) = stream.next().await {
                if let Err(e) = chunk {
                    return Some(e);
                }
            }
            None
        }
    })
    .await;
    assert_eq!(export_err.code(), Code::DataLoss, "{export_err:?}");
    assert!(export_err.message().contains("event 2"), "{export_err:?}");

    // Verify names it as a bad event, not an error of the call
    let v = verify_until_bad(&f, VerifyRequest::default()).await;
    assert_eq!((v.first_bad_sequence, v.checked), (Some(2), 1), "{v:?}");
    assert!(v.problem.contains("malformed"), "{}", v.problem);
    // the jsonb copy is checked against the hashed value too
    let v = verify_until_bad(&f, VerifyRequest { from_sequence: 3, to_sequence: 3 }).await;
    assert_eq!(v.first_bad_sequence, Some(3), "{v:?}");
    assert!(v.problem.contains("jsonb"), "{}", v.problem);

    let url = Infra::shared().pg_primary_url();
    let (code, out) = cli(&["verify", "--database-url", &url, "--schema", s]).await;
    assert_eq!(code, 1, "the documented tamper/invalid code, not 2: {out}");
    let report: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(report["first_bad_sequence"], 2);
}

/// Verify's answer once it sees the damage (it may read a replica a moment behind).
async fn verify_until_bad(f: &Fixture, req: VerifyRequest) -> mesh_proto::audit::VerifyResponse {
    eventually(Duration::from_secs(10), "verify reports the damage", || {
        let mut c = f.client.clone();
        async move {
            let v = c.verify(req).await.unwrap().into_inner();
            (!v.ok).then_some(v)
        }
    })
    .await
}

/// Old code's JSON: each number through `serde_json::Number::from_f64`
/// after folding -0 (what the service wrote to `jsonb` before version 2).
fn old_json(v: &Value) -> serde_json::Value {
    match &v.kind {
        None | Some(Kind::NullValue(_)) => serde_json::Value::Null,
        Some(Kind::BoolValue(b)) => serde_json::Value::Bool(*b),
        Some(Kind::NumberValue(n)) => {
            serde_json::Value::Number(serde_json::Number::from_f64(if *n == 0.0 { 0.0 } else { *n }).unwrap())
        }
        Some(Kind::StringValue(s)) => serde_json::Value::String(s.clone()),
        Some(Kind::ListValue(l)) => serde_json::Value::Array(l.values.iter().map(old_json).collect()),
        Some(Kind::StructValue(s)) => old_object(s),
    }
}

fn old_object(s: &Struct) -> serde_json::Value {
    serde_json::Value::Object(s.fields.iter().map(|(k, v)| (k.clone(), old_json(v))).collect())
}

#[tokio::test]
async fn events_hashed_before_version_2_keep_verifying_under_their_own_rule() {
    let _t = mesh_testkit::init_telemetry();
    let mut f = Fixture::new().await;
    let first = append(&mut f.client, with_metadata("r1", Struct::default()), "").await.unwrap();

    // event 2 written the way the service wrote events before migration 0002:
    // metadata only in jsonb, hash_version left to its default (1), -0 folded
    let mut metadata = extremes();
    metadata.fields.remove("neg_zero");
    let mut old = Event {
        version: HashVersion::V1,
        sequence: 2,
        id: uuid::Uuid::now_v7(),
        occurred_at: chrono::DateTime::from_timestamp_micros(Utc::now().timestamp_micros()).unwrap(),
        recorded_at: chrono::DateTime::from_timestamp_micros(Utc::now().timestamp_micros()).unwrap(),
        actor_type: "user".into(),
        actor_id: "old".into(),
        action: "numbers.put".into(),
        resource_type: "document".into(),
        resource_id: "r2".into(),
        outcome: Outcome::Success,
        source_ip: String::new(),
        source_user_agent: String::new(),
        source_service: "mesh-test".into(),
        request_id: String::new(),
        trace_id: String::new(),
        metadata: metadata.clone(),
        prev_hash: GENESIS,
        hash: GENESIS,
    };
    old.seal(first.hash.clone().try_into().unwrap());
    let mut owner = f.owner().await;
    sqlx::query(
        "insert into audit_events (sequence, id, occurred_at, recorded_at, actor_type, actor_id, action, \
           resource_type, resource_id, outcome, source_ip, source_user_agent, source_service, request_id, \
           trace_id, metadata, prev_hash, hash) \
         values ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, '', '', $11, '', '', $12::jsonb, $13, $14)",
    )
    .bind(2_i64)
    .bind(old.id)
    .bind(old.occurred_at)
    .bind(old.recorded_at)
    .bind(&old.actor_type)
    .bind(&old.actor_id)
    .bind(&old.action)
    .bind(&old.resource_type)
    .bind(&old.resource_id)
    .bind(1_i16)
    .bind(&old.source_service)
    .bind(old_object(&metadata).to_string())
    .bind(old.prev_hash.to_vec())
    .bind(old.hash.to_vec())
    .execute(&mut owner)
    .await
    .unwrap();
    sqlx::query("update audit_chain_head set next_sequence = 3, head_hash = $1, recorded_at = $2")
        .bind(old.hash.to_vec())
        .bind(old.recorded_at)
        .execute(&mut owner)
        .await
        .unwrap();
    let version: i16 = sqlx::query_scalar("select hash_version from audit_events where sequence = 2")
        .fetch_one(&mut owner)
        .await
        .unwrap();
    assert_eq!(version, 1);

    // the chain goes on from it with a version-2 event
    let third = append(&mut f.client, with_metadata("r3", extremes()), "").await.unwrap();
    assert_eq!(third.sequence, 3);

    let got = query_one(&f.client, "r2").await;
    assert_eq!(got.hash, old.hash.to_vec());
    assert_eq!(got.hash_version, 1, "an external verifier learns which rule applies");
    assert_eq!(query_one(&f.client, "r3").await.hash_version, 2);
    assert_eq!(
        got.metadata.unwrap().encode_to_vec(),
        metadata.encode_to_vec(),
        "v1 values read back exactly"
    );
    let v = f.client.verify(VerifyRequest::default()).await.unwrap().into_inner();
    assert!(v.ok && v.checked == 3, "{v:?}");

    // and offline, from an export
    let url = Infra::shared().pg_primary_url();
    let (code, out) = cli(&["export", "--database-url", &url, "--schema", &f.db.schema]).await;
    assert_eq!(code, 0);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    std::fs::write(&path, &out).unwrap();
    let (code, report) = cli(&["verify", "--file", path.to_str().unwrap()]).await;
    assert_eq!(code, 0, "{report}");
}

/// Any finite double, the extremes more often than chance would pick them.
fn any_number() -> impl Strategy<Value = f64> {
    prop_oneof![
        any::<u64>().prop_map(f64::from_bits).prop_filter("finite", |x| x.is_finite()),
        any::<i64>().prop_map(|i| i as f64),
        any::<u128>().prop_map(|i| i as f64),
        prop::sample::select(vec![
            0.0,
            -0.0,
            f64::MAX,
            -f64::MAX,
            5e-324,
            -5e-324,
            f64::MIN_POSITIVE,
            123456789.12345679,
            123456789012345678901.0,
            9_007_199_254_740_993.0,
            0.1,
        ]),
    ]
}

/// Strings with unicode, escapes and control characters (no U+0000, which
/// the service refuses).
fn any_text() -> impl Strategy<Value = String> {
    let chars = prop_oneof![
        any::<char>().prop_filter("not NUL", |c| *c != '\0'),
        prop::sample::select(vec![
            '"',
            '\\',
            '\n',
            '\t',
            '\u{1}',
            '\u{7f}',
            '\u{2028}',
            'é',
            '\u{1F600}',
            '/'
        ]),
    ];
    prop::collection::vec(chars, 0..8).prop_map(|cs| cs.into_iter().collect())
}

fn any_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Kind::NullValue(0)),
        any::<bool>().prop_map(Kind::BoolValue),
        any_number().prop_map(Kind::NumberValue),
        any_number().prop_map(Kind::NumberValue),
        any_text().prop_map(Kind::StringValue),
    ]
    .prop_map(|k| Value { kind: Some(k) });
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6)
                .prop_map(|values| Value { kind: Some(Kind::ListValue(ListValue { values })) }),
            prop::collection::btree_map(any_text(), inner, 0..6)
                .prop_map(|fields| Value { kind: Some(Kind::StructValue(Struct { fields })) }),
        ]
    })
}

fn any_metadata() -> impl Strategy<Value = Struct> {
    prop::collection::btree_map(any_text(), any_value(), 0..8).prop_map(|fields| Struct { fields })
}

/// Property: for random JSON-like Structs (full binary64 range, integers
/// beyond 2^53, -0, unicode, escapes, nesting), Append through the real
/// service and PostgreSQL, then Query and Export return the same bytes and
/// Verify is ok. 40 cases (a few seconds).
#[test]
fn random_metadata_round_trips_exactly_through_postgres() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let _t = rt.block_on(async { mesh_testkit::init_telemetry() });
    let f = rt.block_on(Fixture::new());
    let case = AtomicU64::new(0);
    let mut runner =
        TestRunner::new(ProptestConfig { cases: 40, failure_persistence: None, ..Default::default() });
    let result = runner.run(&any_metadata(), |metadata| {
        let n = case.fetch_add(1, Ordering::Relaxed);
        let mut client = f.client.clone();
        rt.block_on(async move {
            let resource = format!("case-{n}");
            let want = metadata.encode_to_vec();
            let ack = append(&mut client, with_metadata(&resource, metadata), "").await.unwrap();
            let got = query_one(&client, &resource).await;
            prop_assert_eq!(got.metadata.unwrap_or_default().encode_to_vec(), want.clone(), "query");
            let exported = export_metadata(&mut client, ack.sequence, ack.sequence).await;
            prop_assert_eq!(exported.len(), 1);
            prop_assert_eq!(exported[0].encode_to_vec(), want, "export");
            let v = client
                .verify(VerifyRequest { from_sequence: ack.sequence, to_sequence: ack.sequence })
                .await
                .unwrap()
                .into_inner();
            prop_assert!(v.ok, "{:?}", v);
            Ok(())
        })
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    let mut client = f.client.clone();
    let v = rt.block_on(client.verify(VerifyRequest::default())).unwrap().into_inner();
    assert!(v.ok && v.checked == case.load(Ordering::Relaxed), "{v:?}");
}

//! Every write and its audit record are atomic: committed together, and
//! delivered to the real audit service exactly once — also when the data
//! service is killed between commit and delivery, or between delivery and
//! forgetting the event.

use std::{collections::BTreeMap, net::SocketAddr, sync::Arc, time::Duration};

use futures::{StreamExt as _, stream};
use mesh_proto::{
    audit::{EventFilter, Outcome},
    data::{
        BatchOperation, BatchRequest, DeleteOperation, DeleteRequest, PutOperation, PutRequest,
        batch_operation::Op,
    },
};
use mesh_testkit::{Infra, Process, TestDb, free_addr};
use prost_types::value::Kind;
use serde_json::json;
use sqlx::Connection as _;
use tokio::sync::Mutex;

use crate::helpers::{Fixture, Mesh, OPEN_RULES, audit_events, client, doc, eventually, metric};

fn put(key: &str, v: i64) -> PutRequest {
    PutRequest {
        collection: "ledger".into(),
        key: key.into(),
        document: Some(doc(json!({"v": v}))),
        expected_version: None,
    }
}

fn meta(e: &mesh_proto::audit::AuditEvent, key: &str) -> Option<Kind> {
    e.metadata.as_ref()?.fields.get(key)?.kind.clone()
}

#[tokio::test]
async fn every_write_reaches_the_audit_log_once_with_who_what_and_which_call() {
    let _t = mesh_testkit::init_telemetry();
    // The sweep stays out of it: each event is delivered by its own write's
    // hand-off, once. (With the tests' usual 500 ms grace, a loaded machine
    // lets the sweep deliver an event a second time before its first Append
    // is acknowledged: at-least-once delivery, still one record in the log.)
    let f =
        Fixture::with_rules("mallory", OPEN_RULES, |c| c.data.outbox_grace = Duration::from_secs(60)).await;
    let mut req = f.c.authorize(put("a", 1));
    req.metadata_mut().insert("x-request-id", "req-put-a".parse().unwrap());
    f.c.raw().put(req).await.unwrap();
    f.c.put(put("a", 2)).await.unwrap();
    f.c.delete(DeleteRequest { collection: "ledger".into(), key: "a".into(), expected_version: Some(2) })
        .await
        .unwrap();
    // A delete of nothing changes nothing and records nothing.
    f.c.delete(DeleteRequest { collection: "ledger".into(), key: "a".into(), expected_version: None })
        .await
        .unwrap();
    f.c.batch(BatchRequest {
        ops: vec![
            BatchOperation {
                op: Some(Op::Put(PutOperation {
                    collection: "ledger".into(),
                    key: "b".into(),
                    document: Some(doc(json!({}))),
                    expected_version: Some(0),
                })),
            },
            BatchOperation {
                op: Some(Op::Delete(DeleteOperation {
                    collection: "ledger".into(),
                    key: "zzz".into(),
                    expected_version: None,
                })),
            },
        ],
    })
    .await
    .unwrap();
    // A refused write records nothing.
    f.c.put(PutRequest { expected_version: Some(9), ..put("b", 0) }).await.unwrap_err();

    let events = eventually(Duration::from_secs(20), "three events of ledger/a", || async {
        let e = f.mesh.audit_events("ledger/a").await;
        (e.len() >= 3).then_some(e)
    })
    .await;
    let actions: Vec<(&str, Option<Kind>)> =
        events.iter().map(|e| (e.action.as_str(), meta(e, "version"))).collect();
    assert_eq!(
        actions,
        [
            ("document.put", Some(Kind::NumberValue(1.0))),
            ("document.put", Some(Kind::NumberValue(2.0))),
            ("document.delete", Some(Kind::NumberValue(2.0))),
        ]
    );
    let first = &events[0];
    assert_eq!(first.actor.as_ref().unwrap().id, "mallory");
    assert_eq!(first.resource.as_ref().unwrap().r#type, "document");
    assert_eq!(first.outcome(), Outcome::Success);
    assert_eq!(first.source.as_ref().unwrap().service, mesh_data::SOURCE_SERVICE);
    assert_eq!(first.request_id, "req-put-a");
    assert_eq!(meta(first, "collection"), Some(Kind::StringValue("ledger".into())));
    assert!(matches!(meta(first, "session_id"), Some(Kind::StringValue(s)) if s.starts_with("ses_")));
    let b = eventually(Duration::from_secs(20), "the batch's event", || async {
        let e = f.mesh.audit_events("ledger/b").await;
        (!e.is_empty()).then_some(e)
    })
    .await;
    assert_eq!(b.len(), 1);
    assert_eq!(meta(&b[0], "batch_size"), Some(Kind::NumberValue(2.0)));
    assert!(f.mesh.audit_events("ledger/zzz").await.is_empty());
    // The outbox empties.
    eventually(Duration::from_secs(20), "the outbox is empty", || async {
        (outbox_rows(&f.db).await == 0).then_some(())
    })
    .await;
    assert_eq!(metric(&f.app, "mesh_data_audit_events_total", &["result=\"delivered\""]).await, 4.0);
}

async fn outbox_rows(db: &TestDb) -> i64 {
    let mut conn = sqlx::PgConnection::connect(&Infra::shared().pg_primary_url()).await.unwrap();
    sqlx::query_scalar(&format!("select count(*) from {}.audit_outbox", db.schema))
        .fetch_one(&mut conn)
        .await
        .unwrap()
}

async fn sql(db: &TestDb, statement: &str) {
    let mut conn = sqlx::PgConnection::connect(&Infra::shared().pg_primary_url()).await.unwrap();
    sqlx::query(&format!("set search_path = {}", db.schema)).execute(&mut conn).await.unwrap();
    sqlx::raw_sql(statement).execute(&mut conn).await.unwrap();
}

/// The data service as a real process, with `audit` as its audit service.
async fn start_data(mesh: &Mesh, db: &TestDb, audit: SocketAddr) -> (Process, SocketAddr) {
    let infra = Infra::shared();
    let addr = free_addr();
    let mut env = infra.env(&db.schema, "unused:");
    env.extend([
        ("MESH_LISTEN_ADDR".into(), addr.to_string()),
        ("MESH_METRICS_ADDR".into(), free_addr().to_string()),
        ("MESH_SESSION_ADDR".into(), mesh.session.addr.to_string()),
        ("MESH_RATELIMIT_ADDR".into(), mesh.ratelimit.addr.to_string()),
        ("MESH_AUDIT_ADDR".into(), audit.to_string()),
        ("MESH_DATABASE_MIN_CONNECTIONS".into(), "0".into()),
        ("MESH_DATA_OUTBOX_SWEEP_MS".into(), "200".into()),
        ("MESH_DATA_OUTBOX_GRACE_MS".into(), "300".into()),
        // A killed instance's claims run out soon.
        ("MESH_DATA_OUTBOX_LEASE_MS".into(), "1000".into()),
        ("MESH_DATA_AUDIT_TIMEOUT_MS".into(), "1000".into()),
        ("MESH_DATA_OUTBOX_RETRY_MAX_MS".into(), "1000".into()),
        ("MESH_CLIENT_BREAKER_OPEN_MS".into(), "200".into()),
        ("MESH_CLIENT_BREAKER_OPEN_MAX_MS".into(), "500".into()),
    ]);
    let process = Process::start(env!("CARGO_BIN_EXE_mesh-data"), &env).unwrap();
    mesh_testkit::conformance::assert_serving(addr, crate::helpers::SERVED, Duration::from_secs(30))
        .await
        .unwrap();
    (process, addr)
}

/// Keys of the audit events of `ledger` documents, with how often each appears.
async fn audited(mesh: &Mesh) -> BTreeMap<String, usize> {
    let filter = EventFilter { actor_id: "nina".into(), ..Default::default() };
    let mut out = BTreeMap::new();
    for e in audit_events(mesh.audit.addr, filter).await {
        *out.entry(e.resource.unwrap().id).or_insert(0) += 1;
    }
    out
}

#[tokio::test]
async fn a_kill_between_commit_and_delivery_loses_no_audit_record() {
    let _t = mesh_testkit::init_telemetry();
    let mesh = Mesh::start(OPEN_RULES).await;
    let db = TestDb::new(Infra::shared()).await.unwrap();
    // The first process cannot reach the audit service: every event stays
    // committed but undelivered when it is killed.
    let (first, addr) = start_data(&mesh, &db, free_addr()).await;
    let c = client(addr, &mesh.token("nina").await);
    for i in 0..20 {
        c.put(put(&format!("k{i:02}"), i)).await.unwrap();
    }
    assert_eq!(outbox_rows(&db).await, 20);
    first.kill().unwrap();

    // The next process (or any other instance) delivers them, once each.
    let (second, _) = start_data(&mesh, &db, mesh.audit.addr).await;
    let want: BTreeMap<String, usize> = (0..20).map(|i| (format!("ledger/k{i:02}"), 1)).collect();
    eventually(Duration::from_secs(30), "every event delivered", || async {
        (audited(&mesh).await == want && outbox_rows(&db).await == 0).then_some(())
    })
    .await;
    drop(second);
}

#[tokio::test]
async fn a_kill_between_delivery_and_acknowledgement_duplicates_no_audit_record() {
    let _t = mesh_testkit::init_telemetry();
    let mesh = Mesh::start(OPEN_RULES).await;
    let db = TestDb::new(Infra::shared()).await.unwrap();
    let (first, addr) = start_data(&mesh, &db, mesh.audit.addr).await;
    // Delivered events cannot be forgotten: the process dies with all of
    // them delivered and still in its outbox.
    sql(
        &db,
        "create function keep() returns trigger language plpgsql as $$ begin raise exception 'kept'; end $$;
         create trigger keep before delete on audit_outbox for each statement execute function keep();",
    )
    .await;
    let c = client(addr, &mesh.token("nina").await);
    for i in 0..20 {
        c.put(put(&format!("k{i:02}"), i)).await.unwrap();
    }
    let want: BTreeMap<String, usize> = (0..20).map(|i| (format!("ledger/k{i:02}"), 1)).collect();
    eventually(Duration::from_secs(30), "every event delivered", || async {
        (audited(&mesh).await == want).then_some(())
    })
    .await;
    assert_eq!(outbox_rows(&db).await, 20);
    first.kill().unwrap();
    sql(&db, "drop trigger keep on audit_outbox").await;

    // The next process delivers them all again; the audit log keeps one of each.
    let (second, _) = start_data(&mesh, &db, mesh.audit.addr).await;
    eventually(Duration::from_secs(30), "the outbox is empty again", || async {
        (outbox_rows(&db).await == 0).then_some(())
    })
    .await;
    assert_eq!(audited(&mesh).await, want);
    drop(second);
}

#[tokio::test]
async fn a_crash_under_load_keeps_writes_and_audit_records_one_to_one() {
    let _t = mesh_testkit::init_telemetry();
    let mesh = Mesh::start(OPEN_RULES).await;
    let db = TestDb::new(Infra::shared()).await.unwrap();
    let (first, addr) = start_data(&mesh, &db, mesh.audit.addr).await;
    let c = client(addr, &mesh.token("nina").await);
    let acked = Arc::new(Mutex::new(Vec::new()));
    let writers = {
        let acked = acked.clone();
        tokio::spawn(async move {
            stream::iter(0..100_000)
                .map(|i| {
                    let (c, acked) = (c.clone(), acked.clone());
                    async move {
                        let key = format!("w{i:06}");
                        if c.put(put(&key, i)).await.is_ok() {
                            acked.lock().await.push(format!("ledger/{key}"));
                        }
                    }
                })
                .buffer_unordered(16)
                .collect::<Vec<()>>()
                .await
        })
    };
    eventually(Duration::from_secs(30), "writes under way", || async {
        (acked.lock().await.len() >= 300).then_some(())
    })
    .await;
    first.kill().unwrap();
    // Calls in flight at the kill are neither acknowledged nor counted; they
    // may or may not have committed, which the check below allows for.
    writers.abort();
    let acked = acked.lock().await.clone();

    let (second, _) = start_data(&mesh, &db, mesh.audit.addr).await;
    eventually(Duration::from_secs(60), "the outbox drains", || async {
        (outbox_rows(&db).await == 0).then_some(())
    })
    .await;
    // What is in the collection (acknowledged or not) and what the audit
    // log says happened are the same set, once each.
    let mut conn = sqlx::PgConnection::connect(&Infra::shared().pg_primary_url()).await.unwrap();
    let stored: Vec<String> = sqlx::query_scalar(&format!(
        "select 'ledger/' || key from {}.documents where collection = 'ledger' order by key",
        db.schema
    ))
    .fetch_all(&mut conn)
    .await
    .unwrap();
    let audited = audited(&mesh).await;
    let duplicated: Vec<_> = audited.iter().filter(|(_, n)| **n > 1).collect();
    assert!(duplicated.is_empty(), "duplicated audit records: {duplicated:?}");
    assert_eq!(audited.keys().cloned().collect::<Vec<_>>(), stored, "writes and audit records differ");
    let lost: Vec<_> = acked.iter().filter(|k| !audited.contains_key(*k)).collect();
    assert!(lost.is_empty(), "acknowledged writes without their record: {lost:?}");
    eprintln!("{} acknowledged, {} stored and audited", acked.len(), stored.len());
    drop(second);
}

//! Append-only storage: privileges, triggers, tampering caught by Verify
//! (RPC and command line), monthly partitions and retention.

use std::time::Duration;

use chrono::{TimeZone as _, Utc};
use mesh_audit::{Clock, ManualClock};
use mesh_proto::audit::VerifyRequest;
use mesh_testkit::{Infra, Process};
use tonic::Code;

use crate::helpers::{Fixture, append, cli, event, eventually, psql, superuser_url};

async fn append_n(f: &mut Fixture, n: usize, action: &str) {
    for i in 0..n {
        append(&mut f.client, event(&format!("u{i}"), action), "").await.unwrap();
    }
}

#[tokio::test]
async fn update_delete_and_truncate_fail_for_the_owner_and_the_service_role() {
    let _t = mesh_testkit::init_telemetry();
    let mut f = Fixture::new().await;
    append_n(&mut f, 3, "doc.read").await;
    let infra = Infra::shared();
    let s = &f.db.schema;
    let owner = infra.pg_primary_url();
    let writer = format!("{owner}?options=-c%20role%3Dmesh_audit_writer");
    for sql in [
        format!("update {s}.audit_events set action = 'forged' where sequence = 2"),
        format!("delete from {s}.audit_events where sequence = 2"),
        format!("truncate {s}.audit_events"),
        format!("truncate {}", partition_of(&f, 2).await),
    ] {
        let (ok, err) = psql(&owner, &sql).await;
        assert!(!ok && err.contains("append-only"), "owner: {sql}: {err}");
        let (ok, err) = psql(&writer, &sql).await;
        assert!(!ok && err.contains("permission denied"), "writer: {sql}: {err}");
    }
    // the writer cannot drop partitions through retention either
    let (ok, err) = psql(&writer, &format!("select {s}.audit_drop_partitions_before(now())")).await;
    assert!(!ok && err.contains("permission denied"), "{err}");
    let v = f.client.verify(VerifyRequest::default()).await.unwrap().into_inner();
    assert!(v.ok && v.checked == 3, "{v:?}");
}

/// Verify of the whole chain once it fails: the tampering was done on the
/// primary and Verify may read a replica a moment behind it.
async fn broken(f: &Fixture) -> mesh_proto::audit::VerifyResponse {
    eventually(Duration::from_secs(10), "verify reports the damage", || {
        let mut c = f.client.clone();
        async move {
            let v = c.verify(VerifyRequest::default()).await.unwrap().into_inner();
            (!v.ok).then_some(v)
        }
    })
    .await
}

async fn partition_of(f: &Fixture, sequence: i64) -> String {
    let mut owner = f.owner().await;
    let name: String = sqlx::query_scalar(&format!(
        "select tableoid::regclass::text from {}.audit_events where sequence = $1",
        f.db.schema
    ))
    .bind(sequence)
    .fetch_one(&mut owner)
    .await
    .unwrap();
    if name.contains('.') { name } else { format!("{}.{name}", f.db.schema) }
}

#[tokio::test]
async fn a_row_altered_with_triggers_disabled_is_caught_by_verify() {
    let _t = mesh_testkit::init_telemetry();
    let mut f = Fixture::new().await;
    append_n(&mut f, 10, "doc.read").await;
    let s = &f.db.schema;
    let (ok, err) = psql(
        &superuser_url(Infra::shared()),
        &format!(
            "set session_replication_role = replica; \
             update {s}.audit_events set outcome = 3, metadata = '{{\"note\": \"edited\"}}' where sequence = 7"
        ),
    )
    .await;
    assert!(ok, "superuser tampering: {err}");

    let v = broken(&f).await;
    assert_eq!(v.first_bad_sequence, Some(7));
    assert_eq!(v.checked, 6);
    assert!(v.problem.contains("hash"), "{}", v.problem);
    // a range before the damage is fine
    let v = f.client.verify(VerifyRequest { from_sequence: 2, to_sequence: 6 }).await.unwrap().into_inner();
    assert!(v.ok && v.checked == 5, "{v:?}");

    // offline, against the database URL
    let url = Infra::shared().pg_primary_url();
    let (code, out) = cli(&["verify", "--database-url", &url, "--schema", s]).await;
    assert_eq!(code, 1, "{out}");
    let report: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(report["first_bad_sequence"], 7);
    let (code, out) = cli(&["verify", "--database-url", &url, "--schema", s, "--to", "6"]).await;
    assert_eq!(code, 0, "{out}");
}

#[tokio::test]
async fn deleted_rows_are_caught_in_the_middle_and_at_the_head() {
    let _t = mesh_testkit::init_telemetry();
    let mut f = Fixture::new().await;
    append_n(&mut f, 6, "doc.read").await;
    let s = &f.db.schema;
    let su = superuser_url(Infra::shared());
    let delete = |seq: u64| {
        format!("set session_replication_role = replica; delete from {s}.audit_events where sequence = {seq}")
    };

    // the newest event removed: the chain head still remembers it
    let (ok, err) = psql(&su, &delete(6)).await;
    assert!(ok, "{err}");
    let v = broken(&f).await;
    assert_eq!((v.first_bad_sequence, v.checked), (Some(6), 5), "{v:?}");
    assert!(v.problem.contains("missing"), "{}", v.problem);

    let (ok, err) = psql(&su, &delete(3)).await;
    assert!(ok, "{err}");
    let v = eventually(Duration::from_secs(10), "verify sees the second deletion", || {
        let mut c = f.client.clone();
        async move {
            let v = c.verify(VerifyRequest::default()).await.unwrap().into_inner();
            (v.first_bad_sequence == Some(3)).then_some(v)
        }
    })
    .await;
    assert_eq!((v.ok, v.checked), (false, 2), "{v:?}");
}

#[tokio::test]
async fn retention_drops_whole_months_and_verify_anchors_on_the_checkpoint() {
    let _t = mesh_testkit::init_telemetry();
    let clock = ManualClock::new(Utc.with_ymd_and_hms(2024, 1, 10, 12, 0, 0).unwrap());
    let mut f = Fixture::with(|c| c.audit.clock = Clock::Manual(clock.clone())).await;
    append_n(&mut f, 4, "jan").await; // 1..=4
    clock.set(Utc.with_ymd_and_hms(2024, 2, 10, 12, 0, 0).unwrap());
    append_n(&mut f, 3, "feb").await; // 5..=7
    clock.set(Utc.with_ymd_and_hms(2024, 3, 10, 12, 0, 0).unwrap());
    append_n(&mut f, 2, "mar").await; // 8..=9

    let mut owner = f.owner().await;
    let months: Vec<String> = sqlx::query_scalar(
        "select name from audit_partitions where range_from < '2024-04-01' order by range_from",
    )
    .fetch_all(&mut owner)
    .await
    .unwrap();
    assert_eq!(months, ["audit_events_2024_01", "audit_events_2024_02", "audit_events_2024_03"]);

    let url = Infra::shared().pg_primary_url();
    let s = &f.db.schema;
    let (code, out) =
        cli(&["retention", "--database-url", &url, "--schema", s, "--before", "2024-03-01"]).await;
    assert_eq!(code, 0, "{out}");
    let dropped: Vec<serde_json::Value> = out.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(dropped.len(), 2, "{out}");
    assert_eq!(dropped[1]["checkpoint_sequence"], 7);

    let (rows, min): (i64, i64) = sqlx::query_as("select count(*), min(sequence) from audit_events")
        .fetch_one(&mut owner)
        .await
        .unwrap();
    assert_eq!((rows, min), (2, 8));

    let v = f.client.verify(VerifyRequest::default()).await.unwrap().into_inner();
    assert!(v.ok && v.checked == 2, "{v:?}");
    let err = f.client.verify(VerifyRequest { from_sequence: 3, to_sequence: 0 }).await.unwrap_err();
    assert_eq!(err.code(), Code::OutOfRange, "{err:?}");

    // appends go on after retention, linked to the retained chain
    clock.set(Utc.with_ymd_and_hms(2024, 3, 11, 0, 0, 0).unwrap());
    let ack = append(&mut f.client, event("u", "mar"), "").await.unwrap();
    assert_eq!(ack.sequence, 10);
    let v = f.client.verify(VerifyRequest::default()).await.unwrap().into_inner();
    assert!(v.ok && v.checked == 3, "{v:?}");
    let (code, out) = cli(&["verify", "--database-url", &url, "--schema", s]).await;
    assert_eq!(code, 0, "{out}");
}

#[tokio::test]
async fn recorded_at_never_goes_back_when_a_clock_does() {
    let _t = mesh_testkit::init_telemetry();
    let clock = ManualClock::new(Utc.with_ymd_and_hms(2024, 5, 1, 0, 0, 10).unwrap());
    let mut f = Fixture::with(|c| c.audit.clock = Clock::Manual(clock.clone())).await;
    append(&mut f.client, event("u", "a"), "").await.unwrap();
    // an instance whose clock is behind (here: the same one, set back a month)
    clock.set(Utc.with_ymd_and_hms(2024, 4, 1, 0, 0, 0).unwrap());
    append(&mut f.client, event("u", "b"), "").await.unwrap();
    let mut owner = f.owner().await;
    let times: Vec<chrono::DateTime<Utc>> =
        sqlx::query_scalar("select recorded_at from audit_events order by sequence")
            .fetch_all(&mut owner)
            .await
            .unwrap();
    assert_eq!(times.len(), 2);
    assert!(times[1] >= times[0], "{times:?}");
    let v = f.client.verify(VerifyRequest::default()).await.unwrap().into_inner();
    assert!(v.ok, "{v:?}");
}

#[tokio::test]
async fn kill_mid_stream_loses_no_acknowledged_event() {
    let _t = mesh_testkit::init_telemetry();
    let infra = Infra::shared();
    let db = mesh_testkit::TestDb::new(infra).await.unwrap();
    let addr = mesh_testkit::free_addr();
    let mut env = vec![
        ("MESH_LISTEN_ADDR".to_owned(), addr.to_string()),
        ("MESH_METRICS_ADDR".to_owned(), mesh_testkit::free_addr().to_string()),
    ];
    env.extend(infra.env(&db.schema, &mesh_testkit::redis_prefix()));
    let process = Process::start(env!("CARGO_BIN_EXE_mesh-audit"), &env).unwrap();
    mesh_testkit::conformance::assert_serving(addr, crate::helpers::SERVED, Duration::from_secs(20))
        .await
        .unwrap();
    let c =
        mesh_proto::audit::audit_service_client::AuditServiceClient::new(mesh_testkit::channel(addr).await);

    // 32 callers append until the process dies under them
    let acked = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let callers: Vec<_> = (0..32)
        .map(|w| {
            let mut c = c.clone();
            let acked = acked.clone();
            tokio::spawn(async move {
                for i in 0.. {
                    match append(&mut c, event(&format!("w{w}"), "crash.test"), &format!("{w}-{i}")).await {
                        Ok(a) => acked.lock().unwrap().push(a),
                        Err(_) => return,
                    }
                }
            })
        })
        .collect();
    crate::helpers::eventually(Duration::from_secs(30), "some appends acknowledged", || {
        let n = acked.lock().unwrap().len();
        async move { (n >= 2000).then_some(()) }
    })
    .await;
    process.kill().unwrap();
    for c in callers {
        c.await.unwrap();
    }
    let acked = acked.lock().unwrap().clone();

    let mut owner = crate::helpers::owner_conn(infra, &db.schema).await;
    let rows: Vec<(i64, uuid::Uuid, Vec<u8>)> =
        sqlx::query_as("select sequence, id, hash from audit_events").fetch_all(&mut owner).await.unwrap();
    let stored: std::collections::HashMap<u64, (String, Vec<u8>)> =
        rows.into_iter().map(|(s, id, h)| (s as u64, (id.to_string(), h))).collect();
    let missing: Vec<_> =
        acked.iter().filter(|a| stored.get(&a.sequence) != Some(&(a.id.clone(), a.hash.clone()))).collect();
    eprintln!("{} acknowledged, {} stored", acked.len(), stored.len());
    assert!(missing.is_empty(), "{} acknowledged events missing, e.g. {:?}", missing.len(), missing.first());
    assert!(stored.len() >= acked.len());

    let url = infra.pg_primary_url();
    let (code, out) = cli(&["verify", "--database-url", &url, "--schema", &db.schema]).await;
    assert_eq!(code, 0, "the chain survives the crash: {out}");
}

//! Bounded internals: appends in flight, Tail streams, and Verify/Export in
//! chunks that give the same answer as one pass.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use mesh_proto::audit::{ExportRequest, TailRequest, VerifyRequest, VerifyResponse};
use mesh_testkit::{Infra, TestDb, grpc::metric_value, scrape_metrics};
use sqlx::Connection as _;
use tonic::Code;
use tonic_types::StatusExt as _;

use crate::helpers::{
    Fixture, append, client, config_for, event, eventually, psql, spawn_app, superuser_url,
};

#[tokio::test]
async fn a_full_append_queue_refuses_at_once_and_loses_nothing_acknowledged() {
    let _t = mesh_testkit::init_telemetry();
    const CAPACITY: usize = 8;
    const CALLS: usize = 30;
    let mut f = Fixture::with(|c| c.audit.queue_capacity = CAPACITY).await;
    append(&mut f.client, event("warm", "a"), "warm").await.unwrap();

    // Hold the chain head: the batch being written waits, so nothing accepted is answered.
    let mut owner = f.owner().await;
    let mut held = owner.begin().await.unwrap();
    sqlx::query("select 1 from audit_chain_head where chain = 1 for update")
        .execute(&mut *held)
        .await
        .unwrap();

    let results = Arc::new(Mutex::new(Vec::new()));
    let calls: Vec<_> = (0..CALLS)
        .map(|i| {
            let mut c = f.client.clone();
            let results = results.clone();
            tokio::spawn(async move {
                let started = Instant::now();
                let r = append(&mut c, event(&format!("u{i}"), "queued"), &format!("k-{i}")).await;
                results.lock().unwrap().push((r.clone(), started.elapsed()));
                r
            })
        })
        .collect();
    // Everything beyond the capacity is answered while the head is still held.
    eventually(Duration::from_secs(20), "the calls beyond capacity refused", || {
        let n = results.lock().unwrap().len();
        async move { (n >= CALLS - CAPACITY).then_some(()) }
    })
    .await;
    {
        let refused = results.lock().unwrap();
        assert_eq!(refused.len(), CALLS - CAPACITY, "only refusals came back while the head was held");
        for (r, took) in refused.iter() {
            let status = r.as_ref().unwrap_err();
            assert_eq!(status.code(), Code::Unavailable, "{status:?}");
            assert!(status.message().contains("queue is full"), "{status:?}");
            assert!(*took < Duration::from_secs(2), "refused after {took:?}");
        }
        let slowest = refused.iter().map(|(_, t)| *t).max().unwrap();
        eprintln!("{} refusals, slowest {slowest:?}", refused.len());
    }

    held.commit().await.unwrap();
    let mut acked = Vec::new();
    for c in calls {
        if let Ok(ack) = c.await.unwrap() {
            acked.push(ack);
        }
    }
    assert_eq!(acked.len(), CAPACITY, "every accepted append is answered once the head is free");
    let stored: Vec<(i64, Vec<u8>)> =
        sqlx::query_as("select sequence, hash from audit_events").fetch_all(&mut owner).await.unwrap();
    assert_eq!(stored.len(), CAPACITY + 1);
    for a in &acked {
        assert!(stored.contains(&(a.sequence as i64, a.hash.clone())), "acknowledged {a:?} is stored");
    }
    let text = scrape_metrics(f.app.metrics_addr).await.unwrap();
    assert_eq!(
        metric_value(&text, "mesh_audit_appends_total", &["result=\"refused\""]),
        Some((CALLS - CAPACITY) as f64)
    );
    // and the service takes appends again
    append(&mut f.client, event("after", "a"), "after").await.unwrap();
    let v = f.client.verify(VerifyRequest::default()).await.unwrap().into_inner();
    assert!(v.ok && v.checked == CAPACITY as u64 + 2, "{v:?}");
}

#[tokio::test]
async fn tail_streams_beyond_the_cap_are_refused_and_a_closed_one_frees_its_place() {
    let _t = mesh_testkit::init_telemetry();
    let f = Fixture::with(|c| c.audit.tail_max_subscribers = 2).await;
    let tail = || {
        let mut c = f.client.clone();
        async move { c.tail(TailRequest { filter: None, after_sequence: Some(0) }).await }
    };
    let first = tail().await.unwrap();
    let _second = tail().await.unwrap();
    let status = tail().await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert_eq!(status.get_details_error_info().unwrap().reason, "TAIL_SUBSCRIBERS_EXHAUSTED");
    assert!(status.message().contains("2 tail streams"), "{status:?}");

    drop(first);
    eventually(Duration::from_secs(10), "a closed stream frees its place", || async {
        tail().await.ok().map(drop)
    })
    .await;
}

fn summary(v: &VerifyResponse) -> (bool, u64, Option<u64>, Vec<u8>, String) {
    (v.ok, v.checked, v.first_bad_sequence, v.head_hash.clone(), v.problem.clone())
}

#[tokio::test]
async fn verify_and_export_in_small_chunks_equal_one_pass() {
    let _t = mesh_testkit::init_telemetry();
    let db = TestDb::new(Infra::shared()).await.unwrap();
    // one instance reads 7 rows per statement, the other everything at once
    let mut small = config_for(&db);
    small.audit.scan_chunk = 7;
    let small = spawn_app(small).await;
    let mut whole = config_for(&db);
    whole.audit.scan_chunk = 100_000;
    let whole = spawn_app(whole).await;
    let (mut cs, mut cw) = (client(&small).await, client(&whole).await);
    for i in 0..50 {
        append(&mut cw, event(&format!("u{}", i % 3), "chunked"), "").await.unwrap();
    }

    for (from, to) in [(0, 0), (3, 45), (14, 14)] {
        let req = VerifyRequest { from_sequence: from, to_sequence: to };
        let a = cs.verify(req).await.unwrap().into_inner();
        let b = cw.verify(req).await.unwrap().into_inner();
        assert!(a.ok, "{a:?}");
        assert_eq!(summary(&a), summary(&b), "verify {from}..{to}");
    }
    async fn export(
        c: &mut mesh_proto::audit::audit_service_client::AuditServiceClient<tonic::transport::Channel>,
        req: ExportRequest,
    ) -> String {
        let mut stream = c.export(req).await.unwrap().into_inner();
        let mut lines = String::new();
        while let Some(chunk) = stream.message().await.unwrap() {
            lines.push_str(&chunk.lines);
        }
        lines
    }
    let filtered = ExportRequest {
        filter: Some(mesh_proto::audit::EventFilter { actor_id: "u1".into(), ..Default::default() }),
        from_sequence: 2,
        to_sequence: 47,
    };
    for req in [ExportRequest::default(), filtered] {
        let (a, b) = (export(&mut cs, req.clone()).await, export(&mut cw, req.clone()).await);
        assert!(!a.is_empty());
        assert_eq!(a, b, "export {req:?}");
    }
    assert_eq!(export(&mut cs, ExportRequest::default()).await.lines().count(), 50);

    // damage in the middle: both name the same event, after the same count
    let (ok, err) = psql(
        &superuser_url(Infra::shared()),
        &format!("set session_replication_role = replica; update {}.audit_events set action = 'x' where sequence = 23", db.schema),
    )
    .await;
    assert!(ok, "{err}");
    let mut broken = Vec::new();
    for c in [&cs, &cw] {
        broken.push(
            eventually(Duration::from_secs(10), "verify sees the damage", || {
                let mut c = c.clone();
                async move {
                    let v = c.verify(VerifyRequest::default()).await.unwrap().into_inner();
                    (!v.ok).then_some(v)
                }
            })
            .await,
        );
    }
    assert_eq!(broken[0].first_bad_sequence, Some(23));
    assert_eq!(broken[0].checked, 22);
    assert_eq!(summary(&broken[0]), summary(&broken[1]));
    small.stop().await.unwrap();
    whole.stop().await.unwrap();
}

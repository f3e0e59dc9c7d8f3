//! Append: round trip, idempotency, validation, group commit across instances.

use std::{collections::BTreeSet, time::Duration};

use futures::future::join_all;
use mesh_proto::audit::{AuditEvent, EventFilter, QueryRequest, VerifyRequest};
use mesh_testkit::{Infra, TestDb, grpc::metric_value, scrape_metrics};
use prost::Message as _;
use prost_types::{Struct, Timestamp, Value, value::Kind};
use tonic::{Code, metadata::MetadataValue};
use tonic_types::StatusExt as _;

use crate::helpers::{Fixture, append, client, config_for, event, eventually, owner_conn, spawn_app};

fn num(n: f64) -> Value {
    Value { kind: Some(Kind::NumberValue(n)) }
}

fn text(s: &str) -> Value {
    Value { kind: Some(Kind::StringValue(s.into())) }
}

#[tokio::test]
async fn append_is_queryable_from_the_replica_with_every_field() {
    let _t = mesh_testkit::init_telemetry();
    let mut f = Fixture::new().await;
    let mut e = event("alice", "document.put");
    e.occurred_at = Some(Timestamp { seconds: 1_700_000_000, nanos: 123_456_789 });
    e.metadata = Some(Struct {
        fields: [
            ("size".to_owned(), num(1536.5)),
            (
                "tags".to_owned(),
                Value {
                    kind: Some(Kind::ListValue(prost_types::ListValue {
                        values: vec![text("a"), num(-0.0)],
                    })),
                },
            ),
            (
                "nested".to_owned(),
                Value {
                    kind: Some(Kind::StructValue(Struct {
                        fields: [("ok".to_owned(), Value { kind: Some(Kind::BoolValue(true)) })].into(),
                    })),
                },
            ),
        ]
        .into(),
    });
    let mut req = tonic::Request::new(mesh_proto::audit::AppendRequest {
        event: Some(e.clone()),
        idempotency_key: String::new(),
    });
    req.metadata_mut().insert("x-request-id", MetadataValue::from_static("rid-roundtrip"));
    req.metadata_mut().insert(
        "traceparent",
        MetadataValue::from_static("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
    );
    let ack = f.client.append(req).await.unwrap().into_inner();
    assert_eq!(ack.sequence, 1);
    assert_eq!(ack.hash.len(), 32);

    let filter = EventFilter { actor_id: "alice".into(), ..Default::default() };
    let (got, served_by) = eventually(Duration::from_secs(10), "event visible on the replica", || {
        let mut c = f.client.clone();
        let filter = filter.clone();
        async move {
            let resp = c.query(QueryRequest { filter: Some(filter), ..Default::default() }).await.unwrap();
            // the replica joins reads once the monitor has seen it healthy
            let served = resp.metadata().get("x-mesh-served-by").map(|v| v.to_str().unwrap().to_owned());
            let events = resp.into_inner().events;
            (events.len() == 1 && served.as_deref() == Some("replica")).then(|| (events[0].clone(), served))
        }
    })
    .await;
    assert_eq!(served_by.as_deref(), Some("replica"));
    assert_eq!(got.id, ack.id);
    assert_eq!(got.sequence, 1);
    assert_eq!(got.hash, ack.hash);
    assert_eq!(got.prev_hash, vec![0; 32]);
    assert_eq!(got.actor, e.actor);
    assert_eq!(got.action, e.action);
    assert_eq!(got.resource, e.resource);
    assert_eq!(got.outcome, e.outcome);
    assert_eq!(got.source, e.source);
    // kept to the microsecond, like timestamptz
    assert_eq!(got.occurred_at, Some(Timestamp { seconds: 1_700_000_000, nanos: 123_456_000 }));
    assert!(got.recorded_at.is_some());
    // the call's own request id and trace id fill the empty fields
    assert_eq!(got.request_id, "rid-roundtrip");
    assert_eq!(got.trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");
    // metadata round-trips bit for bit (-0 included; `==` on doubles would not tell)
    assert_eq!(got.metadata.map(|m| m.encode_to_vec()), e.metadata.as_ref().map(|m| m.encode_to_vec()));

    let v = f.client.verify(VerifyRequest::default()).await.unwrap().into_inner();
    assert!(v.ok, "{v:?}");
    assert_eq!((v.checked, v.head_hash), (1, ack.hash));
}

#[tokio::test]
async fn retries_with_the_same_key_return_the_first_result_across_instances() {
    let _t = mesh_testkit::init_telemetry();
    let db = TestDb::new(Infra::shared()).await.unwrap();
    let a = spawn_app(config_for(&db)).await;
    let b = spawn_app(config_for(&db)).await;
    let (ca, cb) = (client(&a).await, client(&b).await);

    // sequential retry
    let first = append(&mut ca.clone(), event("bob", "session.create"), "key-1").await.unwrap();
    let again = append(&mut cb.clone(), event("bob", "session.create"), "key-1").await.unwrap();
    assert_eq!(again, first);

    // concurrent retries of a new key on both instances, some in one batch
    let calls = (0..20).map(|i| {
        let mut c = if i % 2 == 0 { ca.clone() } else { cb.clone() };
        async move { append(&mut c, event("bob", "session.refresh"), "key-2").await.unwrap() }
    });
    let answers = join_all(calls).await;
    assert!(answers.iter().all(|r| *r == answers[0]), "{answers:?}");
    assert_ne!(answers[0].sequence, first.sequence);

    // the key is scoped to the source service
    let mut other = event("bob", "session.create");
    other.source.as_mut().unwrap().service = "mesh-other".into();
    let third = append(&mut ca.clone(), other, "key-1").await.unwrap();
    assert_ne!(third.id, first.id);

    let mut owner = owner_conn(Infra::shared(), &db.schema).await;
    let rows: i64 =
        sqlx::query_scalar("select count(*) from audit_events").fetch_one(&mut owner).await.unwrap();
    assert_eq!(rows, 3);
    let next: i64 =
        sqlx::query_scalar("select next_sequence from audit_chain_head").fetch_one(&mut owner).await.unwrap();
    assert_eq!(next, 4, "no sequence was spent on a duplicate");
    a.stop().await.unwrap();
    b.stop().await.unwrap();
}

#[tokio::test]
async fn bad_input_is_invalid_argument_with_field_violations_and_nothing_is_written() {
    let _t = mesh_testkit::init_telemetry();
    let mut f = Fixture::new().await;
    let no_actor = AuditEvent { actor: None, ..event("x", "a") };
    let no_action = AuditEvent { action: String::new(), ..event("x", "a") };
    let huge = AuditEvent {
        metadata: Some(Struct { fields: [("blob".to_owned(), text(&"x".repeat(70 * 1024)))].into() }),
        ..event("x", "a")
    };
    let bad_time = AuditEvent { occurred_at: Some(Timestamp { seconds: 1, nanos: -5 }), ..event("x", "a") };
    let future = AuditEvent {
        occurred_at: Some(Timestamp { seconds: chrono::Utc::now().timestamp() + 86_400, nanos: 0 }),
        ..event("x", "a")
    };
    let no_outcome = AuditEvent { outcome: 0, ..event("x", "a") };
    for (e, field) in [
        (no_actor, "event.actor"),
        (no_action, "event.action"),
        (huge, "event.metadata"),
        (bad_time, "event.occurred_at"),
        (future, "event.occurred_at"),
        (no_outcome, "event.outcome"),
    ] {
        let status = append(&mut f.client, e, "").await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{field}: {status:?}");
        let violations = status.get_details_bad_request().expect("BadRequest details").field_violations;
        assert!(violations.iter().any(|v| v.field == field), "{field} not in {violations:?}");
        assert!(
            status.message().starts_with(|c: char| !c.is_uppercase()),
            "message not lowercase: {}",
            status.message()
        );
    }
    let status = f
        .client
        .append(mesh_proto::audit::AppendRequest { event: None, idempotency_key: "k".into() })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);

    let mut owner = f.owner().await;
    let (rows, next): (i64, i64) = sqlx::query_as(
        "select (select count(*) from audit_events), (select next_sequence from audit_chain_head)",
    )
    .fetch_one(&mut owner)
    .await
    .unwrap();
    assert_eq!((rows, next), (0, 1));
}

#[tokio::test]
async fn three_instances_append_10000_events_into_one_gapless_chain() {
    let _t = mesh_testkit::init_telemetry();
    const EVENTS: usize = 10_000;
    const CALLERS_PER_INSTANCE: usize = 32;
    let db = TestDb::new(Infra::shared()).await.unwrap();
    let mut apps = Vec::new();
    for _ in 0..3 {
        apps.push(spawn_app(config_for(&db)).await);
    }
    let mut clients = Vec::new();
    for app in &apps {
        clients.push(client(app).await);
    }
    let callers = clients.len() * CALLERS_PER_INSTANCE;
    let tasks = (0..callers).map(|caller| {
        let mut c = clients[caller % clients.len()].clone();
        tokio::spawn(async move {
            let mut acks = Vec::new();
            for i in (caller..EVENTS).step_by(callers) {
                let ack = append(&mut c, event(&format!("user-{}", i % 97), "load.write"), &format!("k-{i}"))
                    .await
                    .unwrap();
                acks.push(ack);
            }
            acks
        })
    });
    let acks: Vec<_> = join_all(tasks).await.into_iter().flat_map(Result::unwrap).collect();
    assert_eq!(acks.len(), EVENTS);
    let sequences: BTreeSet<u64> = acks.iter().map(|a| a.sequence).collect();
    assert_eq!(sequences, (1..=EVENTS as u64).collect(), "every acknowledged event has its own sequence");

    let mut owner = owner_conn(Infra::shared(), &db.schema).await;
    let (rows, min, max): (i64, i64, i64) =
        sqlx::query_as("select count(*), min(sequence), max(sequence) from audit_events")
            .fetch_one(&mut owner)
            .await
            .unwrap();
    assert_eq!((rows, min, max), (EVENTS as i64, 1, EVENTS as i64));
    let stored: Vec<(i64, Vec<u8>)> =
        sqlx::query_as("select sequence, hash from audit_events").fetch_all(&mut owner).await.unwrap();
    let stored: std::collections::HashMap<u64, Vec<u8>> =
        stored.into_iter().map(|(s, h)| (s as u64, h)).collect();
    assert!(acks.iter().all(|a| stored[&a.sequence] == a.hash), "acknowledged hashes are the stored ones");

    let v = clients[0].verify(VerifyRequest::default()).await.unwrap().into_inner();
    assert!(v.ok, "{v:?}");
    assert_eq!(v.checked, EVENTS as u64);

    // group commit: far fewer transactions than events
    let mut batches = 0.0;
    for app in &apps {
        let text = scrape_metrics(app.metrics_addr).await.unwrap();
        batches += metric_value(&text, "mesh_audit_batch_size_count", &[]).unwrap();
    }
    eprintln!("{EVENTS} events in {batches} batches");
    assert!(batches < EVENTS as f64 / 2.0, "{batches} batches for {EVENTS} events");
    for app in apps {
        app.stop().await.unwrap();
    }
}

#[tokio::test]
async fn a_retry_reaching_a_warmed_up_instance_still_gets_the_first_result() {
    let _t = mesh_testkit::init_telemetry();
    let mut f = Fixture::new().await;
    // a lone instance soon writes each batch in one statement on the head it remembers
    let mut acks = Vec::new();
    for i in 0..6 {
        acks.push(append(&mut f.client, event("carol", "doc.put"), &format!("put-{i}")).await.unwrap());
    }
    // a retry of an early key: that statement hits the existing key
    let again = append(&mut f.client, event("carol", "doc.put"), "put-1").await.unwrap();
    assert_eq!(again, acks[1]);
    // and a new key after it continues the chain right after the last event
    let next = append(&mut f.client, event("carol", "doc.put"), "put-6").await.unwrap();
    assert_eq!(next.sequence, acks[5].sequence + 1);

    let text = scrape_metrics(f.app.metrics_addr).await.unwrap();
    assert_eq!(metric_value(&text, "mesh_audit_appends_total", &["result=\"deduplicated\""]), Some(1.0));
    assert_eq!(metric_value(&text, "mesh_audit_appends_total", &["result=\"committed\""]), Some(7.0));
    let mut owner = f.owner().await;
    let rows: i64 =
        sqlx::query_scalar("select count(*) from audit_events").fetch_one(&mut owner).await.unwrap();
    assert_eq!(rows, 7);
    let v = f.client.verify(VerifyRequest::default()).await.unwrap().into_inner();
    assert!(v.ok && v.checked == 7, "{v:?}");
}

#[tokio::test]
async fn a_key_reused_for_another_event_is_refused_and_a_resend_gets_the_first_result() {
    let _t = mesh_testkit::init_telemetry();
    let mut f = Fixture::new().await;
    // warm up: the instance then writes by the fast path, which meets the existing key
    for i in 0..3 {
        append(&mut f.client, event("dave", "warm"), &format!("warm-{i}")).await.unwrap();
    }
    let put = event("dave", "doc.put");
    let first = append(&mut f.client, put.clone(), "op-1").await.unwrap();
    // an identical resend, with another request id: the first result
    let mut resend = tonic::Request::new(mesh_proto::audit::AppendRequest {
        event: Some(put.clone()),
        idempotency_key: "op-1".into(),
    });
    resend.metadata_mut().insert("x-request-id", MetadataValue::from_static("another-request-id"));
    assert_eq!(f.client.append(resend).await.unwrap().into_inner(), first);

    // the same key with another event: refused, naming the first use
    let mut other = put.clone();
    other.metadata = Some(Struct { fields: [("bytes".to_owned(), num(2.0))].into() });
    for e in [event("dave", "doc.delete"), other] {
        let status = append(&mut f.client, e, "op-1").await.unwrap_err();
        assert_eq!(status.code(), Code::AlreadyExists, "{status:?}");
        let info = status.get_details_error_info().expect("ErrorInfo");
        assert_eq!(info.reason, "IDEMPOTENCY_KEY_REUSED");
        assert_eq!(info.metadata.get("first_sequence"), Some(&first.sequence.to_string()));
        assert!(status.message().starts_with("idempotency_key was first used"), "{}", status.message());
    }

    // one key, two events, sent at once (some meet in one batch): one row, the other event refused
    let (a, b) = (event("erin", "doc.put"), event("erin", "doc.delete"));
    let calls = (0..20).map(|i| {
        let mut c = f.client.clone();
        let e = if i % 2 == 0 { a.clone() } else { b.clone() };
        async move { append(&mut c, e, "op-2").await }
    });
    let answers = join_all(calls).await;
    let ok: Vec<_> = answers.iter().filter_map(|r| r.as_ref().ok()).collect();
    let refused =
        answers.iter().filter(|r| r.as_ref().is_err_and(|s| s.code() == Code::AlreadyExists)).count();
    assert_eq!((ok.len(), refused), (10, 10), "{answers:?}");
    assert!(ok.iter().all(|r| *r == ok[0]));

    let mut owner = f.owner().await;
    let rows: i64 =
        sqlx::query_scalar("select count(*) from audit_events").fetch_one(&mut owner).await.unwrap();
    assert_eq!(rows, 5, "nothing written for a refused key");
    let text = scrape_metrics(f.app.metrics_addr).await.unwrap();
    assert_eq!(metric_value(&text, "mesh_audit_appends_total", &["result=\"key_reused\""]), Some(12.0));
    let v = f.client.verify(VerifyRequest::default()).await.unwrap().into_inner();
    assert!(v.ok && v.checked == 5, "{v:?}");
}

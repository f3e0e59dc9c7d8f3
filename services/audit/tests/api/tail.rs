//! Tail: replay then live, exact resume, filters, slow subscribers, draining.

use std::time::Duration;

use futures::StreamExt as _;
use mesh_proto::audit::{AuditEvent, EventFilter, TailRequest};
use tonic::{Code, Streaming};
use tonic_types::StatusExt as _;

use crate::helpers::{Fixture, append, client, event};

async fn next(stream: &mut Streaming<AuditEvent>) -> Result<AuditEvent, tonic::Status> {
    tokio::time::timeout(Duration::from_secs(20), stream.next())
        .await
        .expect("a tail message within 20 s")
        .expect("the stream goes on")
}

#[tokio::test]
async fn tail_replays_then_goes_live_and_resumes_without_gap_or_duplicate() {
    let _t = mesh_testkit::init_telemetry();
    let mut f = Fixture::new().await;
    for i in 0..30 {
        append(&mut f.client, event(&format!("u{i}"), "before"), "").await.unwrap();
    }
    // appends keep arriving while subscribers replay and switch to live
    const TOTAL: u64 = 330;
    let writer = {
        let c = f.client.clone();
        tokio::spawn(async move {
            let calls = (0..8).map(|w| {
                let mut c = c.clone();
                async move {
                    for i in (w..300).step_by(8) {
                        append(&mut c, event(&format!("w{i}"), "during"), "").await.unwrap();
                        if i % 40 == 0 {
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                    }
                }
            });
            futures::future::join_all(calls).await;
        })
    };

    let mut stream =
        f.client.tail(TailRequest { filter: None, after_sequence: Some(0) }).await.unwrap().into_inner();
    let mut seen = Vec::new();
    while seen.len() < 100 {
        seen.push(next(&mut stream).await.unwrap().sequence);
    }
    drop(stream);
    let resume = *seen.last().unwrap();

    let mut stream =
        f.client.tail(TailRequest { filter: None, after_sequence: Some(resume) }).await.unwrap().into_inner();
    while *seen.last().unwrap() < TOTAL {
        let e = next(&mut stream).await.unwrap();
        assert_eq!(e.hash.len(), 32);
        seen.push(e.sequence);
    }
    writer.await.unwrap();
    assert_eq!(seen, (1..=TOTAL).collect::<Vec<_>>());

    // and after the last one, the next append arrives live
    let ack = append(&mut f.client, event("late", "after"), "").await.unwrap();
    assert_eq!(next(&mut stream).await.unwrap().sequence, ack.sequence);
}

#[tokio::test]
async fn tail_without_after_sequence_sends_only_new_matching_events() {
    let _t = mesh_testkit::init_telemetry();
    let mut f = Fixture::new().await;
    for _ in 0..3 {
        append(&mut f.client, event("y", "old"), "").await.unwrap();
    }
    let filter = EventFilter { actor_id: "y".into(), ..Default::default() };
    let mut stream =
        f.client.tail(TailRequest { filter: Some(filter), after_sequence: None }).await.unwrap().into_inner();
    let mut want = Vec::new();
    for i in 0..6 {
        let actor = if i % 2 == 0 { "x" } else { "y" };
        let ack = append(&mut f.client, event(actor, "new"), "").await.unwrap();
        if actor == "y" {
            want.push(ack.sequence);
        }
    }
    let mut got = Vec::new();
    for _ in 0..want.len() {
        let e = next(&mut stream).await.unwrap();
        assert_eq!((e.actor.as_ref().unwrap().id.as_str(), e.action.as_str()), ("y", "new"));
        got.push(e.sequence);
    }
    assert_eq!(got, want);

    let err = f.client.tail(TailRequest { filter: None, after_sequence: Some(10_000) }).await.unwrap_err();
    assert_eq!(err.code(), Code::OutOfRange);
}

#[tokio::test]
async fn a_subscriber_that_stops_reading_is_cut_off_with_resource_exhausted() {
    let _t = mesh_testkit::init_telemetry();
    let mut f = Fixture::with(|c| {
        c.audit.tail_buffer = 64;
        c.audit.tail_subscriber_buffer = 8;
    })
    .await;
    // its own connection, so its unread data holds no window the appends need
    let mut tail_client = client(&f.app).await;
    let mut stream =
        tail_client.tail(TailRequest { filter: None, after_sequence: Some(0) }).await.unwrap().into_inner();
    // Not reading: the subscriber's queue and the HTTP/2 windows (the
    // client's is 2 MiB per stream) fill up, then live events leave the
    // ring behind it. 1600 events of ~4 KiB are about 6 MiB.
    const TOTAL: u64 = 1600;
    let blob = prost_types::Value { kind: Some(prost_types::value::Kind::StringValue("x".repeat(4000))) };
    let calls = (0..16).map(|w| {
        let mut c = f.client.clone();
        let blob = blob.clone();
        async move {
            for i in 0..TOTAL / 16 {
                let mut e = event(&format!("w{w}"), &format!("bulk-{i}"));
                e.metadata = Some(prost_types::Struct { fields: [("blob".to_owned(), blob.clone())].into() });
                append(&mut c, e, "").await.unwrap();
            }
        }
    });
    futures::future::join_all(calls).await;

    let mut last = 0;
    let status = loop {
        match next(&mut stream).await {
            Ok(e) => {
                assert_eq!(e.sequence, last + 1, "contiguous until the cut");
                last = e.sequence;
            }
            Err(status) => break status,
        }
    };
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(last < TOTAL, "cut off before the end ({last})");
    let info = status.get_details_error_info().expect("ErrorInfo details");
    assert_eq!(info.reason, "TAIL_SUBSCRIBER_TOO_SLOW");
    assert_eq!(info.metadata["resume_after_sequence"], last.to_string());

    // resuming where it was cut off continues exactly
    let mut stream =
        f.client.tail(TailRequest { filter: None, after_sequence: Some(last) }).await.unwrap().into_inner();
    assert_eq!(next(&mut stream).await.unwrap().sequence, last + 1);
}

#[tokio::test]
async fn draining_ends_tail_streams_with_unavailable() {
    let _t = mesh_testkit::init_telemetry();
    let mut f = Fixture::new().await;
    let mut stream = f.client.tail(TailRequest::default()).await.unwrap().into_inner();
    let ack = append(&mut f.client, event("d", "drain"), "").await.unwrap();
    assert_eq!(next(&mut stream).await.unwrap().sequence, ack.sequence);

    f.app.begin_stop();
    let status = next(&mut stream).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(status.message().contains(&format!("after_sequence={}", ack.sequence)), "{}", status.message());
    // the server stops without waiting out the grace period for the stream
    tokio::time::timeout(Duration::from_secs(4), f.app.join()).await.expect("stops promptly").unwrap();
}

//! Query: filters, keyset pagination, replica fallback.

use std::time::Duration;

use mesh_proto::audit::{EventFilter, Outcome, QueryRequest};
use mesh_testkit::{PrivateInfra, grpc::metric_value, scrape_metrics};
use prost_types::Timestamp;
use tonic::Code;

use crate::helpers::{Fixture, append, client, config, event, eventually, query_all, spawn_app};

/// 60 events: actors a0..a2, actions even/odd, outcome DENIED every 5th,
/// occurred_at one minute apart, in an order unlike sequence order.
async fn seed(f: &mut Fixture) {
    for i in 0..60u32 {
        let mut e = event(&format!("a{}", i % 3), if i % 2 == 0 { "even" } else { "odd" });
        if i % 5 == 0 {
            e.outcome = Outcome::Denied as i32;
        }
        e.resource.as_mut().unwrap().id = format!("r{}", i % 4);
        // occurred_at runs backwards for the first half
        let minute = if i < 30 { 30 - i } else { i };
        e.occurred_at = Some(Timestamp { seconds: 1_700_000_000 + i64::from(minute) * 60, nanos: 0 });
        append(&mut f.client, e, "").await.unwrap();
    }
}

async fn wait_replica(f: &Fixture, n: usize) {
    eventually(Duration::from_secs(10), "replica caught up", || {
        let mut c = f.client.clone();
        async move {
            (query_all(&mut c, QueryRequest { page_size: 1000, ..Default::default() }).await.len() == n)
                .then_some(())
        }
    })
    .await;
}

#[tokio::test]
async fn filters_and_keyset_pages_newest_first() {
    let _t = mesh_testkit::init_telemetry();
    let mut f = Fixture::new().await;
    seed(&mut f).await;
    wait_replica(&f, 60).await;

    // every page, small pages: no duplicates, no gaps, newest first
    let all = query_all(&mut f.client, QueryRequest { page_size: 7, ..Default::default() }).await;
    assert_eq!(all.len(), 60);
    let keys: Vec<(i64, u64)> = all.iter().map(|e| (e.occurred_at.unwrap().seconds, e.sequence)).collect();
    assert!(keys.windows(2).all(|w| w[0] > w[1]), "not newest first: {keys:?}");

    type Want = Box<dyn Fn(u32) -> bool>;
    let cases: Vec<(EventFilter, Want)> = vec![
        (EventFilter { actor_id: "a1".into(), ..Default::default() }, Box::new(|i| i % 3 == 1)),
        (EventFilter { action: "odd".into(), ..Default::default() }, Box::new(|i| i % 2 == 1)),
        (EventFilter { outcome: Outcome::Denied as i32, ..Default::default() }, Box::new(|i| i % 5 == 0)),
        (
            EventFilter { resource_type: "document".into(), resource_id: "r2".into(), ..Default::default() },
            Box::new(|i| i % 4 == 2),
        ),
        (
            EventFilter {
                actor_id: "a0".into(),
                action: "even".into(),
                since: Some(Timestamp { seconds: 1_700_000_000 + 10 * 60, nanos: 0 }),
                until: Some(Timestamp { seconds: 1_700_000_000 + 40 * 60, nanos: 0 }),
                ..Default::default()
            },
            Box::new(|i| {
                let minute = if i < 30 { 30 - i } else { i };
                i % 3 == 0 && i % 2 == 0 && (10..40).contains(&minute)
            }),
        ),
    ];
    for (filter, want) in cases {
        let got = query_all(
            &mut f.client,
            QueryRequest { filter: Some(filter.clone()), page_size: 4, ..Default::default() },
        )
        .await;
        let mut got_seq: Vec<u64> = got.iter().map(|e| e.sequence).collect();
        got_seq.sort_unstable();
        let want_seq: Vec<u64> = (0..60u32).filter(|i| want(*i)).map(|i| u64::from(i) + 1).collect();
        assert_eq!(got_seq, want_seq, "{filter:?}");
    }

    // a token only works with the filter it was made for
    let page =
        f.client.query(QueryRequest { page_size: 5, ..Default::default() }).await.unwrap().into_inner();
    let err = f
        .client
        .query(QueryRequest {
            filter: Some(EventFilter { action: "odd".into(), ..Default::default() }),
            page_size: 5,
            page_token: page.next_page_token,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = f
        .client
        .query(QueryRequest { page_token: "not a token".into(), ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn queries_fall_back_to_the_primary_when_the_replica_is_down() {
    let _t = mesh_testkit::init_telemetry();
    let private = PrivateInfra::new();
    private.start_pg().await.unwrap();
    let app = spawn_app(config(&private.infra).await).await;
    let mut c = client(&app).await;
    append(&mut c, event("z", "x"), "").await.unwrap();
    eventually(Duration::from_secs(20), "served by the replica", || {
        let mut c = c.clone();
        async move {
            let r = c.query(QueryRequest::default()).await.ok()?;
            let served = r.metadata().get("x-mesh-served-by")?.to_str().ok()? == "replica";
            (served && r.into_inner().events.len() == 1).then_some(())
        }
    })
    .await;

    private.stop_pg_replica().await.unwrap();
    let events = eventually(Duration::from_secs(20), "served by the primary", || {
        let mut c = c.clone();
        async move {
            let r = c.query(QueryRequest::default()).await.ok()?;
            let served = r.metadata().get("x-mesh-served-by")?.to_str().ok()? == "primary";
            served.then(|| r.into_inner().events)
        }
    })
    .await;
    assert_eq!(events.len(), 1);
    let text = scrape_metrics(app.metrics_addr).await.unwrap();
    let fallbacks = metric_value(
        &text,
        "mesh_db_reads_total",
        &["served_by=\"primary\"", "reason=\"replicas_unhealthy\""],
    );
    assert!(fallbacks.is_some_and(|n| n >= 1.0), "{text}");
    app.stop().await.unwrap();
}

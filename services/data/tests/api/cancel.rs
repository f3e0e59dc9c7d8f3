//! Cancellation safety: callers that time out or disconnect at random
//! points of their calls never leave a pooled connection inside an open or
//! aborted transaction, and the pool keeps serving.

use std::time::Duration;

use futures::{StreamExt as _, stream};
use mesh_proto::data::{
    BatchOperation, BatchRequest, GetRequest, PutOperation, PutRequest, QueryRequest, batch_operation::Op,
    data_service_client::DataServiceClient,
};
use rand::Rng as _;
use serde_json::json;
use sqlx::Connection as _;

use crate::helpers::{Fixture, OPEN_RULES, doc, eventually};

/// State of every connection `application_name` holds, from the server's side.
async fn connections(url: &str, app: &str) -> Vec<(String, bool)> {
    let mut conn = sqlx::PgConnection::connect(url).await.unwrap();
    sqlx::query_as(
        "select coalesce(state, ''), xact_start is not null from pg_stat_activity \
         where application_name = $1 and backend_type = 'client backend'",
    )
    .bind(app)
    .fetch_all(&mut conn)
    .await
    .unwrap()
}

/// A plain tonic client (no breaker or retries of its own: the cut calls
/// must all reach the service) sending the session token.
struct Plain {
    client: DataServiceClient<tonic::transport::Channel>,
    authorization: tonic::metadata::MetadataValue<tonic::metadata::Ascii>,
}

impl Plain {
    fn authorize<T>(&self, message: T) -> tonic::Request<T> {
        let mut req = tonic::Request::new(message);
        req.metadata_mut().insert("authorization", self.authorization.clone());
        req
    }
}

fn timed<T>(deadline: Option<Duration>, mut req: tonic::Request<T>) -> tonic::Request<T> {
    if let Some(d) = deadline {
        req.set_timeout(d);
    }
    req
}

/// One call of `kind` (Put, a Batch of 20 puts, Get, Query), with `deadline`
/// as its grpc-timeout; whether it succeeded.
async fn call(c: &Plain, kind: usize, i: usize, token: String, deadline: Option<Duration>) -> bool {
    let mut raw = c.client.clone();
    match kind {
        0 => {
            let req = PutRequest {
                collection: "c".into(),
                key: format!("k{}", i % 17),
                document: Some(doc(json!({"i": i}))),
                expected_version: None,
            };
            raw.put(timed(deadline, c.authorize(req))).await.is_ok()
        }
        1 => {
            let ops = (0..20)
                .map(|j| BatchOperation {
                    op: Some(Op::Put(PutOperation {
                        collection: "c".into(),
                        key: format!("b{}", (i + j) % 23),
                        document: Some(doc(json!({"i": i, "j": j}))),
                        expected_version: None,
                    })),
                })
                .collect();
            raw.batch(timed(deadline, c.authorize(BatchRequest { ops }))).await.is_ok()
        }
        2 => {
            let req = GetRequest { collection: "c".into(), key: "seed".into(), consistency_token: token };
            raw.get(timed(deadline, c.authorize(req))).await.is_ok()
        }
        _ => {
            let req = QueryRequest {
                collection: "c".into(),
                filter: Some(doc(json!({"i": i % 5}))),
                ..Default::default()
            };
            raw.query(timed(deadline, c.authorize(req))).await.is_ok()
        }
    }
}

#[tokio::test]
async fn cancelled_calls_never_leave_a_connection_in_a_transaction() {
    let _t = mesh_testkit::init_telemetry();
    let app_name = format!("mesh-data-cancel-{:08x}", rand::random::<u32>());
    let name = app_name.clone();
    let f = Fixture::with_rules("leo", OPEN_RULES, move |c| {
        c.db.application_name = Some(name);
        c.db.max_connections = 8;
    })
    .await;
    let plain = Plain {
        client: DataServiceClient::new(mesh_testkit::channel(f.app.addr).await),
        authorization: format!("Bearer {}", f.token).parse().unwrap(),
    };
    let c = &plain;
    let token =
        f.c.put(PutRequest {
            collection: "c".into(),
            key: "seed".into(),
            document: Some(doc(json!({"n": 0}))),
            expected_version: None,
        })
        .await
        .unwrap()
        .consistency_token;

    // How long each kind of call takes here, uncut, at the storm's concurrency.
    let mut span_us = [0u64; 4];
    for (kind, slot) in span_us.iter_mut().enumerate() {
        let times: Vec<u64> = stream::iter(0..48)
            .map(|i| {
                let token = token.clone();
                async move {
                    let start = std::time::Instant::now();
                    assert!(call(c, kind, i, token, None).await, "uncut calls succeed");
                    start.elapsed().as_micros() as u64
                }
            })
            .buffer_unordered(16)
            .collect()
            .await;
        let mut times = times;
        times.sort_unstable();
        // Cuts fall anywhere up to a little past the slowest: in the session
        // check, the rate limit, the statement, or the answer.
        *slot = times[times.len() - 1] * 5 / 4;
    }
    eprintln!("cut windows (µs) put/batch/get/query: {span_us:?}");
    let writes_before = f.metric("mesh_data_writes_total", &["op=\"put\""]).await;

    // Hundreds of calls, each cut off at a random point: by its deadline
    // (the server drops the handler) or by the client going away.
    let outcomes: Vec<(usize, bool)> = stream::iter(0..400)
        .map(|i| {
            let token = token.clone();
            async move {
                let mut rng = rand::rng();
                let kind = i % 4;
                let cut = Duration::from_micros(rng.random_range(0..span_us[kind]));
                let ok = if rng.random_bool(0.5) {
                    call(c, kind, i, token, Some(cut)).await
                } else {
                    tokio::time::timeout(cut, call(c, kind, i, token, None)).await.unwrap_or(false)
                };
                (kind, ok)
            }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    let outcomes: Vec<bool> = {
        // Writes acknowledged to the client vs. committed by the service: a
        // write committed but never acknowledged was cut after its statement ran.
        let acknowledged_puts = outcomes.iter().filter(|(k, ok)| *k == 0 && *ok).count() as f64;
        let acknowledged_batches = outcomes.iter().filter(|(k, ok)| *k == 1 && *ok).count() as f64;
        let committed = eventually(Duration::from_secs(10), "the storm's writes settle", || async {
            let a = f.metric("mesh_data_writes_total", &["op=\"put\""]).await;
            tokio::time::sleep(Duration::from_millis(200)).await;
            let b = f.metric("mesh_data_writes_total", &["op=\"put\""]).await;
            (a == b).then_some(b - writes_before)
        })
        .await;
        let acknowledged = acknowledged_puts + 20.0 * acknowledged_batches;
        eprintln!("{committed} document writes committed, {acknowledged} acknowledged");
        assert!(
            committed > acknowledged,
            "no call was cut after its statement ran: the storm missed the database"
        );
        outcomes.into_iter().map(|(_, ok)| ok).collect()
    };
    let completed = outcomes.iter().filter(|ok| **ok).count();
    eprintln!("{completed} of {} calls completed before their cut", outcomes.len());
    assert!(completed < outcomes.len(), "some calls must have been cut");

    // Once in-flight statements are done, every connection of the service is
    // idle outside any transaction, on the primary and on the replica.
    let infra = mesh_testkit::Infra::shared();
    for port in [infra.pg_primary_port, infra.pg_replica_port] {
        let url = infra.pg_admin_url(port);
        let states = eventually(Duration::from_secs(20), "no statement in flight", || async {
            let s = connections(&url, &app_name).await;
            s.iter().all(|(state, _)| state != "active").then_some(s)
        })
        .await;
        eprintln!("port {port}: {} connections", states.len());
        for (state, in_xact) in &states {
            assert_eq!(state, "idle", "a pooled connection was left in state {state:?}");
            assert!(!in_xact, "a pooled connection was left inside a transaction");
        }
    }
    assert!(!connections(&infra.pg_admin_url(infra.pg_primary_port), &app_name).await.is_empty());

    // And the pool serves every connection again: as many concurrent calls
    // as it has connections, twice over.
    let fresh = f.c.clone();
    let failures: Vec<String> = stream::iter(0..32)
        .map(|i| {
            let fresh = fresh.clone();
            async move {
                fresh
                    .put(PutRequest {
                        collection: "c".into(),
                        key: format!("after{i}"),
                        document: Some(doc(json!({"i": i}))),
                        expected_version: Some(0),
                    })
                    .await
                    .err()
                    .map(|s| format!("{:?}: {}", s.code(), s.message()))
            }
        })
        .buffer_unordered(16)
        .filter_map(|e| async move { e })
        .collect()
        .await;
    assert!(failures.is_empty(), "{failures:?}");
}

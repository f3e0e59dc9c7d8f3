//! Cancellation safety: callers that time out or disconnect at random
//! points of their calls never leave a pooled connection inside an open or
//! aborted transaction, and the pool keeps serving.

use std::time::Duration;

use futures::{StreamExt as _, stream};
use mesh_proto::data::{
    BatchOperation, BatchRequest, GetRequest, PutOperation, PutRequest, QueryRequest, batch_operation::Op,
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
    let c = &f.c;
    let token = c
        .put(PutRequest {
            collection: "c".into(),
            key: "seed".into(),
            document: Some(doc(json!({"n": 0}))),
            expected_version: None,
        })
        .await
        .unwrap()
        .consistency_token;

    // Hundreds of calls, each cut off at a random point: by its deadline
    // (the server drops the handler) or by the client going away.
    let outcomes: Vec<bool> = stream::iter(0..400)
        .map(|i| {
            let token = token.clone();
            async move {
                let mut rng = rand::rng();
                let cut = Duration::from_micros(rng.random_range(0..30_000));
                let by_deadline = rng.random_bool(0.5);
                let call = async {
                    match i % 4 {
                        0 => {
                            let mut req = c.authorize(PutRequest {
                                collection: "c".into(),
                                key: format!("k{}", i % 17),
                                document: Some(doc(json!({"i": i}))),
                                expected_version: None,
                            });
                            if by_deadline {
                                req.set_timeout(cut);
                            }
                            c.raw().put(req).await.is_ok()
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
                            let mut req = c.authorize(BatchRequest { ops });
                            if by_deadline {
                                req.set_timeout(cut);
                            }
                            c.raw().batch(req).await.is_ok()
                        }
                        2 => {
                            let mut req = c.authorize(GetRequest {
                                collection: "c".into(),
                                key: "seed".into(),
                                consistency_token: token,
                            });
                            if by_deadline {
                                req.set_timeout(cut);
                            }
                            c.raw().get(req).await.is_ok()
                        }
                        _ => {
                            let mut req = c.authorize(QueryRequest {
                                collection: "c".into(),
                                filter: Some(doc(json!({"i": i % 5}))),
                                ..Default::default()
                            });
                            if by_deadline {
                                req.set_timeout(cut);
                            }
                            c.raw().query(req).await.is_ok()
                        }
                    }
                };
                if by_deadline { call.await } else { tokio::time::timeout(cut, call).await.unwrap_or(false) }
            }
        })
        .buffer_unordered(64)
        .collect()
        .await;
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
    // as it has connections, twice over (from a new client: the first one's
    // breaker has seen hundreds of deadlines).
    let fresh = crate::helpers::client(f.app.addr, &f.token);
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

//! Reads and writes against a private primary + replica that the tests
//! delay, stop and start: read-your-writes under replica lag, lagging and
//! failed replicas left out, a stopped primary.

use std::time::{Duration, Instant};

use mesh_data::Config;
use mesh_proto::data::{GetRequest, PutRequest, QueryRequest};
use mesh_testkit::{PrivateInfra, Running, TestDb};
use serde_json::json;
use tonic::Code;

use crate::helpers::{Mesh, OPEN_RULES, client, doc, eventually, metric, served_by, spawn_app};

/// The mesh on the shared infrastructure, the data service on a private pair.
struct Setup {
    private: PrivateInfra,
    _mesh: Mesh,
    app: Running,
    c: mesh_client::DataClient,
}

async fn setup(tweak: impl FnOnce(&mut Config)) -> Setup {
    let private = PrivateInfra::new();
    private.start_pg().await.unwrap();
    let mesh = Mesh::start(OPEN_RULES).await;
    let db = TestDb::new(&private.infra).await.unwrap();
    let mut config = mesh.config(&db);
    config.db.replica_poll = Duration::from_millis(100);
    tweak(&mut config);
    let app = spawn_app(config).await;
    let c = client(app.addr, &mesh.token("kim").await);
    Setup { private, _mesh: mesh, app, c }
}

impl Setup {
    async fn delay_replica(&self, delay: Duration) {
        self.private.delay_replica(delay).await.unwrap();
    }

    async fn put(&self, key: &str, v: i64) -> String {
        let req = PutRequest {
            collection: "c".into(),
            key: key.into(),
            document: Some(doc(json!({"v": v}))),
            expected_version: None,
        };
        self.c.put(req).await.unwrap().consistency_token
    }

    /// The value read and where it was served (`None`: not found).
    async fn get(&self, key: &str, token: &str) -> (Option<i64>, String) {
        let req = self.c.authorize(GetRequest {
            collection: "c".into(),
            key: key.into(),
            consistency_token: token.into(),
        });
        match self.c.raw().get(req).await {
            Ok(r) => {
                let by = served_by(&r);
                let d = r.into_inner().document.unwrap();
                let v = match d.fields["v"].kind {
                    Some(prost_types::value::Kind::NumberValue(n)) => n as i64,
                    _ => panic!("not a number"),
                };
                (Some(v), by)
            }
            Err(s) if s.code() == Code::NotFound => {
                let by = s.metadata().get(mesh_data::SERVED_BY).unwrap().to_str().unwrap().to_owned();
                (None, by)
            }
            Err(s) => panic!("get {key}: {s:?}"),
        }
    }

    async fn reads(&self, served_by: &str, reason: &str) -> f64 {
        let labels = [format!("served_by=\"{served_by}\""), format!("reason=\"{reason}\"")];
        let labels: Vec<&str> = labels.iter().map(String::as_str).collect();
        metric(&self.app, "mesh_db_reads_total", &labels).await
    }
}

#[tokio::test]
async fn reads_with_a_consistency_token_see_the_write_while_the_replica_lags() {
    let _t = mesh_testkit::init_telemetry();
    // Lag in time within the bound: the replica keeps serving token-less reads.
    let s = setup(|c| c.db.max_replica_delay = Duration::from_secs(600)).await;
    let t1 = s.put("k", 1).await;
    eventually(Duration::from_secs(20), "the replica serves the first version", || async {
        (s.get("k", &t1).await == (Some(1), "replica".to_owned())).then_some(())
    })
    .await;

    s.delay_replica(Duration::from_secs(3)).await;
    for i in 2..=6 {
        let t = s.put("k", i).await;
        // With its token, a caller always reads its own write — from the
        // primary while the replica has not replayed it.
        let (v, by) = s.get("k", &t).await;
        assert_eq!(v, Some(i), "read-your-writes broken (served by {by})");
        assert_eq!(by, "primary", "the replica is 3 s behind");
        let q =
            s.c.query(QueryRequest {
                collection: "c".into(),
                consistency_token: t.clone(),
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(q.documents[0].version as i64, i);
        // Without a token: a replica, and here a stale one.
        let (stale, by) = s.get("k", "").await;
        assert_eq!(by, "replica");
        assert!(stale < Some(i), "{stale:?}");
    }
    assert!(s.reads("primary", "replica_behind_token").await >= 10.0);

    // A write the replica has not replayed yet, read later with its token:
    // the replica serves it as soon as it has replayed it.
    let t = s.put("k", 7).await;
    s.delay_replica(Duration::ZERO).await;
    eventually(Duration::from_secs(20), "the replica catches up and serves the token", || async {
        (s.get("k", &t).await == (Some(7), "replica".to_owned())).then_some(())
    })
    .await;
    // A well-formed token from the future never hangs: the primary answers.
    let future = mesh_data_token(u64::MAX / 2);
    let start = Instant::now();
    assert_eq!(s.get("k", &future).await, (Some(7), "primary".to_owned()));
    assert!(start.elapsed() < Duration::from_secs(5), "{:?}", start.elapsed());
}

/// A consistency token naming WAL position `lsn` (the documented format).
fn mesh_data_token(lsn: u64) -> String {
    use base64::Engine as _;
    let mut b = vec![1u8];
    b.extend_from_slice(&lsn.to_be_bytes());
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

#[tokio::test]
async fn a_replica_lagging_past_the_bound_is_left_out_until_it_catches_up() {
    let _t = mesh_testkit::init_telemetry();
    let s = setup(|c| c.db.max_replica_delay = Duration::from_millis(500)).await;
    let t = s.put("k", 1).await;
    eventually(Duration::from_secs(20), "the replica serves reads", || async {
        (s.get("k", &t).await.1 == "replica").then_some(())
    })
    .await;
    s.delay_replica(Duration::from_secs(4)).await;
    s.put("k", 2).await;
    // Left out once its replay delay passes 500 ms: token-less reads go to
    // the primary (fresh), counted with the reason.
    eventually(Duration::from_secs(10), "the lagging replica is left out", || async {
        (s.get("k", "").await == (Some(2), "primary".to_owned())).then_some(())
    })
    .await;
    assert!(s.reads("primary", "replicas_unhealthy").await >= 1.0);
    assert_eq!(metric(&s.app, "mesh_db_replica_up", &[]).await, 0.0);
    // Back once it has replayed what it received.
    eventually(Duration::from_secs(20), "the replica is back", || async {
        (s.get("k", "").await == (Some(2), "replica".to_owned())).then_some(())
    })
    .await;
    s.delay_replica(Duration::ZERO).await;
}

#[tokio::test]
async fn a_stopped_replica_sends_reads_to_the_primary_and_gets_them_back() {
    let _t = mesh_testkit::init_telemetry();
    let s = setup(|_| {}).await;
    let t = s.put("k", 1).await;
    eventually(Duration::from_secs(20), "the replica serves reads", || async {
        (s.get("k", &t).await.1 == "replica").then_some(())
    })
    .await;
    s.private.stop_pg_replica().await.unwrap();
    // No read fails: the first ones may hit the dead replica and are
    // repeated on the primary; then the replica is left out.
    for _ in 0..20 {
        assert_eq!(s.get("k", "").await.0, Some(1));
    }
    eventually(Duration::from_secs(10), "reads go to the primary", || async {
        (s.get("k", "").await.1 == "primary").then_some(())
    })
    .await;
    assert!(
        s.reads("primary", "replica_failed").await + s.reads("primary", "replicas_unhealthy").await >= 1.0
    );
    s.private.start_pg().await.unwrap();
    eventually(Duration::from_secs(30), "the replica serves reads again", || async {
        (s.get("k", "").await == (Some(1), "replica".to_owned())).then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_stopped_primary_fails_writes_fast_while_the_replica_serves_reads() {
    let _t = mesh_testkit::init_telemetry();
    let s = setup(|_| {}).await;
    let t = s.put("k", 1).await;
    eventually(Duration::from_secs(20), "the replica has the write", || async {
        (s.get("k", &t).await == (Some(1), "replica".to_owned())).then_some(())
    })
    .await;
    s.private.stop_pg_primary().await.unwrap();
    // Writes: UNAVAILABLE (retryable), never a wait for the 30 s acquire timeout.
    eventually(Duration::from_secs(10), "writes fail fast", || async {
        let start = Instant::now();
        let req = PutRequest {
            collection: "c".into(),
            key: "k".into(),
            document: Some(doc(json!({"v": 2}))),
            expected_version: None,
        };
        let e = s.c.put(req).await.unwrap_err();
        assert_eq!(e.code(), Code::Unavailable, "{}", e.message());
        (start.elapsed() < Duration::from_secs(1)).then_some(())
    })
    .await;
    // Token-less reads: still the replica, with the last committed value.
    for _ in 0..5 {
        assert_eq!(s.get("k", "").await, (Some(1), "replica".to_owned()));
    }
    s.private.start_pg().await.unwrap();
    eventually(Duration::from_secs(30), "writes work again", || async {
        let req = PutRequest {
            collection: "c".into(),
            key: "k".into(),
            document: Some(doc(json!({"v": 3}))),
            expected_version: None,
        };
        s.c.put(req).await.ok()
    })
    .await;
}

//! Every pool exports the OpenTelemetry connection-pool metrics.

use std::time::Duration;

use mesh_testkit::{Infra, TestDb};

use crate::{connect, eventually};

#[tokio::test]
async fn pools_report_their_connections_waiters_and_wait_times() {
    let _t = mesh_testkit::init_telemetry();
    let test_db = TestDb::new(Infra::shared()).await.unwrap();
    let mut config = test_db.config.clone();
    config.min_connections = 2;
    config.max_connections = 3;
    config.acquire_timeout = Duration::from_millis(300);
    let (db, registry) = connect(&config);
    let text = || {
        let mut t = String::new();
        prometheus_client::encoding::text::encode(&mut t, &registry).unwrap();
        t
    };
    let value = |t: &str, name: &str, labels: &[&str]| {
        mesh_testkit::grpc::metric_value(t, name, labels).unwrap_or(-1.0)
    };
    let primary =
        format!("db_client_connection_pool_name=\"primary@127.0.0.1:{}\"", Infra::shared().pg_primary_port);
    let replica =
        format!("db_client_connection_pool_name=\"replica@127.0.0.1:{}\"", Infra::shared().pg_replica_port);

    // Kept warm without any call.
    eventually(Duration::from_secs(10), "two warm connections", || async {
        (value(&text(), "db_client_connections_usage", &[&primary, "state=\"idle\""]) == 2.0).then_some(())
    })
    .await;
    let t = text();
    assert_eq!(value(&t, "db_client_connection_max", &[&primary]), 3.0);
    assert_eq!(value(&t, "db_client_connection_idle_min", &[&replica]), 2.0);

    // Three in use, a fourth caller waits and times out.
    let held = [db.write().await.unwrap(), db.write().await.unwrap(), db.write().await.unwrap()];
    let t = text();
    assert_eq!(value(&t, "db_client_connections_usage", &[&primary, "state=\"used\""]), 3.0);
    let waiter = tokio::spawn({
        let db = db.clone();
        async move { db.write().await.map(|_| ()) }
    });
    eventually(Duration::from_secs(5), "a caller waiting", || async {
        (value(&text(), "db_client_connection_pending_requests", &[&primary]) == 1.0).then_some(())
    })
    .await;
    let e = waiter.await.unwrap().unwrap_err();
    assert!(matches!(e, mesh_db::DbError::PoolTimedOut { .. }), "{e}");
    drop(held);
    let t = text();
    assert_eq!(value(&t, "db_client_connection_timeouts_total", &[&primary]), 1.0);
    assert_eq!(value(&t, "db_client_connection_pending_requests", &[&primary]), 0.0);
    assert_eq!(value(&t, "db_client_connection_wait_time_seconds_count", &[&primary]), 4.0);
    assert!(!t.contains("hunter2") && !t.contains("mesh:mesh"), "no credentials in metrics");
}

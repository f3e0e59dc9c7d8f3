//! A pooled connection that died while idle costs no caller an error, and a
//! write is never sent twice to make that so.

use std::time::{Duration, Instant};

use mesh_db::{Db, PING_IDLE_AFTER};
use mesh_testkit::{Infra, PrivateInfra, TestDb};
use sqlx::Connection as _;

use crate::{connect, create_table, eventually};

/// Inserts one row into `t` on a pooled primary connection, returning the
/// error if the statement failed.
async fn insert(db: &Db, id: i32) -> Result<(), String> {
    let mut conn = db.write().await.map_err(|e| e.to_string())?;
    sqlx::query("insert into t (id, v) values ($1, 1)")
        .bind(id)
        .execute(&mut *conn)
        .await
        .map(drop)
        .map_err(|e| e.to_string())
}

async fn rows(db: &Db) -> i64 {
    sqlx::query_scalar("select count(*) from t").fetch_one(db.primary()).await.unwrap()
}

#[tokio::test]
async fn a_connection_terminated_while_idle_costs_no_caller_an_error() {
    let _t = mesh_testkit::init_telemetry();
    let infra = Infra::shared();
    let test_db = TestDb::new(infra).await.unwrap();
    let mut config = test_db.config.clone();
    let app = format!("idle-{}", test_db.schema);
    config.application_name = Some(app.clone());
    config.min_connections = 4;
    config.max_connections = 4;
    let (db, _registry) = connect(&config);
    create_table(&db).await;
    // Every pooled connection used once, then idle.
    let ids: Vec<i32> = (1..=4).collect();
    futures::future::join_all(ids.iter().map(|id| insert(&db, *id)))
        .await
        .into_iter()
        .for_each(|r| r.unwrap());

    // Terminate the pool's idle backends (not the monitor's: the monitor
    // would then find the server unreachable and drop the pool's
    // connections itself; here the server stays up all along).
    let mut admin = sqlx::PgConnection::connect(&infra.pg_admin_url(infra.pg_primary_port)).await.unwrap();
    let killed: i64 = sqlx::query_scalar(
        "select count(*) from (select pg_terminate_backend(pid) from pg_stat_activity
         where application_name = $1 and state = 'idle' and query like 'insert into t%') k",
    )
    .bind(&app)
    .fetch_one(&mut admin)
    .await
    .unwrap();
    assert!(killed >= 1, "no idle pool connection to terminate");
    // What the ping of a connection idle past the threshold costs.
    let mut took: Vec<Duration> = Vec::new();
    for _ in 0..200 {
        let start = Instant::now();
        admin.ping().await.unwrap();
        took.push(start.elapsed());
    }
    took.sort();
    eprintln!("ping round trip: median {:?}, p99 {:?}", took[100], took[198]);
    // The connections must sit idle past the threshold for the ping to be due.
    tokio::time::sleep(PING_IDLE_AFTER + Duration::from_millis(50)).await;

    for id in 10..14 {
        insert(&db, id)
            .await
            .unwrap_or_else(|e| panic!("insert {id} after {killed} backends died idle: {e}"));
    }
    assert_eq!(rows(&db).await, 8, "every insert ran exactly once");
}

#[tokio::test]
async fn a_primary_restart_costs_the_first_write_no_error() {
    let _t = mesh_testkit::init_telemetry();
    let private = PrivateInfra::new();
    private.start_pg().await.unwrap();
    let test_db = TestDb::new(&private.infra).await.unwrap();
    let mut config = test_db.config.clone();
    config.min_connections = 4;
    config.max_connections = 4;
    let (db, _registry) = connect(&config);
    create_table(&db).await;
    futures::future::join_all((1..=4).map(|id| insert(&db, id))).await.into_iter().for_each(|r| r.unwrap());

    let admin_url = private.infra.pg_admin_url(private.infra.pg_primary_port);
    let stopping = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap();
    let stop_started = Instant::now();
    private.stop_pg_primary().await.unwrap();
    let stopped_after = stop_started.elapsed();
    private.start_pg().await.unwrap();
    let mut admin = sqlx::PgConnection::connect(&admin_url).await.unwrap();
    let started: f64 = sqlx::query_scalar("select extract(epoch from pg_postmaster_start_time())::float8")
        .fetch_one(&mut admin)
        .await
        .unwrap();
    let gap = Duration::from_secs_f64(started).saturating_sub(stopping);
    eprintln!(
        "primary restart: fast shutdown took {stopped_after:?}, new postmaster {gap:?} after the stop began"
    );
    assert!(gap > PING_IDLE_AFTER, "a restart shorter than PING_IDLE_AFTER: {gap:?}");

    // The first write once the monitor finds the primary again, on a pool
    // whose every connection the restart killed.
    eventually(Duration::from_secs(20), "the monitor finds the primary", || async {
        db.primary_up().then_some(())
    })
    .await;
    insert(&db, 100).await.expect("the first write after the restart");
    assert_eq!(rows(&db).await, 5, "every insert ran exactly once");
}

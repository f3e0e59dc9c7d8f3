//! Read routing on a private primary + replica the tests delay and stop.

use std::time::{Duration, Instant};

use mesh_db::{DbError, Lsn, ServedBy};
use mesh_testkit::{PrivateInfra, TestDb};

use crate::{connect, create_table, eventually, read_v, reads, write_v};

async fn private() -> (PrivateInfra, TestDb) {
    let private = PrivateInfra::new();
    private.start_pg().await.unwrap();
    let db = TestDb::new(&private.infra).await.unwrap();
    (private, db)
}

#[tokio::test]
async fn a_token_is_read_only_where_it_has_been_replayed() {
    let _t = mesh_testkit::init_telemetry();
    let (private, test_db) = private().await;
    let mut config = test_db.config.clone();
    config.max_replica_delay = Duration::from_secs(600);
    let (db, registry) = connect(&config);
    create_table(&db).await;
    let t1 = write_v(&db, 1).await;
    // Without a token: a healthy replica, once the monitor has seen it.
    eventually(Duration::from_secs(20), "the replica serves v1", || async {
        let r = read_v(&db, Some(t1)).await;
        (r.served_by == ServedBy::Replica && r.value == 1).then_some(())
    })
    .await;

    private.delay_replica(Duration::from_secs(3)).await.unwrap();
    // Reads in the wait above may have found the replica behind t1 too.
    let before = reads(&registry, ServedBy::Primary, "replica_behind_token");
    for v in 2..=5 {
        let t = write_v(&db, v).await;
        let r = read_v(&db, Some(t)).await;
        assert_eq!((r.value, r.served_by), (v, ServedBy::Primary), "the token's write, from the primary");
        let stale = read_v(&db, None).await;
        assert_eq!((stale.value, stale.served_by), (1, ServedBy::Replica), "no token: the replica, stale");
    }
    assert_eq!(reads(&registry, ServedBy::Primary, "replica_behind_token") - before, 4.0);

    // A token is served by the replica as soon as it has replayed it; here
    // the read waits for it (the replay is due within the bounded wait).
    let t = write_v(&db, 6).await;
    private.delay_replica(Duration::ZERO).await.unwrap();
    eventually(Duration::from_secs(20), "the replica serves the token", || async {
        let r = read_v(&db, Some(t)).await;
        assert_eq!(r.value, 6, "never an older value with the token");
        (r.served_by == ServedBy::Replica).then_some(())
    })
    .await;

    // A token from the future costs the bounded wait, then the primary answers.
    let start = Instant::now();
    let r = read_v(&db, Some(Lsn(u64::MAX / 2))).await;
    assert_eq!((r.value, r.served_by), (6, ServedBy::Primary));
    assert!(start.elapsed() < Duration::from_secs(5), "{:?}", start.elapsed());
}

#[tokio::test]
async fn a_replica_behind_by_more_bytes_than_the_bound_is_left_out_until_it_catches_up() {
    let _t = mesh_testkit::init_telemetry();
    let (private, test_db) = private().await;
    let mut config = test_db.config.clone();
    config.max_replica_lag_bytes = 64 * 1024;
    config.max_replica_delay = Duration::from_secs(600);
    let (db, registry) = connect(&config);
    create_table(&db).await;
    write_v(&db, 1).await;
    eventually(Duration::from_secs(20), "the replica is healthy", || async {
        db.any_replica_healthy().then_some(())
    })
    .await;

    private.delay_replica(Duration::from_secs(3)).await.unwrap();
    // The replica holds this commit for 3 s (the delay applies to commit
    // records), and with it about 1 MB of WAL that follows, received but
    // not replayed.
    write_v(&db, 2).await;
    let mut conn = db.write().await.unwrap();
    sqlx::query("create table filler as select g, repeat('x', 100) as pad from generate_series(1, 8000) g")
        .execute(&mut *conn)
        .await
        .unwrap();
    drop(conn);
    eventually(Duration::from_secs(10), "the replica is left out", || async {
        (!db.any_replica_healthy()).then_some(())
    })
    .await;
    let r = read_v(&db, None).await;
    assert_eq!((r.value, r.served_by), (2, ServedBy::Primary));
    assert!(reads(&registry, ServedBy::Primary, "replicas_unhealthy") >= 1.0);
    private.delay_replica(Duration::ZERO).await.unwrap();
    eventually(Duration::from_secs(20), "the replica is back", || async {
        let r = read_v(&db, None).await;
        (r.served_by == ServedBy::Replica && r.value == 2).then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_failed_replica_is_replaced_by_the_primary_and_a_down_primary_fails_writes_fast() {
    let _t = mesh_testkit::init_telemetry();
    let (private, test_db) = private().await;
    let mut config = test_db.config.clone();
    config.acquire_timeout = std::time::Duration::from_secs(30);
    let (db, registry) = connect(&config);
    create_table(&db).await;
    let t = write_v(&db, 1).await;
    eventually(Duration::from_secs(20), "the replica serves reads", || async {
        (read_v(&db, Some(t)).await.served_by == ServedBy::Replica).then_some(())
    })
    .await;

    // Replica stopped: no read fails; they move to the primary.
    private.stop_pg_replica().await.unwrap();
    for _ in 0..10 {
        assert_eq!(read_v(&db, None).await.value, 1);
    }
    eventually(Duration::from_secs(10), "reads on the primary", || async {
        (read_v(&db, None).await.served_by == ServedBy::Primary).then_some(())
    })
    .await;
    let fallbacks = reads(&registry, ServedBy::Primary, "replica_failed")
        + reads(&registry, ServedBy::Primary, "replicas_unhealthy");
    assert!(fallbacks >= 1.0);

    // Primary stopped too: a connection fails at once, not after the 30 s acquire timeout.
    private.stop_pg_primary().await.unwrap();
    eventually(Duration::from_secs(10), "the monitor finds the primary down", || async {
        (!db.primary_up()).then_some(())
    })
    .await;
    let start = Instant::now();
    let e = db.write().await.unwrap_err();
    assert!(matches!(e, DbError::ServerDown { .. }), "{e}");
    assert!(e.is_unavailable());
    assert!(start.elapsed() < Duration::from_secs(1), "{:?}", start.elapsed());

    private.start_pg().await.unwrap();
    eventually(Duration::from_secs(30), "writes and replica reads work again", || async {
        if !db.primary_up() {
            return None;
        }
        let t = write_v(&db, 2).await;
        let r = read_v(&db, Some(t)).await;
        (r.value == 2 && r.served_by == ServedBy::Replica).then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_replica_replaying_a_long_write_is_not_taken_for_a_stale_one() {
    let _t = mesh_testkit::init_telemetry();
    let (_private, test_db) = private().await;
    let mut config = test_db.config.clone();
    // Only the time bound matters here: 1 s, a fifth of the default, yet
    // above how long a replica busy with the load may go between replaying
    // records on a loaded machine.
    config.max_replica_delay = Duration::from_secs(1);
    config.max_replica_lag_bytes = 1 << 30;
    // The bulk load may take longer than the default 10 s on a busy machine;
    // how long it takes is not what this test is about.
    config.statement_timeout = Duration::from_secs(300);
    let (db, _registry) = connect(&config);
    create_table(&db).await;
    write_v(&db, 1).await;
    eventually(Duration::from_secs(20), "the replica is healthy", || async {
        db.any_replica_healthy().then_some(())
    })
    .await;
    // Seconds of WAL without a commit (a bulk load, an index build): the
    // last replayed commit grows old, but the replica keeps up.
    let load = tokio::spawn({
        let db = db.clone();
        async move {
            let mut conn = db.write().await.unwrap();
            sqlx::query(
                "create table bulk as select g, md5(g::text) as h from generate_series(1, 3000000) g",
            )
            .execute(&mut *conn)
            .await
            .unwrap();
        }
    });
    let mut polls = 0;
    while !load.is_finished() {
        assert!(db.any_replica_healthy(), "a replica keeping up was left out during a long write");
        polls += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    load.await.unwrap();
    assert!(polls >= 40, "the write took {polls} polls (50 ms each): too short to outlast the 1 s bound");
}

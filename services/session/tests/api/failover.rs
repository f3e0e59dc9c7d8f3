//! A Redis master dies while sessions are being created and revoked: after
//! the failover every acknowledged session is still there and every
//! acknowledged revocation still holds; the validation cache was off while
//! its subscriptions were in doubt.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use mesh_proto::session::{RevokeSessionRequest, revoke_session_request::Target};
use mesh_testkit::{PrivateInfra, redis_prefix};
use tonic::Code;

use crate::helpers::{Fixture, config_with_prefix, create_req, eventually, validate};

/// What the writer saw acknowledged.
#[derive(Debug, Default)]
struct Acked {
    live: Vec<String>,
    revoked: Vec<String>,
    failed: usize,
}

#[tokio::test]
async fn a_master_failover_loses_no_session_and_no_revocation() {
    let _t = mesh_testkit::init_telemetry();
    let private = PrivateInfra::new();
    private.start_redis().await.unwrap();
    let prefix = redis_prefix();
    let f = Fixture::new(config_with_prefix(&private.infra, &prefix)).await;

    // Creates (every third revoked at once) for 60 users, so every master
    // holds some, back to back while the master dies and the cluster fails over.
    let stop = Arc::new(AtomicBool::new(false));
    let successes = Arc::new(AtomicUsize::new(0));
    let writer = tokio::spawn({
        let (mut c, stop, successes) = (f.c.clone(), stop.clone(), successes.clone());
        async move {
            let mut acked = Acked::default();
            let mut n = 0usize;
            while !stop.load(Ordering::SeqCst) {
                n += 1;
                let mut req = tonic::Request::new(create_req(&format!("user-{}", n % 60), "10.0.0.1"));
                req.set_timeout(Duration::from_secs(2));
                let Ok(made) = c.create_session(req).await else {
                    acked.failed += 1;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                };
                let made = made.into_inner();
                if n.is_multiple_of(3) {
                    let id = made.session.as_ref().unwrap().id.clone();
                    let mut req = tonic::Request::new(RevokeSessionRequest {
                        target: Some(Target::SessionId(id)),
                        client: None,
                    });
                    req.set_timeout(Duration::from_secs(2));
                    match c.revoke_session(req).await {
                        Ok(r) if r.get_ref().revoked => acked.revoked.push(made.token),
                        // Unknown outcome: the token is in neither list.
                        _ => acked.failed += 1,
                    }
                } else {
                    acked.live.push(made.token);
                }
                successes.fetch_add(1, Ordering::SeqCst);
            }
            acked
        }
    });

    eventually(Duration::from_secs(20), "sessions are being created", || async {
        (successes.load(Ordering::SeqCst) >= 60).then_some(())
    })
    .await;
    let dead = private.redis_masters().await.unwrap()[0];
    private.kill_redis_node(dead).unwrap();
    let at_kill = successes.load(Ordering::SeqCst);

    // The cache goes off while the dead master's channels cannot be subscribed…
    eventually(Duration::from_secs(20), "the cache turns off", || async {
        (f.metric("mesh_session_cache_enabled", &[]).await == 0.0).then_some(())
    })
    .await;
    // …the cluster fails over, creates succeed again in every slot…
    eventually(Duration::from_secs(60), "the cluster fails over", || async {
        let masters = private.redis_masters().await.ok()?;
        (masters.len() == 3 && !masters.contains(&dead)).then_some(())
    })
    .await;
    eventually(Duration::from_secs(60), "writes resume", || async {
        (successes.load(Ordering::SeqCst) >= at_kill + 120).then_some(())
    })
    .await;
    // …and the cache comes back once every channel is subscribed again.
    eventually(Duration::from_secs(30), "the cache turns on again", || async {
        (f.metric("mesh_session_cache_enabled", &[]).await == 1.0).then_some(())
    })
    .await;
    stop.store(true, Ordering::SeqCst);
    let acked = writer.await.unwrap();
    assert!(acked.failed > 0, "the writer never noticed the failover");

    // A fresh instance (nothing cached) and the old one agree with what was acknowledged.
    let mut config = config_with_prefix(&private.infra, &prefix);
    config.session.cache_max_bytes = 0;
    let mut fresh = Fixture::new(config).await;
    let mut old = f.c.clone();
    for t in &acked.live {
        assert!(validate(&mut fresh.c, t, false).await.is_ok(), "an acknowledged session was lost");
        assert!(validate(&mut old, t, false).await.is_ok());
    }
    for t in &acked.revoked {
        assert_eq!(
            validate(&mut fresh.c, t, false).await,
            Err(Code::Unauthenticated),
            "a revocation was lost"
        );
        assert_eq!(validate(&mut old, t, false).await, Err(Code::Unauthenticated));
    }
    // Revocations on the failed-over shard stay UNAVAILABLE: its new master
    // has no replica (the old one is dead), and a revocation is acknowledged
    // only once a replica holds it. The other two shards keep acknowledging.
    assert!(
        acked.live.len() >= 120 && acked.revoked.len() >= 40,
        "{} live, {} revoked",
        acked.live.len(),
        acked.revoked.len()
    );
    eprintln!("{} live and {} revoked sessions survived the failover", acked.live.len(), acked.revoked.len());
    fresh.app.stop().await.unwrap();
    f.app.stop().await.unwrap();
}

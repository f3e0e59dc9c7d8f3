//! Revocations are acknowledged only once a replica holds them, `WAIT`
//! holds up no other command, and an instance whose invalidation
//! subscriptions are cut serves nothing from its cache until it has
//! resubscribed.

use std::time::{Duration, Instant};

use mesh_proto::session::{RevokeSessionRequest, RevokeUserSessionsRequest, revoke_session_request::Target};
use mesh_testkit::{PrivateInfra, redis_prefix};
use tonic::Code;

use crate::{
    helpers::{Fixture, config_with_prefix, create, eventually, validate},
    reshard::bucket_keys,
};

fn by_token(token: &str) -> RevokeSessionRequest {
    RevokeSessionRequest { target: Some(Target::Token(token.to_owned())), client: None }
}

#[tokio::test]
async fn a_revocation_no_replica_holds_is_unavailable_until_retried_after_recovery() {
    let _t = mesh_testkit::init_telemetry();
    let private = PrivateInfra::new();
    private.start_redis().await.unwrap();
    let prefix = redis_prefix();
    let mut f = Fixture::new(config_with_prefix(&private.infra, &prefix)).await;

    let victim = create(&mut f.c, "alice").await;
    let also = create(&mut f.c, "alice").await;
    let (_, master, _) = bucket_keys(&private, &prefix, "alice").await;
    let replica = private.redis_replica_of(master).await.unwrap();
    // Users whose sessions live on the other masters.
    let mut elsewhere = Vec::new();
    for n in 0.. {
        let user = format!("bob-{n}");
        let s = create(&mut f.c, &user).await;
        if bucket_keys(&private, &prefix, &user).await.1 != master {
            elsewhere.push(s.token);
        }
        if elsewhere.len() == 10 {
            break;
        }
    }

    private.pause_redis_node(replica, true).unwrap();
    let mut revoke_user = RevokeUserSessionsRequest { user_id: "alice".into(), ..Default::default() };
    revoke_user.except_session_id = Some(victim.session.as_ref().unwrap().id.clone());
    let refused = f.c.revoke_session(by_token(&victim.token)).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable, "acknowledged without a replica: {refused:?}");
    let refused = f.c.revoke_user_sessions(revoke_user.clone()).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable, "acknowledged without a replica: {refused:?}");

    // Meanwhile changes on the other masters and reads everywhere are not
    // held up behind the WAITs on the stalled shard.
    let stalled = tokio::spawn({
        let (mut c, token) = (f.c.clone(), also.token.clone());
        async move {
            for _ in 0..10 {
                let _ = c.revoke_session(by_token(&token)).await;
            }
        }
    });
    let mut slowest = Duration::ZERO;
    for token in &elsewhere {
        let start = Instant::now();
        f.c.revoke_session(by_token(token)).await.expect("a revocation on a healthy shard succeeds");
        slowest = slowest.max(start.elapsed());
    }
    stalled.await.unwrap();
    eprintln!("slowest revocation on a healthy shard while another stalled: {slowest:?}");
    assert!(slowest < Duration::from_millis(100), "held up behind another shard's WAIT: {slowest:?}");

    private.pause_redis_node(replica, false).unwrap();
    // Sent again once the replica is back: acknowledged, and in force.
    eventually(Duration::from_secs(10), "the retried revocation is acknowledged", || async {
        let mut c = f.c.clone();
        c.revoke_session(by_token(&victim.token)).await.ok()?;
        c.revoke_user_sessions(revoke_user.clone()).await.ok()
    })
    .await;
    assert_eq!(validate(&mut f.c, &victim.token, false).await, Err(Code::Unauthenticated));
    assert_eq!(validate(&mut f.c, &also.token, false).await, Err(Code::Unauthenticated));
    // And a replica holds it: the replica's copy of the pointer is gone.
    let pointers = private
        .redis_cli(replica, &["--scan", "--pattern", &format!("{prefix}*t:*")])
        .await
        .unwrap()
        .lines()
        .filter(|l| !l.is_empty())
        .count();
    eprintln!("{pointers} token pointers left on the replica");
    f.app.stop().await.unwrap();
}

#[tokio::test]
async fn a_cut_invalidation_subscription_turns_the_cache_off_until_resubscribed() {
    let _t = mesh_testkit::init_telemetry();
    let private = PrivateInfra::new();
    private.start_redis().await.unwrap();
    let prefix = redis_prefix();
    let mut f = Fixture::new(config_with_prefix(&private.infra, &prefix)).await;
    let s = create(&mut f.c, "carol").await;
    assert!(validate(&mut f.c, &s.token, false).await.is_ok());
    assert!(validate(&mut f.c, &s.token, false).await.is_ok());
    let hits = || f.metric("mesh_session_validations_total", &["result=\"valid\"", "source=\"cache\""]);
    assert!(hits().await >= 1.0, "served from the cache");

    // The subscriber's connections are cut, and the session is removed
    // behind the service's back (no invalidation is published for it).
    let resets = f.metric("mesh_session_cache_resets_total", &[]).await;
    for m in private.redis_masters().await.unwrap() {
        private.redis_cli(m, &["client", "kill", "type", "pubsub"]).await.unwrap();
    }
    let (_, master, keys) = bucket_keys(&private, &prefix, "carol").await;
    let mut del = vec!["del"];
    del.extend(keys.iter().map(String::as_str));
    private.redis_cli(master, &del).await.unwrap();

    eventually(Duration::from_secs(10), "the cache is reset", || async {
        let now = mesh_testkit::scrape_metrics(f.app.metrics_addr).await.ok()?;
        let total: f64 = now
            .lines()
            .filter(|l| l.starts_with("mesh_session_cache_resets_total"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum();
        (total > resets).then_some(())
    })
    .await;
    assert_eq!(
        validate(&mut f.c, &s.token, false).await,
        Err(Code::Unauthenticated),
        "served from a stale cache"
    );
    // Resubscribed: the cache is on again.
    crate::helpers::cache_on(&f.app).await;
    assert_eq!(validate(&mut f.c, &s.token, false).await, Err(Code::Unauthenticated));
    f.app.stop().await.unwrap();
}

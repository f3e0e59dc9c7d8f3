//! Several instances share sessions through the Redis Cluster, and each one's
//! validation cache hears every other one's revocations at once.

use mesh_proto::session::{
    RefreshSessionRequest, RevokeSessionRequest, RevokeUserSessionsRequest, revoke_session_request::Target,
};
use mesh_testkit::{Infra, redis_prefix};
use tonic::Code;

use crate::helpers::{Fixture, config_with_prefix, create, validate};

#[tokio::test]
async fn two_instances_see_each_others_revocations_at_once() {
    let _t = mesh_testkit::init_telemetry();
    let prefix = redis_prefix();
    let mut a = Fixture::new(config_with_prefix(Infra::shared(), &prefix)).await;
    let mut b = Fixture::new(config_with_prefix(Infra::shared(), &prefix)).await;

    for round in 0..40 {
        let user = format!("user-{round}");
        let s = create(&mut a.c, &user).await;
        let id = s.session.as_ref().unwrap().id.clone();
        // B learns the session from Redis, then answers it from its cache.
        assert_eq!(validate(&mut b.c, &s.token, false).await.unwrap().id, id);
        assert_eq!(validate(&mut b.c, &s.token, true).await.unwrap().id, id);
        // Every way of ending a token, on A; B must refuse it on the very next call.
        match round % 4 {
            0 => {
                let r = RevokeSessionRequest { target: Some(Target::SessionId(id.clone())), client: None };
                assert!(a.c.revoke_session(r).await.unwrap().into_inner().revoked);
            }
            1 => {
                let r = RevokeSessionRequest { target: Some(Target::Token(s.token.clone())), client: None };
                assert!(a.c.revoke_session(r).await.unwrap().into_inner().revoked);
            }
            2 => {
                let r = RevokeUserSessionsRequest { user_id: user.clone(), ..Default::default() };
                assert_eq!(a.c.revoke_user_sessions(r).await.unwrap().into_inner().revoked, 1);
            }
            _ => {
                let r = RefreshSessionRequest { token: s.token.clone(), client: None };
                let new = a.c.refresh_session(r).await.unwrap().into_inner();
                assert_eq!(validate(&mut b.c, &new.token, false).await.unwrap().id, id);
            }
        }
        assert_eq!(validate(&mut b.c, &s.token, false).await, Err(Code::Unauthenticated), "round {round}");
        assert_eq!(validate(&mut b.c, &s.token, true).await, Err(Code::Unauthenticated), "round {round}");
        // And the other way round: B revokes what A holds in its cache.
        let t = create(&mut b.c, &user).await;
        assert!(validate(&mut a.c, &t.token, false).await.is_ok());
        assert!(validate(&mut a.c, &t.token, false).await.is_ok());
        let r = RevokeSessionRequest { target: Some(Target::Token(t.token.clone())), client: None };
        assert!(b.c.revoke_session(r).await.unwrap().into_inner().revoked);
        assert_eq!(validate(&mut a.c, &t.token, false).await, Err(Code::Unauthenticated), "round {round}");
    }

    // The cache was really in play on both sides, and heard the other side.
    for (name, f) in [("a", &a), ("b", &b)] {
        let hits =
            f.metric("mesh_session_validations_total", &["result=\"valid\"", "source=\"cache\""]).await;
        assert!(hits >= 40.0, "{name}: {hits} cache hits");
        assert!(f.metric("mesh_session_cache_invalidations_total", &[]).await >= 40.0, "{name}");
        assert_eq!(f.metric("mesh_session_cache_enabled", &[]).await, 1.0, "{name}");
        // Every revocation waited until both caches had dropped the token.
        assert!(
            f.metric("mesh_session_revocation_acks_total", &["result=\"complete\""]).await >= 40.0,
            "{name}"
        );
        assert_eq!(
            f.metric("mesh_session_revocation_acks_total", &["result=\"timeout\""]).await,
            0.0,
            "{name}"
        );
    }
    a.app.stop().await.unwrap();
    b.app.stop().await.unwrap();
}

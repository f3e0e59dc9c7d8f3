//! The session lifecycle against the real Redis Cluster: create, validate,
//! touch, refresh, revoke, revoke-all, list; expiry; the per-user cap; bad
//! input; what Redis holds.

use std::time::Duration;

use mesh_proto::session::{
    ClientInfo, CreateSessionRequest, ListUserSessionsRequest, RefreshSessionRequest, RevokeSessionRequest,
    RevokeUserSessionsRequest,
};
use mesh_session::token::{Bucket, Token};
use mesh_testkit::{Infra, redis_prefix};
use tonic::Code;
use tonic_types::StatusExt;

use crate::helpers::{
    Fixture, by_id, by_token, config, config_with_prefix, create, create_req, eventually, list, ms, now_ms,
    scan_cluster, validate,
};

#[tokio::test]
async fn create_validate_refresh_revoke_revoke_all_and_list() {
    let _t = mesh_testkit::init_telemetry();
    let mut f = Fixture::new(config(Infra::shared())).await;
    let user = "alice@example.com";

    let before = now_ms();
    let one = create(&mut f.c, user).await;
    // The change leased a write client and gave it back.
    assert_eq!(f.metric("mesh_session_write_lease_wait_seconds_count", &[]).await, 1.0);
    assert_eq!(f.metric("mesh_session_write_leases_in_use", &[]).await, 0.0);
    assert_eq!(f.metric("mesh_session_write_lease_timeouts_total", &[]).await, 0.0);
    let s = one.session.clone().unwrap();
    assert!(one.token.starts_with("msess_") && one.token.len() >= 43, "{}", one.token.len());
    assert!(s.id.starts_with("ses_"));
    assert_eq!(s.user_id, user);
    assert_eq!(s.attributes.get("device").map(String::as_str), Some("laptop"));
    let client = s.client.clone().unwrap();
    assert_eq!((client.ip.as_str(), client.user_agent.as_str()), ("10.1.2.3", "mesh-test/1.0"));
    let created = ms(&s.created_at);
    assert!(created >= before - 1000 && created <= now_ms() + 1000);
    assert_eq!(ms(&s.last_seen_at), created);
    assert_eq!(ms(&s.idle_expires_at), created + 30 * 60 * 1000, "default idle timeout");
    assert_eq!(ms(&s.absolute_expires_at), created + 12 * 3600 * 1000, "default absolute lifetime");

    // Validation answers the same session, from Redis and then from the cache.
    assert_eq!(validate(&mut f.c, &one.token, false).await.unwrap(), s);
    assert_eq!(validate(&mut f.c, &one.token, false).await.unwrap(), s);

    let two = create(&mut f.c, user).await;
    let three = create(&mut f.c, user).await;
    let ids = |r: &[&mesh_proto::session::CreateSessionResponse]| -> Vec<String> {
        r.iter().map(|x| x.session.as_ref().unwrap().id.clone()).collect()
    };
    assert_eq!(list(&mut f, user).await, ids(&[&three, &two, &one]), "newest first");
    let listed = f.c.list_user_sessions(ListUserSessionsRequest { user_id: user.into() }).await.unwrap();
    let first = &listed.into_inner().sessions[2];
    assert_eq!(first.client, s.client, "lists carry the client");

    // Refresh rotates: the old token is dead at once, the session lives on.
    let refreshed =
        f.c.refresh_session(RefreshSessionRequest { token: one.token.clone(), client: None })
            .await
            .unwrap()
            .into_inner();
    assert_ne!(refreshed.token, one.token);
    let rs = refreshed.session.unwrap();
    assert_eq!((rs.id.as_str(), ms(&rs.created_at)), (s.id.as_str(), created));
    assert!(ms(&rs.last_seen_at) >= ms(&s.last_seen_at));
    assert_eq!(validate(&mut f.c, &one.token, false).await, Err(Code::Unauthenticated));
    assert_eq!(validate(&mut f.c, &refreshed.token, false).await.unwrap().id, s.id);
    let again = f.c.refresh_session(RefreshSessionRequest { token: one.token.clone(), client: None }).await;
    assert_eq!(again.unwrap_err().code(), Code::Unauthenticated, "an old token cannot rotate again");

    // Revoke by id, then by token; a second revoke says it was gone.
    let two_id = two.session.as_ref().unwrap().id.clone();
    assert!(f.c.revoke_session(by_id(&two_id)).await.unwrap().into_inner().revoked);
    assert_eq!(validate(&mut f.c, &two.token, false).await, Err(Code::Unauthenticated));
    assert!(!f.c.revoke_session(by_id(&two_id)).await.unwrap().into_inner().revoked);
    assert!(f.c.revoke_session(by_token(&refreshed.token)).await.unwrap().into_inner().revoked);
    assert_eq!(validate(&mut f.c, &refreshed.token, false).await, Err(Code::Unauthenticated));
    assert!(!f.c.revoke_session(by_token(&refreshed.token)).await.unwrap().into_inner().revoked);
    assert_eq!(list(&mut f, user).await, ids(&[&three]));

    // Revoke all but one, then all.
    let four = create(&mut f.c, user).await;
    let five = create(&mut f.c, user).await;
    let keep = four.session.as_ref().unwrap().id.clone();
    let n =
        f.c.revoke_user_sessions(RevokeUserSessionsRequest {
            user_id: user.into(),
            except_session_id: Some(keep.clone()),
            client: None,
        })
        .await
        .unwrap()
        .into_inner()
        .revoked;
    assert_eq!(n, 2);
    for t in [&three.token, &five.token] {
        assert_eq!(validate(&mut f.c, t, false).await, Err(Code::Unauthenticated));
    }
    assert_eq!(validate(&mut f.c, &four.token, false).await.unwrap().id, keep);
    assert_eq!(list(&mut f, user).await, vec![keep]);
    let n =
        f.c.revoke_user_sessions(RevokeUserSessionsRequest { user_id: user.into(), ..Default::default() })
            .await
            .unwrap()
            .into_inner()
            .revoked;
    assert_eq!(n, 1);
    assert_eq!(validate(&mut f.c, &four.token, false).await, Err(Code::Unauthenticated));
    assert!(list(&mut f, user).await.is_empty());

    assert_eq!(f.metric("mesh_session_created_total", &[]).await, 5.0);
    assert_eq!(f.metric("mesh_session_ended_total", &["reason=\"revoke_all\""]).await, 3.0);
    assert!(f.metric("mesh_session_validations_total", &["source=\"cache\""]).await >= 1.0);
    assert!(f.metric("mesh_session_replica_waits_total", &["result=\"ok\""]).await >= 1.0);
    f.app.stop().await.unwrap();
}

#[tokio::test]
async fn touch_slides_idle_expiry_and_both_expiries_are_enforced() {
    let _t = mesh_testkit::init_telemetry();
    let prefix = redis_prefix();
    let mut f = Fixture::new(config_with_prefix(Infra::shared(), &prefix)).await;
    let short = |user: &str| CreateSessionRequest {
        idle_timeout: Some(prost_types::Duration { seconds: 2, nanos: 0 }),
        absolute_timeout: Some(prost_types::Duration { seconds: 5, nanos: 0 }),
        ..create_req(user, "10.0.0.1")
    };
    let kept = f.c.create_session(short("kept")).await.unwrap().into_inner();
    let idle = f.c.create_session(short("idle")).await.unwrap().into_inner();
    let k0 = kept.session.unwrap();
    let i0 = idle.session.unwrap();
    assert_eq!(ms(&k0.idle_expires_at), ms(&k0.created_at) + 2000);
    assert_eq!(ms(&k0.absolute_expires_at), ms(&k0.created_at) + 5000);

    // A touch slides the idle expiry; validation without touch does not.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let k1 = validate(&mut f.c, &kept.token, true).await.unwrap();
    assert!(ms(&k1.last_seen_at) > ms(&k0.last_seen_at));
    assert_eq!(ms(&k1.idle_expires_at), ms(&k1.last_seen_at) + 2000);
    let i1 = validate(&mut f.c, &idle.token, false).await.unwrap();
    assert_eq!(ms(&i1.idle_expires_at), ms(&i0.idle_expires_at));

    // The untouched one ends at its idle expiry, not before; the touched one
    // lives on, touched, until its absolute expiry, not before.
    let idle_end = ms(&i0.idle_expires_at);
    let (mut idle_dead, mut kept_after_idle_dead) = (None, false);
    let kept_end = loop {
        match validate(&mut f.c, &kept.token, true).await {
            Ok(s) => {
                assert!(
                    ms(&s.idle_expires_at) <= ms(&s.absolute_expires_at),
                    "never past the absolute expiry"
                );
                kept_after_idle_dead |= idle_dead.is_some();
            }
            Err(code) => {
                assert_eq!(code, Code::Unauthenticated);
                break now_ms();
            }
        }
        if idle_dead.is_none() && validate(&mut f.c, &idle.token, false).await.is_err() {
            idle_dead = Some(now_ms());
        }
        assert!(
            now_ms() < ms(&k0.absolute_expires_at) + 5000,
            "the touched session outlived its absolute expiry"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let idle_dead = idle_dead.expect("the untouched session ended");
    assert!(idle_dead >= idle_end - 50, "ended {} ms before its idle expiry", idle_end - idle_dead);
    assert!(kept_end >= ms(&k0.absolute_expires_at) - 50, "ended before its absolute expiry");
    assert!(kept_after_idle_dead, "touching kept a session alive past another's idle expiry");

    // Nothing of either session is left in Redis (only their audit events wait).
    eventually(Duration::from_secs(5), "session keys expire", || async {
        let keys = scan_cluster(&Infra::shared().redis_ports, &prefix);
        keys.iter().all(|k| k.name.ends_with("}:o")).then_some(())
    })
    .await;
    assert!(
        f.c.list_user_sessions(ListUserSessionsRequest { user_id: "kept".into() })
            .await
            .unwrap()
            .into_inner()
            .sessions
            .is_empty()
    );
    f.app.stop().await.unwrap();
}

#[tokio::test]
async fn the_oldest_session_is_evicted_beyond_the_cap() {
    let _t = mesh_testkit::init_telemetry();
    let mut config = config(Infra::shared());
    config.session.max_per_user = 3;
    let mut f = Fixture::new(config).await;
    let mut made = Vec::new();
    for _ in 0..3 {
        made.push(create(&mut f.c, "bob").await);
    }
    let other = create(&mut f.c, "carol").await;
    // Cached on this instance: eviction must reach the cache too.
    assert!(validate(&mut f.c, &made[0].token, false).await.is_ok());
    made.push(create(&mut f.c, "bob").await);
    assert_eq!(validate(&mut f.c, &made[0].token, false).await, Err(Code::Unauthenticated));
    for m in &made[1..] {
        assert!(validate(&mut f.c, &m.token, false).await.is_ok());
    }
    let want: Vec<String> = made[1..].iter().rev().map(|m| m.session.as_ref().unwrap().id.clone()).collect();
    assert_eq!(list(&mut f, "bob").await, want);
    assert!(validate(&mut f.c, &other.token, false).await.is_ok(), "other users are not affected");
    assert_eq!(f.metric("mesh_session_ended_total", &["reason=\"evict\""]).await, 1.0);
    f.app.stop().await.unwrap();
}

#[tokio::test]
async fn bad_input_is_invalid_argument_with_field_violations_and_writes_nothing() {
    let _t = mesh_testkit::init_telemetry();
    let prefix = redis_prefix();
    let mut f = Fixture::new(config_with_prefix(Infra::shared(), &prefix)).await;
    let secs = |s: i64| Some(prost_types::Duration { seconds: s, nanos: 0 });
    let cases: Vec<(CreateSessionRequest, &[&str])> = vec![
        (CreateSessionRequest { user_id: String::new(), ..create_req("x", "10.0.0.1") }, &["user_id"]),
        (
            CreateSessionRequest {
                attributes: [("blob".to_owned(), "x".repeat(8 * 1024))].into(),
                ..create_req("u", "10.0.0.1")
            },
            &["attributes"],
        ),
        (CreateSessionRequest { idle_timeout: secs(0), ..create_req("u", "10.0.0.1") }, &["idle_timeout"]),
        (
            CreateSessionRequest { absolute_timeout: secs(400 * 24 * 3600), ..create_req("u", "10.0.0.1") },
            &["absolute_timeout"],
        ),
        (create_req("u", "10.0.0.300"), &["client.ip"]),
        (
            CreateSessionRequest {
                user_id: String::new(),
                idle_timeout: secs(-5),
                client: Some(ClientInfo { ip: "nope".into(), user_agent: String::new() }),
                ..Default::default()
            },
            &["user_id", "idle_timeout", "client.ip"],
        ),
    ];
    for (req, fields) in cases {
        let s = f.c.create_session(req).await.unwrap_err();
        assert_eq!(s.code(), Code::InvalidArgument, "{}", s.message());
        let got: Vec<String> = s
            .get_details_bad_request()
            .expect("BadRequest")
            .field_violations
            .into_iter()
            .map(|v| v.field)
            .collect();
        assert_eq!(got, *fields, "{}", s.message());
        assert!(s.message().starts_with("invalid request: "), "{}", s.message());
    }
    let s = f.c.revoke_session(RevokeSessionRequest { target: None, client: None }).await.unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument);
    let s = f.c.revoke_session(by_id("not-a-session-id")).await.unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument);
    let s = f.c.list_user_sessions(ListUserSessionsRequest { user_id: String::new() }).await.unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument);
    let s =
        f.c.revoke_user_sessions(RevokeUserSessionsRequest {
            user_id: "u".into(),
            except_session_id: Some("zzz".into()),
            client: None,
        })
        .await
        .unwrap_err();
    assert_eq!(s.get_details_bad_request().unwrap().field_violations[0].field, "except_session_id");
    assert!(scan_cluster(&Infra::shared().redis_ports, &prefix).is_empty(), "bad input wrote nothing");
    f.app.stop().await.unwrap();
}

#[tokio::test]
async fn malformed_unknown_revoked_and_expired_tokens_are_indistinguishable() {
    let _t = mesh_testkit::init_telemetry();
    let mut f = Fixture::new(config(Infra::shared())).await;
    let revoked = create(&mut f.c, "dave").await;
    f.c.revoke_session(by_token(&revoked.token)).await.unwrap();
    let expired =
        f.c.create_session(CreateSessionRequest {
            idle_timeout: Some(prost_types::Duration { seconds: 1, nanos: 0 }),
            ..create_req("dave", "10.0.0.1")
        })
        .await
        .unwrap()
        .into_inner();
    let unknown = Token::generate(Bucket::of_user("dave"));
    let mut tampered = revoked.token.clone().into_bytes();
    tampered[20] ^= 1;
    let tampered = String::from_utf8(tampered).unwrap();
    eventually(Duration::from_secs(10), "the short session expires", || async {
        validate(&mut f.c.clone(), &expired.token, false).await.is_err().then_some(())
    })
    .await;
    for t in ["", "garbage", &tampered, unknown.expose(), &revoked.token, &expired.token] {
        // `validate` also checks the one message.
        assert_eq!(validate(&mut f.c, t, false).await, Err(Code::Unauthenticated), "{t:?}");
        assert_eq!(validate(&mut f.c, t, true).await, Err(Code::Unauthenticated), "{t:?}");
        let s =
            f.c.refresh_session(RefreshSessionRequest { token: t.into(), client: None }).await.unwrap_err();
        assert_eq!((s.code(), s.message()), (Code::Unauthenticated, mesh_session::UNAUTHENTICATED));
        assert!(!f.c.revoke_session(by_token(t)).await.unwrap().into_inner().revoked);
    }
    f.app.stop().await.unwrap();
}

#[tokio::test]
async fn the_raw_token_is_in_no_redis_key_or_value_and_every_key_expires() {
    let _t = mesh_testkit::init_telemetry();
    let prefix = redis_prefix();
    let mut f = Fixture::new(config_with_prefix(Infra::shared(), &prefix)).await;
    let mut tokens = Vec::new();
    for user in ["erin", "frank", "grace"] {
        for _ in 0..2 {
            tokens.push(create(&mut f.c, user).await.token);
        }
    }
    let refreshed =
        f.c.refresh_session(RefreshSessionRequest { token: tokens[0].clone(), client: None }).await.unwrap();
    tokens.push(refreshed.into_inner().token);
    f.c.revoke_session(by_token(&tokens[1])).await.unwrap();
    validate(&mut f.c, &tokens[2], true).await.unwrap();

    let keys = scan_cluster(&Infra::shared().redis_ports, &prefix);
    let kinds: std::collections::BTreeSet<&str> = keys.iter().map(|k| k.kind.as_str()).collect();
    assert_eq!(kinds.into_iter().collect::<Vec<_>>(), ["hash", "stream", "string", "zset"], "{keys:#?}");
    for t in &tokens {
        // The whole token, and its secret part alone.
        let secret = &t[10..53];
        for k in &keys {
            assert!(!k.name.contains(t) && !k.content.contains(t), "token in {}", k.name);
            assert!(!k.name.contains(secret) && !k.content.contains(secret), "token secret in {}", k.name);
        }
    }
    for k in &keys {
        assert!(k.pttl > 0, "{} ({}) has no ttl: {}", k.name, k.kind, k.pttl);
    }
    // What is stored is the hash: the live token's pointer is there.
    let (_, h) = Token::parse(&tokens[6]).unwrap();
    assert!(keys.iter().any(|k| k.name.ends_with(&format!("t:{}", h.hex()))), "lookups go by SHA-256");
    f.app.stop().await.unwrap();
}

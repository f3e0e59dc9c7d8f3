//! Changes reach the real audit service through the outbox: with salted
//! token hashes only, the caller's request and trace ids, once each, also
//! when the audit service was down meanwhile.

use std::{collections::BTreeMap, net::SocketAddr, time::Duration};

use mesh_proto::{
    audit::{AuditEvent, EventFilter, Outcome, QueryRequest, audit_service_client::AuditServiceClient},
    session::{
        ClientInfo, RefreshSessionRequest, RevokeSessionRequest, RevokeUserSessionsRequest,
        revoke_session_request::Target,
    },
};
use mesh_runtime::ServerConfig;
use mesh_session::token::{AuditHasher, Token};
use mesh_testkit::{Infra, Running, TestDb, free_addr, redis_prefix, spawn};
use prost_types::value::Kind;

use crate::helpers::{AUDIT_KEY, Fixture, config_with_prefix, create_req, eventually, validate};

/// An audit service on `db`, listening on `addr`.
pub(crate) async fn spawn_audit(db: &TestDb, addr: SocketAddr) -> Running {
    let config = mesh_audit::Config {
        server: ServerConfig { listen_addr: addr, ..ServerConfig::for_tests() },
        db: db.config.clone(),
        audit: mesh_audit::AuditConfig::default(),
    };
    let app = mesh_audit::App::build(config).await.expect("audit builds");
    spawn(app.local_addr(), app.metrics_addr(), |sd| app.serve(sd))
}

/// Every event by `actor`, oldest first.
async fn events_of(addr: SocketAddr, actor: &str) -> Vec<AuditEvent> {
    let mut c = AuditServiceClient::new(mesh_testkit::channel(addr).await);
    let mut req = QueryRequest {
        filter: Some(EventFilter { actor_id: actor.into(), ..Default::default() }),
        page_size: 1000,
        page_token: String::new(),
    };
    let mut out = Vec::new();
    loop {
        let Ok(page) = c.query(req.clone()).await else { return Vec::new() };
        let page = page.into_inner();
        out.extend(page.events);
        if page.next_page_token.is_empty() {
            break;
        }
        req.page_token = page.next_page_token;
    }
    out.sort_by_key(|e| e.sequence);
    out
}

/// Waits until `actor` has exactly the `want` actions (in any order).
async fn wait_for_actions(addr: SocketAddr, actor: &str, want: &[&str]) -> Vec<AuditEvent> {
    let mut want: Vec<&str> = want.to_vec();
    want.sort_unstable();
    eventually(Duration::from_secs(30), &format!("audit events of {actor}"), || async {
        let events = events_of(addr, actor).await;
        let mut got: Vec<&str> = events.iter().map(|e| e.action.as_str()).collect();
        got.sort_unstable();
        (got == want).then(|| events.clone())
    })
    .await
}

fn meta(e: &AuditEvent, key: &str) -> Option<String> {
    match &e.metadata.as_ref()?.fields.get(key)?.kind {
        Some(Kind::StringValue(s)) => Some(s.clone()),
        _ => None,
    }
}

fn salted(token: &str) -> String {
    AuditHasher::new(AUDIT_KEY).hash(&Token::parse(token).expect("a token").1)
}

#[tokio::test]
async fn changes_reach_the_audit_log_with_salted_hashes_and_the_callers_ids() {
    let _t = mesh_testkit::init_telemetry();
    let db = TestDb::new(Infra::shared()).await.unwrap();
    let audit = spawn_audit(&db, ([127, 0, 0, 1], 0).into()).await;
    let mut config = config_with_prefix(Infra::shared(), &redis_prefix());
    config.clients.audit = Some(audit.addr.to_string().parse().unwrap());
    config.session.max_per_user = 2;
    let mut f = Fixture::new(config).await;
    let user = "peggy";

    let trace = "4bf92f3577b34da6a3ce929d0e4736aa";
    let mut req = tonic::Request::new(create_req(user, "192.0.2.10"));
    req.metadata_mut().insert("x-request-id", "req-create-1".parse().unwrap());
    req.metadata_mut().insert("traceparent", format!("00-{trace}-00f067aa0ba902b7-01").parse().unwrap());
    let one = f.c.create_session(req).await.unwrap().into_inner();
    let one_id = one.session.as_ref().unwrap().id.clone();

    let client = Some(ClientInfo { ip: "2001:db8::1".into(), user_agent: "refresher/2".into() });
    let refreshed =
        f.c.refresh_session(RefreshSessionRequest { token: one.token.clone(), client })
            .await
            .unwrap()
            .into_inner();
    let two = f.c.create_session(create_req(user, "192.0.2.10")).await.unwrap().into_inner();
    let two_id = two.session.as_ref().unwrap().id.clone();
    // The cap is 2: this one evicts the oldest (one, refreshed).
    let three = f.c.create_session(create_req(user, "192.0.2.10")).await.unwrap().into_inner();
    let three_id = three.session.as_ref().unwrap().id.clone();
    f.c.revoke_session(RevokeSessionRequest {
        target: Some(Target::SessionId(two_id.clone())),
        client: None,
    })
    .await
    .unwrap();
    let n =
        f.c.revoke_user_sessions(RevokeUserSessionsRequest { user_id: user.into(), ..Default::default() })
            .await
            .unwrap()
            .into_inner()
            .revoked;
    assert_eq!(n, 1);

    let events = wait_for_actions(
        audit.addr,
        user,
        &[
            "session.create",
            "session.refresh",
            "session.create",
            "session.create",
            "session.evict",
            "session.revoke",
            "session.revoke_all",
        ],
    )
    .await;
    let by: BTreeMap<(&str, &str), &AuditEvent> =
        events.iter().map(|e| ((e.action.as_str(), e.resource.as_ref().unwrap().id.as_str()), e)).collect();
    assert_eq!(by.len(), events.len(), "each change recorded once");

    let create = by[&("session.create", one_id.as_str())];
    let actor = create.actor.as_ref().unwrap();
    assert_eq!((actor.r#type.as_str(), actor.id.as_str()), ("user", user));
    assert_eq!(create.resource.as_ref().unwrap().r#type, "session");
    assert_eq!(create.outcome, Outcome::Success as i32);
    let source = create.source.as_ref().unwrap();
    assert_eq!(
        (source.ip.as_str(), source.user_agent.as_str(), source.service.as_str()),
        ("192.0.2.10", "mesh-test/1.0", mesh_session::SOURCE_SERVICE)
    );
    assert_eq!((create.request_id.as_str(), create.trace_id.as_str()), ("req-create-1", trace));
    assert_eq!(meta(create, "token_hash"), Some(salted(&one.token)));

    let refresh = by[&("session.refresh", one_id.as_str())];
    assert_eq!(meta(refresh, "previous_token_hash"), Some(salted(&one.token)));
    assert_eq!(meta(refresh, "token_hash"), Some(salted(&refreshed.token)));
    assert_eq!(refresh.source.as_ref().unwrap().ip, "2001:db8::1");
    assert_eq!(meta(by[&("session.evict", one_id.as_str())], "token_hash"), Some(salted(&refreshed.token)));
    assert_eq!(meta(by[&("session.evict", one_id.as_str())], "reason").as_deref(), Some("cap"));
    assert_eq!(meta(by[&("session.revoke", two_id.as_str())], "by").as_deref(), Some("session_id"));
    assert_eq!(
        meta(by[&("session.revoke_all", three_id.as_str())], "token_hash"),
        Some(salted(&three.token))
    );

    // No token, and no plain SHA-256 of one, ever reaches the audit log.
    let text = format!("{events:?}");
    for t in [&one.token, &refreshed.token, &two.token, &three.token] {
        assert!(!text.contains(t.as_str()));
        assert!(!text.contains(&Token::parse(t).unwrap().1.hex()));
    }
    eventually(Duration::from_secs(10), "the outbox empties", || async {
        (f.metric("mesh_session_outbox_depth", &[]).await == 0.0).then_some(())
    })
    .await;
    assert_eq!(f.metric("mesh_session_audit_events_total", &["result=\"delivered\""]).await, 7.0);
    f.app.stop().await.unwrap();
    audit.stop().await.unwrap();
}

#[tokio::test]
async fn audit_events_wait_out_an_audit_outage_and_arrive_once() {
    let _t = mesh_testkit::init_telemetry();
    let db = TestDb::new(Infra::shared()).await.unwrap();
    let addr = free_addr();
    let audit = spawn_audit(&db, addr).await;
    let prefix = redis_prefix();
    let mut config = config_with_prefix(Infra::shared(), &prefix);
    config.clients.audit = Some(addr.to_string().parse().unwrap());
    // Two instances drain the same outboxes.
    let mut a = Fixture::new(config.clone()).await;
    let b = Fixture::new(config).await;
    let user = "trent";

    let first = a.c.create_session(create_req(user, "10.0.0.1")).await.unwrap().into_inner();
    wait_for_actions(addr, user, &["session.create"]).await;

    audit.stop().await.unwrap();
    let mut tokens = Vec::new();
    for _ in 0..5 {
        tokens.push(a.c.create_session(create_req(user, "10.0.0.1")).await.unwrap().into_inner().token);
    }
    let rotated =
        a.c.refresh_session(RefreshSessionRequest { token: tokens[0].clone(), client: None }).await.unwrap();
    tokens[0] = rotated.into_inner().token;
    a.c.revoke_session(RevokeSessionRequest {
        target: Some(Target::Token(first.token.clone())),
        client: None,
    })
    .await
    .unwrap();
    // Validation never waits for the audit service.
    for t in &tokens {
        assert!(validate(&mut a.c, t, true).await.is_ok());
    }
    eventually(Duration::from_secs(10), "the outbox holds the events", || async {
        let depth = a.metric("mesh_session_outbox_depth", &[]).await;
        (depth == 7.0).then_some(())
    })
    .await;

    let audit = spawn_audit(&db, addr).await;
    let mut want = vec!["session.create"; 6];
    want.extend(["session.refresh", "session.revoke"]);
    let events = wait_for_actions(addr, user, &want).await;
    let mut keys: Vec<(&str, &str)> =
        events.iter().map(|e| (e.action.as_str(), e.resource.as_ref().unwrap().id.as_str())).collect();
    keys.sort_unstable();
    keys.dedup();
    assert_eq!(keys.len(), events.len(), "no event twice");
    // Nothing more arrives later either.
    for f in [&a, &b] {
        eventually(Duration::from_secs(10), "the outbox empties", || async {
            (f.metric("mesh_session_outbox_depth", &[]).await == 0.0).then_some(())
        })
        .await;
    }
    assert_eq!(events_of(addr, user).await.len(), 8);
    let delivered = a.metric("mesh_session_audit_events_total", &["result=\"delivered\""]).await
        + b.metric("mesh_session_audit_events_total", &["result=\"delivered\""]).await;
    assert!(delivered >= 8.0, "{delivered}");
    a.app.stop().await.unwrap();
    b.app.stop().await.unwrap();
    audit.stop().await.unwrap();
}

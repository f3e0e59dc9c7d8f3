//! Admin RPCs over mutual TLS, across the mesh: session's
//! RevokeUserSessions / ListUserSessions and ratelimit's Reset answer only
//! `MESH_ADMIN_IDENTITIES`; every refusal is PERMISSION_DENIED and lands in
//! the real audit service's log, sent by the service that refused it.

use std::time::Duration;

use mesh_proto::{
    audit::{AuditEvent, EventFilter, Outcome, QueryRequest, audit_service_client::AuditServiceClient},
    ratelimit::{Descriptor, Entry, ResetRequest, rate_limit_service_client::RateLimitServiceClient},
    session::{
        ListUserSessionsRequest, RevokeUserSessionsRequest, session_service_client::SessionServiceClient,
    },
};
use mesh_runtime::{ServerConfig, authz::AdminIdentities};
use mesh_testkit::{Infra, TestDb, redis_prefix, spawn, tls::TestPki};
use tonic::{Code, transport::Channel};
use tonic_health::pb::health_check_response::ServingStatus;

use crate::{
    audit::spawn_audit,
    helpers::{clients, config, eventually, spawn_app},
};

const OPS: &str = "spiffe://mesh.local/ns/default/sa/ops";
const DATA: &str = "spiffe://mesh.local/ns/default/sa/data";

fn admins() -> AdminIdentities {
    AdminIdentities(Some([OPS.to_owned()].into()))
}

/// The `authz.denied` events in the log at `addr`.
async fn denials(addr: std::net::SocketAddr) -> Vec<AuditEvent> {
    let mut c = AuditServiceClient::new(mesh_testkit::channel(addr).await);
    let filter = EventFilter { action: "authz.denied".into(), ..Default::default() };
    let req = QueryRequest { filter: Some(filter), page_size: 100, page_token: String::new() };
    c.query(req).await.map(|r| r.into_inner().events).unwrap_or_default()
}

/// A TLS channel as `name`, once the service behind it is ready.
async fn ready_channel(pki: &TestPki, name: &str, id: &str, addr: std::net::SocketAddr) -> Channel {
    let ch = pki.channel(name, id, addr).await;
    mesh_testkit::wait_for_health(&ch, "readiness", ServingStatus::Serving, Duration::from_secs(20))
        .await
        .unwrap();
    ch
}

#[tokio::test]
async fn refused_admin_rpcs_of_session_and_ratelimit_are_denied_and_audited() {
    let _t = mesh_testkit::init_telemetry();
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new(dir.path());
    let db = TestDb::new(Infra::shared()).await.unwrap();
    let audit = spawn_audit(&db, ([127, 0, 0, 1], 0).into()).await;
    let mut to_audit = clients();
    to_audit.audit = Some(audit.addr.to_string().parse().unwrap());

    let ratelimit = mesh_ratelimit::App::build(mesh_ratelimit::Config {
        server: ServerConfig {
            tls: Some(pki.tls_config("ratelimit", "spiffe://mesh.local/ns/default/sa/ratelimit")),
            admin_identities: admins(),
            ..ServerConfig::for_tests()
        },
        redis: Infra::shared().redis_config(&redis_prefix()),
        rules: None,
        engine: mesh_ratelimit::EngineConfig::default(),
        audit: Some(to_audit.clone()),
    })
    .await
    .expect("ratelimit builds");
    let ratelimit = spawn(ratelimit.local_addr(), ratelimit.metrics_addr(), |sd| ratelimit.serve(sd));

    let mut session_config = config(Infra::shared());
    session_config.server.tls = Some(pki.tls_config("session", "spiffe://mesh.local/ns/default/sa/session"));
    session_config.server.admin_identities = admins();
    session_config.clients = to_audit;
    let session = spawn_app(session_config).await;

    let mut data = SessionServiceClient::new(ready_channel(&pki, "data", DATA, session.addr).await);
    let mut ops = SessionServiceClient::new(ready_channel(&pki, "ops", OPS, session.addr).await);
    let mut data_rl = RateLimitServiceClient::new(ready_channel(&pki, "data", DATA, ratelimit.addr).await);
    let mut ops_rl = RateLimitServiceClient::new(ready_channel(&pki, "ops", OPS, ratelimit.addr).await);

    let revoke = || RevokeUserSessionsRequest { user_id: "alice".into(), ..Default::default() };
    let list = || ListUserSessionsRequest { user_id: "alice".into() };
    let reset = || ResetRequest {
        domain: "nowhere".into(),
        descriptor: Some(Descriptor {
            entries: vec![Entry { key: "user".into(), value: "alice".into() }],
            hits_addend: None,
        }),
    };

    // The admin passes the check (ratelimit then answers for the rules: none here).
    ops.revoke_user_sessions(revoke()).await.expect("admin revokes");
    ops.list_user_sessions(list()).await.expect("admin lists");
    assert_eq!(ops_rl.reset(reset()).await.unwrap_err().code(), Code::NotFound);

    // Anyone else is refused.
    for e in [
        data.revoke_user_sessions(revoke()).await.unwrap_err(),
        data.list_user_sessions(list()).await.unwrap_err(),
        data_rl.reset(reset()).await.unwrap_err(),
    ] {
        assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
        assert!(e.message().contains(DATA), "{e:?}");
    }

    // And each refusal is in the audit log, recorded by the service that refused it.
    let found = eventually(Duration::from_secs(20), "three refusals in the audit log", || async {
        let d = denials(audit.addr).await;
        (d.len() == 3).then_some(d)
    })
    .await;
    let mut seen: Vec<(String, String)> =
        found.iter().map(|e| (e.source.clone().unwrap().service, e.resource.clone().unwrap().id)).collect();
    seen.sort();
    assert_eq!(
        seen,
        [
            ("mesh-ratelimit".to_owned(), "/mesh.ratelimit.v1.RateLimitService/Reset".to_owned()),
            ("mesh-session".to_owned(), "/mesh.session.v1.SessionService/ListUserSessions".to_owned()),
            ("mesh-session".to_owned(), "/mesh.session.v1.SessionService/RevokeUserSessions".to_owned()),
        ]
    );
    for e in &found {
        assert_eq!((e.outcome, e.actor.clone().unwrap().id.as_str()), (Outcome::Denied as i32, DATA));
    }
}

//! The whole mesh over mutual TLS, as real processes: session, ratelimit,
//! audit and data each present a certificate of their own from one CA
//! (`MESH_REQUIRE_TLS=true`), dial each other over TLS, and every caller is
//! known by its certificate's `spiffe://` identity.

use std::{net::SocketAddr, time::Duration};

use mesh_proto::{
    audit::{
        Actor, AppendRequest, AuditEvent, EventFilter, Outcome, QueryRequest as AuditQuery, Resource, Source,
        audit_service_client::AuditServiceClient,
    },
    data::{GetRequest, PutRequest, data_service_client::DataServiceClient},
    ratelimit::{
        CheckRequest, Code, Descriptor, Entry, ResetRequest,
        rate_limit_service_client::RateLimitServiceClient,
    },
    session::{
        CreateSessionRequest, RevokeUserSessionsRequest, session_service_client::SessionServiceClient,
    },
};
use mesh_runtime::tls::TlsConfig;
use mesh_testkit::{
    Infra, TestDb, health_status,
    otlp::OtlpReceiver,
    tls::{TestPki, channel, plaintext_channel, refused_by_transport},
};
use serde_json::json;
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;

use crate::{
    helpers::{OPEN_RULES, SERVED, doc, eventually, stack},
    processes::{Service, redis_env, start},
};

const SESSION_ID: &str = "spiffe://mesh.local/ns/default/sa/session";
const RATELIMIT_ID: &str = "spiffe://mesh.local/ns/default/sa/ratelimit";
const AUDIT_ID: &str = "spiffe://mesh.local/ns/default/sa/audit";
const DATA_ID: &str = "spiffe://mesh.local/ns/default/sa/data";
/// Listed in every service's `MESH_ADMIN_IDENTITIES`.
const OPS_ID: &str = "spiffe://mesh.local/ns/default/sa/ops";
/// A certificate from the mesh's CA, not listed as an admin.
const INTRUDER_ID: &str = "spiffe://mesh.local/ns/default/sa/intruder";
const WAIT: Duration = Duration::from_secs(30);

const RATELIMIT_RESET: &str = "/mesh.ratelimit.v1.RateLimitService/Reset";
const SESSION_REVOKE_USER: &str = "/mesh.session.v1.SessionService/RevokeUserSessions";

/// One session per user and minute: a second CreateSession for the same
/// user is only refused if session's check reached ratelimit over TLS.
const SESSION_RULES: &str = r#"
domain: session
descriptors:
  - key: user_id
    rate_limit: { unit: minute, requests_per_unit: 1, name: create_per_user }
"#;

/// `MESH_TLS_*` for `name` / `id` from `pki`, TLS required, admins listed.
fn tls_env(pki: &TestPki, name: &str, id: &str) -> Vec<(String, String)> {
    let mut env = pki.env(name, id);
    env.extend([("MESH_REQUIRE_TLS".into(), "true".into()), ("MESH_ADMIN_IDENTITIES".into(), OPS_ID.into())]);
    env
}

/// Every audit event matching `filter`, read over `ch`.
async fn audit_events(ch: &Channel, filter: EventFilter) -> Vec<AuditEvent> {
    let req = AuditQuery { filter: Some(filter), page_size: 1000, page_token: String::new() };
    let mut events = AuditServiceClient::new(ch.clone())
        .query(req)
        .await
        .expect("audit query over tls")
        .into_inner()
        .events;
    events.sort_by_key(|e| e.sequence);
    events
}

/// Waits for the audit event matching `filter`, read over `ch`.
async fn audited(ch: &Channel, what: &str, filter: EventFilter) -> AuditEvent {
    eventually(WAIT, what, || {
        let (ch, filter) = (ch.clone(), filter.clone());
        async move { audit_events(&ch, filter).await.into_iter().next() }
    })
    .await
}

fn source_service(e: &AuditEvent) -> &str {
    e.source.as_ref().map(|s| s.service.as_str()).unwrap_or_default()
}

fn actor_id(e: &AuditEvent) -> &str {
    e.actor.as_ref().map(|a| a.id.as_str()).unwrap_or_default()
}

fn reset(user: &str) -> ResetRequest {
    ResetRequest {
        domain: "data".into(),
        descriptor: Some(Descriptor {
            entries: vec![Entry { key: "user_id".into(), value: user.into() }],
            hits_addend: None,
        }),
    }
}

fn revoke_user(user: &str) -> RevokeUserSessionsRequest {
    RevokeUserSessionsRequest { user_id: user.into(), ..Default::default() }
}

async fn create_session(ch: &Channel, user: &str) -> Result<String, tonic::Status> {
    let req = CreateSessionRequest { user_id: user.into(), ..Default::default() };
    Ok(SessionServiceClient::new(ch.clone()).create_session(req).await?.into_inner().token)
}

/// session, ratelimit, audit and data as processes over mutual TLS.
struct TlsMesh {
    pki: TestPki,
    session: Service,
    ratelimit: Service,
    audit: Service,
    data: Service,
    _dirs: (tempfile::TempDir, tempfile::TempDir),
    _dbs: (TestDb, TestDb),
}

impl TlsMesh {
    async fn start(otlp: &str) -> Self {
        let infra = Infra::shared();
        let pki_dir = tempfile::tempdir().unwrap();
        let pki = TestPki::new(pki_dir.path());
        // Plain host:port: the client dials TLS because MESH_TLS_* are set (https:// is refused).
        let at = |s: &Service| s.addr.to_string();

        let audit_db = TestDb::new(infra).await.unwrap();
        let mut env = infra.env(&audit_db.schema, "unused:");
        env.extend(tls_env(&pki, "audit", AUDIT_ID));
        let audit = start("mesh-audit", "mesh.audit.v1.AuditService", env, otlp, None).await;

        let rules = tempfile::tempdir().unwrap();
        std::fs::write(rules.path().join("data.yaml"), OPEN_RULES).unwrap();
        std::fs::write(rules.path().join("session.yaml"), SESSION_RULES).unwrap();
        let mut env = redis_env(infra);
        env.extend(tls_env(&pki, "ratelimit", RATELIMIT_ID));
        env.extend([
            ("MESH_RATELIMIT_RULES".into(), rules.path().display().to_string()),
            ("MESH_AUDIT_ADDR".into(), at(&audit)),
        ]);
        let ratelimit = start("mesh-ratelimit", "mesh.ratelimit.v1.RateLimitService", env, otlp, None).await;

        let mut env = redis_env(infra);
        env.extend(tls_env(&pki, "session", SESSION_ID));
        env.extend([
            ("MESH_RATELIMIT_ADDR".into(), at(&ratelimit)),
            ("MESH_AUDIT_ADDR".into(), at(&audit)),
            ("MESH_SESSION_OUTBOX_SWEEP_MS".into(), "200".into()),
        ]);
        let session = start("mesh-session", "mesh.session.v1.SessionService", env, otlp, None).await;

        let data_db = TestDb::new(infra).await.unwrap();
        let mut env = infra.env(&data_db.schema, "unused:");
        env.extend(tls_env(&pki, "data", DATA_ID));
        env.extend([
            ("MESH_SESSION_ADDR".into(), at(&session)),
            ("MESH_RATELIMIT_ADDR".into(), at(&ratelimit)),
            ("MESH_AUDIT_ADDR".into(), at(&audit)),
        ]);
        let data = start("mesh-data", SERVED[0], env, otlp, None).await;
        Self { pki, session, ratelimit, audit, data, _dirs: (pki_dir, rules), _dbs: (audit_db, data_db) }
    }

    fn services(&self) -> [(&'static str, &Service); 4] {
        [
            ("session", &self.session),
            ("ratelimit", &self.ratelimit),
            ("audit", &self.audit),
            ("data", &self.data),
        ]
    }

    async fn stop(self) {
        for s in [self.data, self.session, self.ratelimit, self.audit] {
            s.stop().await;
        }
    }
}

/// A data client over TLS presenting `tls`, sending `token`.
fn data_client(tls: &TlsConfig, addr: SocketAddr, token: &str) -> mesh_client::DataClient {
    let config = mesh_client::ClientConfig {
        session: None,
        ratelimit: None,
        audit: None,
        data: Some(addr.to_string().parse().unwrap()),
        stack: mesh_client::StackConfig { tls: Some(tls.clone()), ..stack() },
    };
    mesh_client::DataClient::from_config(&config, &mesh_client::ClientMetrics::default())
        .unwrap()
        .with_token(&token.to_owned().into())
        .unwrap()
}

#[tokio::test]
async fn the_whole_mesh_runs_over_mutual_tls_and_knows_its_callers() {
    let receiver = OtlpReceiver::start().await;
    let mesh = TlsMesh::start(&receiver.endpoint()).await;
    let tester = mesh.pki.tls_config("tester", "spiffe://mesh.local/ns/default/sa/tester");
    let to_audit = channel(&tester, mesh.audit.addr);

    // (a) The main path, every hop over TLS. CreateSession reaches ratelimit
    // (fail-closed): the second one for the same user is over the limit.
    let to_session = channel(&tester, mesh.session.addr);
    let token = create_session(&to_session, "olivia").await.expect("create session over tls");
    let err = create_session(&to_session, "olivia").await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "session → ratelimit over tls: {err}");
    // data validates the token with session, checks ratelimit, audits the write.
    let c = data_client(&tester, mesh.data.addr, &token);
    let put = c
        .put(c.authorize(PutRequest {
            collection: "carts".into(),
            key: "c-1".into(),
            document: Some(doc(json!({"items": 3}))),
            expected_version: None,
        }))
        .await
        .expect("put over tls");
    let got = c
        .get(c.authorize(GetRequest {
            collection: "carts".into(),
            key: "c-1".into(),
            consistency_token: put.consistency_token,
        }))
        .await
        .expect("get over tls");
    assert_eq!(got.document, Some(doc(json!({"items": 3}))));
    // The write's audit event names data's certificate as its source.
    let write = audited(
        &to_audit,
        "the put's audit event",
        EventFilter { resource_id: "carts/c-1".into(), ..Default::default() },
    )
    .await;
    assert_eq!((write.action.as_str(), actor_id(&write)), ("document.put", "olivia"));
    assert_eq!(source_service(&write), DATA_ID, "{write:?}");
    // Session's own events (delivered from its outbox) name session's.
    let created = audited(
        &to_audit,
        "the session's audit event",
        EventFilter { action: "session.create".into(), actor_id: "olivia".into(), ..Default::default() },
    )
    .await;
    assert_eq!(source_service(&created), SESSION_ID, "{created:?}");

    // (b) Plaintext is refused on every API port; each plaintext health
    // port answers readiness and nothing else.
    for (name, s) in mesh.services() {
        let err = health_status(&plaintext_channel(s.addr), "readiness").await.unwrap_err();
        assert!(refused_by_transport(&err), "{name}: plaintext on the api port: {err}");
        let probe = plaintext_channel(s.health_addr.expect("a health port"));
        assert_eq!(health_status(&probe, "readiness").await.unwrap(), ServingStatus::Serving, "{name}");
    }
    let on_health_port = plaintext_channel(mesh.data.health_addr.unwrap());
    let err = DataServiceClient::new(on_health_port)
        .get(GetRequest { collection: "carts".into(), key: "c-1".into(), consistency_token: String::new() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unimplemented, "data on its health port: {err}");

    // (c) Admin RPCs: a non-admin identity is refused, and the refusal is
    // audited over TLS naming it; the listed identity is allowed.
    let intruder = mesh.pki.tls_config("intruder", INTRUDER_ID);
    let err = RateLimitServiceClient::new(channel(&intruder, mesh.ratelimit.addr))
        .reset(reset("olivia"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err}");
    let err = SessionServiceClient::new(channel(&intruder, mesh.session.addr))
        .revoke_user_sessions(revoke_user("olivia"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err}");
    for (method, by) in [(RATELIMIT_RESET, RATELIMIT_ID), (SESSION_REVOKE_USER, SESSION_ID)] {
        let denied = audited(
            &to_audit,
            &format!("the denial of {method}"),
            EventFilter {
                action: "authz.denied".into(),
                actor_id: INTRUDER_ID.into(),
                resource_id: method.into(),
                ..Default::default()
            },
        )
        .await;
        assert_eq!(denied.outcome(), Outcome::Denied, "{denied:?}");
        assert_eq!(source_service(&denied), by, "audited by the refusing service's identity: {denied:?}");
    }
    let ops = mesh.pki.tls_config("ops", OPS_ID);
    RateLimitServiceClient::new(channel(&ops, mesh.ratelimit.addr))
        .reset(reset("olivia"))
        .await
        .expect("ops may reset");

    // (d) A certificate from the mesh's CA without a spiffe:// URI SAN: the
    // handshake succeeds, the caller has no identity. Ordinary calls are
    // served; admin RPCs are refused (audited as anonymous), and audit
    // refuses its appends (there is no identity to record as the source).
    let (cert, key) = mesh.pki.issue_dns_only("nameless", "nameless.mesh.local");
    let nameless = TlsConfig::new(cert, key, mesh.pki.ca_path());
    let check = CheckRequest {
        domain: "data".into(),
        descriptors: vec![Descriptor {
            entries: vec![Entry { key: "user_id".into(), value: "nameless".into() }],
            hits_addend: None,
        }],
        hits_addend: 0,
    };
    let rl = RateLimitServiceClient::new(channel(&nameless, mesh.ratelimit.addr));
    let answer = rl.clone().check(check).await.expect("an ordinary call is served");
    assert_eq!(answer.into_inner().overall_code(), Code::Ok);
    let err = rl.clone().reset(reset("nameless")).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err}");
    let denied = audited(
        &to_audit,
        "the nameless caller's denial",
        EventFilter {
            action: "authz.denied".into(),
            actor_id: "anonymous".into(),
            resource_id: RATELIMIT_RESET.into(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(source_service(&denied), RATELIMIT_ID, "{denied:?}");
    let append = AppendRequest {
        event: Some(AuditEvent {
            occurred_at: Some(prost_types::Timestamp::from(std::time::SystemTime::now())),
            actor: Some(Actor { r#type: "service".into(), id: "nameless".into() }),
            action: "test.append".into(),
            resource: Some(Resource { r#type: "test".into(), id: "x".into() }),
            outcome: Outcome::Success as i32,
            source: Some(Source { service: "mesh-data".into(), ..Default::default() }),
            ..Default::default()
        }),
        idempotency_key: "nameless-1".into(),
    };
    let err = AuditServiceClient::new(channel(&nameless, mesh.audit.addr)).append(append).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err}");
    let none =
        audit_events(&to_audit, EventFilter { action: "test.append".into(), ..Default::default() }).await;
    assert!(none.is_empty(), "{none:?}");

    // The listed identity may revoke (last: it ends olivia's session).
    let revoked = SessionServiceClient::new(channel(&ops, mesh.session.addr))
        .revoke_user_sessions(revoke_user("olivia"))
        .await
        .expect("ops may revoke")
        .into_inner();
    assert!(revoked.revoked >= 1, "{revoked:?}");
    mesh.stop().await;
}

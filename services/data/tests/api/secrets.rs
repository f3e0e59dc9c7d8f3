//! Secrets never leak: the whole mesh as real processes, logging at debug
//! level as JSON and exporting spans, runs a realistic sequence (create a
//! session, validate, data calls with it, refresh, a call with the revoked
//! token, a forged one, revoke) with the data service reaching PostgreSQL
//! through a URL holding a password; then no log line, span (name,
//! attribute, event) or metric holds a session token, a password, the audit
//! hash key or any URL with credentials.

use std::time::Duration;

use mesh_proto::{
    data::{GetRequest, PutRequest, QueryRequest},
    session::{
        CreateSessionRequest, RefreshSessionRequest, RevokeSessionRequest, ValidateSessionRequest,
        revoke_session_request::Target, session_service_client::SessionServiceClient,
    },
};
use mesh_testkit::{
    Infra, LogBuffer, TestDb,
    otlp::{OtlpReceiver, Span},
};
use serde_json::json;
use sqlx::{Connection as _, PgConnection};

use crate::{
    helpers::{SERVED, client, doc},
    processes::{redis_env, start, start_ratelimit},
};

/// A login role of its own with a password nothing else contains, able to
/// do what `mesh` does; dropped (with what it owns) by the guard.
struct SecretRole {
    name: String,
    password: String,
    superuser: String,
}

impl SecretRole {
    async fn create(infra: &Infra) -> Self {
        let n: u64 = rand::random();
        let (name, password) = (format!("mesh_secret_{n:x}"), format!("pw-{:032x}", rand::random::<u128>()));
        let superuser = format!("postgres://postgres:mesh@127.0.0.1:{}/mesh", infra.pg_primary_port);
        let mut c = PgConnection::connect(&superuser).await.unwrap();
        sqlx::raw_sql(&format!("create role {name} login password '{password}' in role mesh"))
            .execute(&mut c)
            .await
            .unwrap();
        Self { name, password, superuser }
    }

    /// `url` (of role `mesh`) as this role.
    fn url(&self, url: &str) -> String {
        url.replacen("://mesh:mesh@", &format!("://{}:{}@", self.name, self.password), 1)
    }

    async fn remove(self) {
        let mut c = PgConnection::connect(&self.superuser).await.unwrap();
        let sql = format!("reassign owned by {0} to mesh; drop owned by {0}; drop role {0}", self.name);
        sqlx::raw_sql(&sql).execute(&mut c).await.unwrap();
    }
}

/// Where `secret` shows, for the failure message.
fn leaks(what: &str, text: &str, secrets: &[(&str, &str)]) -> Vec<String> {
    let mut out = Vec::new();
    for (name, secret) in secrets {
        if let Some(i) = text.find(secret) {
            let from = text[..i].char_indices().rev().nth(200).map_or(0, |(j, _)| j);
            out.push(format!("{what}: {name} in …{}…", &text[from..(i + secret.len()).min(text.len())]));
        }
    }
    // Any URL with a password: `scheme://user:password@`.
    let mut rest = text;
    while let Some(i) = rest.find("://") {
        let after = &rest[i + 3..];
        let auth = after.split(['/', ' ', '"', '\n', '?', '#']).next().unwrap_or("");
        if let Some((userinfo, _)) = auth.rsplit_once('@')
            && userinfo.contains(':')
        {
            let shown = rest.get(i.saturating_sub(40)..i + 3 + auth.len()).unwrap_or(auth);
            out.push(format!("{what}: a URL with credentials: {shown}"));
        }
        rest = after;
    }
    out
}

fn span_text(s: &Span) -> String {
    let mut t = format!("{} {}", s.service, s.name);
    for (k, v) in &s.attributes {
        t.push_str(&format!(" {k}={v}"));
    }
    for e in &s.events {
        t.push_str(&format!(" event={e}"));
    }
    t
}

#[tokio::test]
async fn no_token_password_or_credentialed_url_in_any_log_span_or_metric() {
    let receiver = OtlpReceiver::start().await;
    let otlp = receiver.endpoint();
    let logs = LogBuffer::default();
    let infra = Infra::shared();
    let role = SecretRole::create(infra).await;
    let hash_key = format!("audit-hash-key-{:032x}", rand::random::<u128>());

    let (ratelimit, _rules) = start_ratelimit(infra, &otlp, Some(&logs)).await;
    let audit_db = TestDb::new(infra).await.unwrap();
    let audit_env = infra.env(&audit_db.schema, "unused:");
    let audit = start("mesh-audit", "mesh.audit.v1.AuditService", audit_env, &otlp, Some(&logs)).await;
    let mut env = redis_env(infra);
    env.extend([
        ("MESH_SESSION_AUDIT_HASH_KEY".into(), hash_key.clone()),
        ("MESH_SESSION_OUTBOX_SWEEP_MS".into(), "200".into()),
        ("MESH_RATELIMIT_ADDR".into(), ratelimit.addr.to_string()),
        ("MESH_AUDIT_ADDR".into(), audit.addr.to_string()),
    ]);
    let session = start("mesh-session", "mesh.session.v1.SessionService", env, &otlp, Some(&logs)).await;
    let data_db = TestDb::new(infra).await.unwrap();
    let mut env = infra.env(&data_db.schema, "unused:");
    for (k, v) in &mut env {
        if k == "MESH_DATABASE_WRITE_URL" || k == "MESH_DATABASE_READ_URLS" {
            *v = role.url(v);
        }
    }
    assert!(env.iter().any(|(_, v)| v.contains(&role.password)), "the data service gets the password");
    env.extend([
        ("MESH_SESSION_ADDR".into(), session.addr.to_string()),
        ("MESH_RATELIMIT_ADDR".into(), ratelimit.addr.to_string()),
        ("MESH_AUDIT_ADDR".into(), audit.addr.to_string()),
    ]);
    let data = start("mesh-data", SERVED[0], env, &otlp, Some(&logs)).await;

    // The sequence: create, validate, data calls, refresh, the revoked token,
    // a forged one, revoke.
    let mut s = SessionServiceClient::new(mesh_testkit::channel(session.addr).await);
    let created = s
        .create_session(CreateSessionRequest { user_id: "secret-keeper".into(), ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    let first = created.token;
    s.validate_session(ValidateSessionRequest { token: first.clone(), touch: true }).await.unwrap();
    let c = client(data.addr, &first);
    let put = PutRequest {
        collection: "vault".into(),
        key: "k-1".into(),
        document: Some(doc(json!({"a": 1}))),
        expected_version: None,
    };
    c.put(put).await.unwrap();
    c.get(GetRequest { collection: "vault".into(), key: "k-1".into(), consistency_token: String::new() })
        .await
        .unwrap();
    c.query(QueryRequest { collection: "vault".into(), ..Default::default() }).await.unwrap();
    let second = s
        .refresh_session(RefreshSessionRequest { token: first.clone(), ..Default::default() })
        .await
        .unwrap()
        .into_inner()
        .token;
    let s1 = client(data.addr, &first)
        .get(GetRequest { collection: "vault".into(), key: "k-1".into(), consistency_token: String::new() })
        .await
        .unwrap_err();
    assert_eq!(s1.code(), tonic::Code::Unauthenticated);
    // A forged token of the right shape (checksum wrong), and one of the wrong shape.
    let forged = format!("{}AAAAAA", &second[..second.len() - 6]);
    for t in [&forged, &format!("{second}x")] {
        let r =
            s.validate_session(ValidateSessionRequest { token: t.clone(), touch: false }).await.unwrap_err();
        assert_eq!(r.code(), tonic::Code::Unauthenticated);
        client(data.addr, t)
            .put(PutRequest {
                collection: "vault".into(),
                key: "k-2".into(),
                document: Some(doc(json!({}))),
                expected_version: None,
            })
            .await
            .unwrap_err();
    }
    client(data.addr, &second)
        .put(PutRequest {
            collection: "vault".into(),
            key: "k-3".into(),
            document: Some(doc(json!({"b": 2}))),
            expected_version: None,
        })
        .await
        .unwrap();
    s.revoke_session(RevokeSessionRequest { target: Some(Target::Token(second.clone())), client: None })
        .await
        .unwrap();
    // The audit events are delivered after the calls answered: wait for them.
    let filter = mesh_proto::audit::EventFilter { resource_id: "vault/k-3".into(), ..Default::default() };
    crate::helpers::eventually(Duration::from_secs(20), "the audit event", || {
        let filter = filter.clone();
        let addr = audit.addr;
        async move { (!crate::helpers::audit_events(addr, filter).await.is_empty()).then_some(()) }
    })
    .await;

    let mut metrics = String::new();
    for svc in [data, session, ratelimit, audit] {
        metrics.push_str(&svc.metrics().await);
        svc.stop().await;
    }
    let spans = receiver
        .wait_for(Duration::from_secs(15), |s| {
            s.iter().any(|s| s.service == "mesh-data" && s.name.ends_with("/Put"))
        })
        .await;
    let password = role.password.clone();
    role.remove().await;

    let secrets: &[(&str, &str)] = &[
        ("the first token", &first),
        ("the refreshed token", &second),
        ("the forged token", &forged),
        // The secret part alone (a token cut or re-encoded in a message).
        ("the first token's secret", &first[10..50]),
        ("the database password", &password),
        ("the audit hash key", &hash_key),
    ];
    let text = logs.text();
    assert!(text.lines().count() > 100, "debug logs were captured: {text}");
    assert!(text.contains("\"level\":\"DEBUG\"") || text.to_lowercase().contains("debug"), "at debug level");
    let mut found = leaks("logs", &text, secrets);
    for s in &spans {
        found.extend(leaks("span", &span_text(s), secrets));
    }
    found.extend(leaks("metrics", &metrics, secrets));
    assert!(
        spans.len() > 10 && metrics.contains("grpc_server_handled_total"),
        "spans and metrics were captured"
    );
    assert!(found.is_empty(), "secrets leaked:\n{}", found.join("\n"));
}

use std::{
    process::Command,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use mesh_client::{ClientConfig, StackConfig};
use mesh_proto::session::{
    ClientInfo, CreateSessionRequest, CreateSessionResponse, ListUserSessionsRequest, RevokeSessionRequest,
    SERVICE_NAME, Session, ValidateSessionRequest, revoke_session_request::Target,
    session_service_client::SessionServiceClient,
};
use mesh_runtime::ServerConfig;
use mesh_session::{App, Config, SessionConfig};
use mesh_testkit::{Infra, Running, redis_prefix, spawn};
use tonic::{Code, transport::Channel};
use tonic_health::pb::health_check_response::ServingStatus;

/// Full names the service serves (health and reflection).
pub(crate) const SERVED: &[&str] = &[SERVICE_NAME, mesh_proto::envoy_authz::SERVICE_NAME];

/// A key long enough for `MESH_SESSION_AUDIT_HASH_KEY`.
pub(crate) const AUDIT_KEY: &[u8] = b"test-audit-hash-key-0123456789";

/// Settings for tests: fast outbox sweeps and retries, no downstream services.
pub(crate) fn session_config() -> SessionConfig {
    SessionConfig {
        audit_hash_key: Some(String::from_utf8(AUDIT_KEY.to_vec()).unwrap().into()),
        outbox_sweep: Duration::from_millis(200),
        outbox_retry_max: Duration::from_millis(1000),
        // A loaded CI machine must not turn a slow rate-limit answer into a refusal.
        ratelimit_timeout: Duration::from_secs(5),
        invalidation_timeout: Duration::from_secs(5),
        ..SessionConfig::default()
    }
}

/// Client settings for tests: breakers that close again within a second.
pub(crate) fn clients() -> ClientConfig {
    let mut stack = StackConfig::default();
    stack.breaker.open_base = Duration::from_millis(200);
    stack.breaker.open_max = Duration::from_millis(500);
    ClientConfig { session: None, ratelimit: None, audit: None, data: None, stack }
}

/// Configuration against `infra` with a fresh key prefix.
pub(crate) fn config(infra: &Infra) -> Config {
    config_with_prefix(infra, &redis_prefix())
}

/// Configuration against `infra` under `prefix` (instances sharing sessions share it).
pub(crate) fn config_with_prefix(infra: &Infra, prefix: &str) -> Config {
    Config {
        server: ServerConfig::for_tests(),
        redis: infra.redis_config(prefix),
        clients: clients(),
        session: session_config(),
    }
}

/// Builds and spawns the service on 127.0.0.1:0.
pub(crate) async fn spawn_app(config: Config) -> Running {
    let app = App::build(config).await.expect("app builds");
    spawn(app.local_addr(), app.metrics_addr(), |sd| app.serve(sd))
}

/// A client of a running service, once it is ready.
pub(crate) async fn client(app: &Running) -> SessionServiceClient<Channel> {
    let ch = mesh_testkit::channel(app.addr).await;
    mesh_testkit::wait_for_health(&ch, "readiness", ServingStatus::Serving, Duration::from_secs(20))
        .await
        .unwrap();
    SessionServiceClient::new(ch)
}

/// A spawned service with a client.
pub(crate) struct Fixture {
    pub(crate) app: Running,
    pub(crate) c: SessionServiceClient<Channel>,
}

impl Fixture {
    /// Spawns the service; returns once it is ready and, if it has one, its cache is on.
    pub(crate) async fn new(config: Config) -> Self {
        let cached = config.session.cache_max_bytes > 0;
        let app = spawn_app(config).await;
        let c = client(&app).await;
        if cached {
            cache_on(&app).await;
        }
        Self { app, c }
    }

    /// A metric of the service (0 when absent).
    pub(crate) async fn metric(&self, name: &str, labels: &[&str]) -> f64 {
        metric(&self.app, name, labels).await
    }
}

/// A metric sample of a running service (0 when absent).
pub(crate) async fn metric(app: &Running, name: &str, labels: &[&str]) -> f64 {
    let text = mesh_testkit::scrape_metrics(app.metrics_addr).await.unwrap();
    mesh_testkit::grpc::metric_value(&text, name, labels).unwrap_or(0.0)
}

/// Waits until the validation cache is on (every channel subscribed).
pub(crate) async fn cache_on(app: &Running) {
    eventually(Duration::from_secs(20), "the session cache turns on", || async {
        (metric(app, "mesh_session_cache_enabled", &[]).await == 1.0).then_some(())
    })
    .await;
}

/// A create request for `user` from `ip`.
pub(crate) fn create_req(user: &str, ip: &str) -> CreateSessionRequest {
    CreateSessionRequest {
        user_id: user.into(),
        attributes: [("device".to_owned(), "laptop".to_owned())].into(),
        idle_timeout: None,
        absolute_timeout: None,
        client: Some(ClientInfo { ip: ip.into(), user_agent: "mesh-test/1.0".into() }),
    }
}

/// Creates a session for `user`.
pub(crate) async fn create(c: &mut SessionServiceClient<Channel>, user: &str) -> CreateSessionResponse {
    c.create_session(create_req(user, "10.1.2.3")).await.expect("create answers").into_inner()
}

/// Validates a token; the session or the error code.
pub(crate) async fn validate(
    c: &mut SessionServiceClient<Channel>,
    token: &str,
    touch: bool,
) -> Result<Session, Code> {
    c.validate_session(ValidateSessionRequest { token: token.into(), touch })
        .await
        .map(|r| r.into_inner().session.expect("a session"))
        .map_err(|s| {
            if s.code() == Code::Unauthenticated {
                assert_eq!(s.message(), mesh_session::UNAUTHENTICATED, "one message for every refused token");
            }
            s.code()
        })
}

/// Milliseconds since the epoch of a timestamp.
pub(crate) fn ms(t: &Option<prost_types::Timestamp>) -> i64 {
    let t = t.as_ref().expect("timestamp set");
    t.seconds * 1000 + i64::from(t.nanos) / 1_000_000
}

/// Now, in milliseconds since the epoch (the same clock as Redis's here).
pub(crate) fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as i64
}

pub(crate) use mesh_testkit::eventually;

/// Ports of the masters of a cluster, from CLUSTER NODES on any of `ports`.
pub(crate) fn masters(ports: &[u16]) -> Vec<u16> {
    for port in ports {
        let Ok(out) = Command::new("redis-cli").args(["-p", &port.to_string(), "cluster", "nodes"]).output()
        else {
            continue;
        };
        let text = String::from_utf8_lossy(&out.stdout);
        let masters: Vec<u16> = text
            .lines()
            .filter(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                f.len() > 8 && f[2].contains("master") && !f[2].contains("fail")
            })
            .filter_map(|l| l.split_whitespace().nth(1)?.split('@').next()?.rsplit(':').next()?.parse().ok())
            .collect();
        if !masters.is_empty() {
            return masters;
        }
    }
    panic!("no redis node answered CLUSTER NODES")
}

fn redis_cli(port: u16, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .arg("-p")
        .arg(port.to_string())
        .args(args)
        .output()
        .expect("redis-cli runs");
    assert!(out.status.success(), "redis-cli {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// One key under a prefix, read from the master that holds it.
#[derive(Debug)]
pub(crate) struct StoredKey {
    pub(crate) name: String,
    pub(crate) kind: String,
    /// Every field, member and value, as redis-cli prints them.
    pub(crate) content: String,
    pub(crate) pttl: i64,
}

/// Every key under `prefix` on every master, with its content.
pub(crate) fn scan_cluster(ports: &[u16], prefix: &str) -> Vec<StoredKey> {
    let mut out = Vec::new();
    for port in masters(ports) {
        let keys = redis_cli(port, &["--scan", "--pattern", &format!("{prefix}*")]);
        for name in keys.lines().filter(|l| !l.is_empty()) {
            let kind = redis_cli(port, &["type", name]).trim().to_owned();
            let content = match kind.as_str() {
                "string" => redis_cli(port, &["get", name]),
                "hash" => redis_cli(port, &["hgetall", name]),
                "zset" => redis_cli(port, &["zrange", name, "0", "-1", "withscores"]),
                "stream" => redis_cli(port, &["xrange", name, "-", "+"]),
                "none" => continue, // expired meanwhile
                other => panic!("unexpected key type {other} of {name}"),
            };
            let pttl = redis_cli(port, &["pttl", name]).trim().parse().unwrap();
            out.push(StoredKey { name: name.to_owned(), kind, content, pttl });
        }
    }
    out
}

/// RevokeSession by session id.
pub(crate) fn by_id(id: &str) -> RevokeSessionRequest {
    RevokeSessionRequest { target: Some(Target::SessionId(id.into())), client: None }
}

/// RevokeSession by token.
pub(crate) fn by_token(t: &str) -> RevokeSessionRequest {
    RevokeSessionRequest { target: Some(Target::Token(t.into())), client: None }
}

/// The ids ListUserSessions returns for `user`.
pub(crate) async fn list(f: &mut Fixture, user: &str) -> Vec<String> {
    let r =
        f.c.list_user_sessions(ListUserSessionsRequest { user_id: user.into() }).await.unwrap().into_inner();
    r.sessions.into_iter().map(|s| s.id).collect()
}

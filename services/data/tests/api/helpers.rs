//! The mesh around the data service, for real: the session, rate-limit and
//! audit services run in this process on their own ports, against the local
//! Redis Cluster and PostgreSQL; the data service talks to them over gRPC.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use mesh_client::{ClientConfig, ClientMetrics, DataClient, StackConfig};
use mesh_data::{App, Config, DataConfig};
use mesh_proto::{
    audit::{AuditEvent, EventFilter, QueryRequest as AuditQuery, audit_service_client::AuditServiceClient},
    data::SERVICE_NAME,
    session::{CreateSessionRequest, session_service_client::SessionServiceClient},
};
use mesh_runtime::ServerConfig;
use mesh_testkit::{Infra, Running, TestDb, redis_prefix, spawn};
use tonic_health::pb::health_check_response::ServingStatus;

/// Full names the service serves (health and reflection).
pub(crate) const SERVED: &[&str] = &[SERVICE_NAME];

/// Rules with no limit anyone reaches in a test.
pub(crate) const OPEN_RULES: &str = r#"
domain: data
failure_mode: fail_open
descriptors:
  - key: user_id
    rate_limit: { unit: second, requests_per_unit: 100000, name: data_per_user }
"#;

/// Client settings for tests: breakers that close again within a second.
pub(crate) fn stack() -> StackConfig {
    let mut stack = StackConfig::default();
    stack.breaker.open_base = Duration::from_millis(200);
    stack.breaker.open_max = Duration::from_millis(500);
    stack
}

/// Settings for tests: generous timeouts (a loaded machine must not turn a
/// slow answer into a refusal), fast outbox sweeps.
pub(crate) fn data_config() -> DataConfig {
    DataConfig {
        session_timeout: Duration::from_secs(5),
        ratelimit_timeout: Duration::from_secs(5),
        outbox_sweep: Duration::from_millis(200),
        outbox_grace: Duration::from_millis(500),
        outbox_retry_base: Duration::from_millis(100),
        outbox_retry_max: Duration::from_millis(500),
        ..DataConfig::default()
    }
}

async fn ready(app: &Running) {
    let ch = mesh_testkit::channel(app.addr).await;
    mesh_testkit::wait_for_health(&ch, "readiness", ServingStatus::Serving, Duration::from_secs(30))
        .await
        .unwrap();
}

/// The session, rate-limit and audit services.
pub(crate) struct Mesh {
    pub(crate) session: Running,
    pub(crate) ratelimit: Running,
    pub(crate) audit: Running,
    _audit_db: TestDb,
    _rules: tempfile::TempDir,
}

impl Mesh {
    /// Starts the three services with `rules` for the rate limiter.
    pub(crate) async fn start(rules: &str) -> Self {
        let infra = Infra::shared();
        let dir = tempfile::tempdir().unwrap();
        let path: PathBuf = dir.path().join("data.yaml");
        std::fs::write(&path, rules).unwrap();
        let rl = mesh_ratelimit::App::build(mesh_ratelimit::Config {
            server: ServerConfig::for_tests(),
            redis: infra.redis_config(&redis_prefix()),
            rules: Some(path),
            engine: mesh_ratelimit::EngineConfig {
                redis_timeout: Duration::from_secs(2),
                ..Default::default()
            },
            audit: None,
        })
        .await
        .expect("ratelimit builds");
        let ratelimit = spawn(rl.local_addr(), rl.metrics_addr(), |sd| rl.serve(sd));

        let session = mesh_session::App::build(mesh_session::Config {
            server: ServerConfig::for_tests(),
            redis: infra.redis_config(&redis_prefix()),
            clients: ClientConfig { session: None, ratelimit: None, audit: None, data: None, stack: stack() },
            session: mesh_session::SessionConfig {
                audit_hash_key: Some("test-audit-hash-key-0123456789".to_owned().into()),
                invalidation_timeout: Duration::from_secs(5),
                ..Default::default()
            },
        })
        .await
        .expect("session builds");
        let session = spawn(session.local_addr(), session.metrics_addr(), |sd| session.serve(sd));

        let audit_db = TestDb::new(infra).await.unwrap();
        let audit = mesh_audit::App::build(mesh_audit::Config {
            server: ServerConfig::for_tests(),
            db: audit_db.config.clone(),
            audit: mesh_audit::AuditConfig::default(),
        })
        .await
        .expect("audit builds");
        let audit = spawn(audit.local_addr(), audit.metrics_addr(), |sd| audit.serve(sd));
        for app in [&ratelimit, &session, &audit] {
            ready(app).await;
        }
        Self { session, ratelimit, audit, _audit_db: audit_db, _rules: dir }
    }

    /// Client settings pointing at the three services.
    pub(crate) fn clients(&self) -> ClientConfig {
        let target = |a: SocketAddr| Some(a.to_string().parse().unwrap());
        ClientConfig {
            session: target(self.session.addr),
            ratelimit: target(self.ratelimit.addr),
            audit: target(self.audit.addr),
            data: None,
            stack: stack(),
        }
    }

    /// A data service configuration against this mesh and `db`.
    pub(crate) fn config(&self, db: &TestDb) -> Config {
        Config {
            server: ServerConfig::for_tests(),
            db: db.config.clone(),
            clients: self.clients(),
            data: data_config(),
        }
    }

    /// A new session token of `user`.
    pub(crate) async fn token(&self, user: &str) -> String {
        let mut c = SessionServiceClient::new(mesh_testkit::channel(self.session.addr).await);
        c.create_session(CreateSessionRequest { user_id: user.into(), ..Default::default() })
            .await
            .expect("a session")
            .into_inner()
            .token
    }

    /// Every audit event about `resource_id` (`collection/key`), oldest first.
    pub(crate) async fn audit_events(&self, resource_id: &str) -> Vec<AuditEvent> {
        audit_events(self.audit.addr, EventFilter { resource_id: resource_id.into(), ..Default::default() })
            .await
    }
}

/// Every audit event matching `filter`, oldest first.
pub(crate) async fn audit_events(addr: SocketAddr, filter: EventFilter) -> Vec<AuditEvent> {
    let mut c = AuditServiceClient::new(mesh_testkit::channel(addr).await);
    let mut req = AuditQuery { filter: Some(filter), page_size: 1000, page_token: String::new() };
    let mut out = Vec::new();
    loop {
        let page = c.query(req.clone()).await.expect("audit query").into_inner();
        out.extend(page.events);
        if page.next_page_token.is_empty() {
            break;
        }
        req.page_token = page.next_page_token;
    }
    out.sort_by_key(|e| e.sequence);
    out
}

/// Builds (migrates) and spawns the data service; returns once it is ready.
pub(crate) async fn spawn_app(config: Config) -> Running {
    let app = App::build(config).await.expect("app builds");
    let running = spawn(app.local_addr(), app.metrics_addr(), |sd| app.serve(sd));
    ready(&running).await;
    running
}

/// A typed client of the data service at `addr` sending `token`.
pub(crate) fn client(addr: SocketAddr, token: &str) -> DataClient {
    let config = ClientConfig {
        session: None,
        ratelimit: None,
        audit: None,
        data: Some(addr.to_string().parse().unwrap()),
        stack: stack(),
    };
    DataClient::from_config(&config, &ClientMetrics::default())
        .unwrap()
        .with_token(&token.to_owned().into())
        .unwrap()
}

/// The whole mesh with a data service on the shared infrastructure, and a
/// client signed in as `user`.
pub(crate) struct Fixture {
    pub(crate) mesh: Mesh,
    pub(crate) db: TestDb,
    pub(crate) app: Running,
    pub(crate) c: DataClient,
    pub(crate) token: String,
}

impl Fixture {
    pub(crate) async fn new(user: &str) -> Self {
        Self::with_rules(user, OPEN_RULES, |_| {}).await
    }

    /// With rate-limit `rules` and `tweak` applied to the data service's configuration.
    pub(crate) async fn with_rules(user: &str, rules: &str, tweak: impl FnOnce(&mut Config)) -> Self {
        let mesh = Mesh::start(rules).await;
        let db = TestDb::new(Infra::shared()).await.unwrap();
        let mut config = mesh.config(&db);
        tweak(&mut config);
        let app = spawn_app(config).await;
        let token = mesh.token(user).await;
        let c = client(app.addr, &token);
        Self { mesh, db, app, c, token }
    }

    /// A metric of the data service (0 when absent).
    pub(crate) async fn metric(&self, name: &str, labels: &[&str]) -> f64 {
        metric(&self.app, name, labels).await
    }
}

/// A metric sample of a running service (0 when absent).
pub(crate) async fn metric(app: &Running, name: &str, labels: &[&str]) -> f64 {
    let text = mesh_testkit::scrape_metrics(app.metrics_addr).await.unwrap();
    mesh_testkit::grpc::metric_value(&text, name, labels).unwrap_or(0.0)
}

pub(crate) use mesh_testkit::eventually;

/// `x-mesh-served-by` of a response.
pub(crate) fn served_by<T>(r: &tonic::Response<T>) -> String {
    r.metadata()
        .get(mesh_data::SERVED_BY)
        .expect("x-mesh-served-by on every read")
        .to_str()
        .unwrap()
        .to_owned()
}

pub(crate) use mesh_testkit::json::object as doc;

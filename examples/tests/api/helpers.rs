//! The services the examples call, started in this process on `127.0.0.1:0`
//! against the shared local Redis Cluster and PostgreSQL (started on demand),
//! each with its own key prefix or database schema.

use std::{net::SocketAddr, time::Duration};

use mesh_client::{ClientConfig, StackConfig};
use mesh_runtime::ServerConfig;
use mesh_testkit::{Infra, Running, TestDb, redis_prefix, repo_root, spawn};
use tonic_health::pb::health_check_response::ServingStatus;

/// The rules the local stack ships (`deploy/local/ratelimit.yaml`): the
/// examples run against exactly what a newcomer's `up.sh` loads.
pub(crate) fn shipped_rules() -> std::path::PathBuf {
    repo_root().join("deploy/local/ratelimit.yaml")
}

async fn ready(app: &Running) {
    let ch = mesh_testkit::channel(app.addr).await;
    mesh_testkit::wait_for_health(&ch, "readiness", ServingStatus::Serving, Duration::from_secs(30))
        .await
        .unwrap();
}

fn target(a: SocketAddr) -> Option<mesh_client::Target> {
    Some(a.to_string().parse().unwrap())
}

/// Whichever services a test asked for, and the client configuration
/// pointing at them (what the examples read from `MESH_*_ADDR`).
#[derive(Default)]
pub(crate) struct Stack {
    pub(crate) session: Option<Running>,
    pub(crate) ratelimit: Option<Running>,
    pub(crate) audit: Option<Running>,
    pub(crate) data: Option<Running>,
    dbs: Vec<TestDb>,
}

impl Stack {
    pub(crate) async fn with_ratelimit(mut self) -> Self {
        let app = mesh_ratelimit::App::build(mesh_ratelimit::Config {
            server: ServerConfig::for_tests(),
            redis: Infra::shared().redis_config(&redis_prefix()),
            rules: Some(shipped_rules()),
            engine: mesh_ratelimit::EngineConfig {
                redis_timeout: Duration::from_secs(2),
                ..Default::default()
            },
            audit: None,
        })
        .await
        .expect("ratelimit builds");
        let running = spawn(app.local_addr(), app.metrics_addr(), |sd| app.serve(sd));
        ready(&running).await;
        self.ratelimit = Some(running);
        self
    }

    pub(crate) async fn with_session(mut self) -> Self {
        let app = mesh_session::App::build(mesh_session::Config {
            server: ServerConfig::for_tests(),
            redis: Infra::shared().redis_config(&redis_prefix()),
            clients: self.clients(),
            session: mesh_session::SessionConfig {
                audit_hash_key: Some("test-audit-hash-key-0123456789".to_owned().into()),
                // A loaded CI machine must not turn a slow answer into a refusal.
                ratelimit_timeout: Duration::from_secs(5),
                invalidation_timeout: Duration::from_secs(5),
                ..Default::default()
            },
        })
        .await
        .expect("session builds");
        let running = spawn(app.local_addr(), app.metrics_addr(), |sd| app.serve(sd));
        ready(&running).await;
        self.session = Some(running);
        self
    }

    pub(crate) async fn with_audit(mut self) -> Self {
        let db = TestDb::new(Infra::shared()).await.unwrap();
        let app = mesh_audit::App::build(mesh_audit::Config {
            server: ServerConfig::for_tests(),
            db: db.config.clone(),
            audit: mesh_audit::AuditConfig::default(),
        })
        .await
        .expect("audit builds");
        let running = spawn(app.local_addr(), app.metrics_addr(), |sd| app.serve(sd));
        ready(&running).await;
        self.audit = Some(running);
        self.dbs.push(db);
        self
    }

    /// The data service, calling whichever of session, rate-limit and audit run.
    pub(crate) async fn with_data(mut self) -> Self {
        let db = TestDb::new(Infra::shared()).await.unwrap();
        let app = mesh_data::App::build(mesh_data::Config {
            server: ServerConfig::for_tests(),
            db: db.config.clone(),
            clients: self.clients(),
            data: mesh_data::DataConfig {
                session_timeout: Duration::from_secs(5),
                ratelimit_timeout: Duration::from_secs(5),
                outbox_sweep: Duration::from_millis(200),
                ..Default::default()
            },
        })
        .await
        .expect("data builds");
        let running = spawn(app.local_addr(), app.metrics_addr(), |sd| app.serve(sd));
        ready(&running).await;
        self.data = Some(running);
        self.dbs.push(db);
        self
    }

    /// Client settings pointing at the running services.
    pub(crate) fn clients(&self) -> ClientConfig {
        ClientConfig {
            session: self.session.as_ref().and_then(|r| target(r.addr)),
            ratelimit: self.ratelimit.as_ref().and_then(|r| target(r.addr)),
            audit: self.audit.as_ref().and_then(|r| target(r.addr)),
            data: self.data.as_ref().and_then(|r| target(r.addr)),
            stack: StackConfig::default(),
        }
    }

    /// The `MESH_*_ADDR` variables a program run against this stack gets.
    pub(crate) fn env(&self) -> Vec<(&'static str, String)> {
        [
            ("MESH_SESSION_ADDR", &self.session),
            ("MESH_RATELIMIT_ADDR", &self.ratelimit),
            ("MESH_AUDIT_ADDR", &self.audit),
            ("MESH_DATA_ADDR", &self.data),
        ]
        .into_iter()
        .filter_map(|(k, r)| Some((k, format!("http://{}", r.as_ref()?.addr))))
        .collect()
    }
}

/// What an example printed; panics with it when the example failed.
pub(crate) fn printed(result: anyhow::Result<()>, out: Vec<u8>) -> String {
    let out = String::from_utf8(out).unwrap();
    if let Err(e) = result {
        panic!("the example failed: {e:#}\nit printed:\n{out}");
    }
    out
}

use mesh_audit::{App, AuditConfig, Config};
use mesh_proto::audit::{
    Actor, AppendRequest, AppendResponse, AuditEvent, Outcome, QueryRequest, Resource, SERVICE_NAME, Source,
    audit_service_client::AuditServiceClient,
};
use mesh_runtime::ServerConfig;
use mesh_testkit::{Infra, Running, TestDb, spawn};
use sqlx::{Connection as _, PgConnection};
use tonic::transport::Channel;

/// Full names the service serves (health and reflection).
pub(crate) const SERVED: &[&str] = &[SERVICE_NAME];

/// Configuration against `infra` in a fresh schema.
pub(crate) async fn config(infra: &Infra) -> Config {
    let db = TestDb::new(infra).await.expect("test schema");
    config_for(&db)
}

/// Configuration for an existing test schema (several instances share one).
pub(crate) fn config_for(db: &TestDb) -> Config {
    Config { server: ServerConfig::for_tests(), db: db.config.clone(), audit: AuditConfig::default() }
}

/// Builds (migrates) and spawns the service on 127.0.0.1:0.
pub(crate) async fn spawn_app(config: Config) -> Running {
    let app = App::build(config).await.expect("app builds");
    spawn(app.local_addr(), app.metrics_addr(), |sd| app.serve(sd))
}

/// A client of a running service.
pub(crate) async fn client(app: &Running) -> AuditServiceClient<Channel> {
    AuditServiceClient::new(mesh_testkit::channel(app.addr).await)
}

/// A schema with a service on it, and a client.
pub(crate) struct Fixture {
    pub(crate) db: TestDb,
    pub(crate) app: Running,
    pub(crate) client: AuditServiceClient<Channel>,
}

impl Fixture {
    pub(crate) async fn new() -> Self {
        Self::with(|_| {}).await
    }

    pub(crate) async fn with(tweak: impl FnOnce(&mut Config)) -> Self {
        let db = TestDb::new(Infra::shared()).await.expect("test schema");
        let mut config = config_for(&db);
        tweak(&mut config);
        let app = spawn_app(config).await;
        let client = client(&app).await;
        Self { db, app, client }
    }

    /// A connection as the login role (the schema's owner), `search_path` set.
    pub(crate) async fn owner(&self) -> PgConnection {
        owner_conn(Infra::shared(), &self.db.schema).await
    }
}

/// A connection to the primary as `mesh` (the owner) with `search_path` = `schema`.
pub(crate) async fn owner_conn(infra: &Infra, schema: &str) -> PgConnection {
    let mut c = PgConnection::connect(&infra.pg_primary_url()).await.expect("owner connects");
    sqlx::query(&format!("set search_path = {schema}")).execute(&mut c).await.unwrap();
    c
}

/// URL of the primary as the superuser `postgres` (local password `mesh`).
pub(crate) fn superuser_url(infra: &Infra) -> String {
    format!("postgres://postgres:mesh@127.0.0.1:{}/mesh", infra.pg_primary_port)
}

/// A valid event by `actor` doing `action`.
pub(crate) fn event(actor: &str, action: &str) -> AuditEvent {
    AuditEvent {
        actor: Some(Actor { r#type: "user".into(), id: actor.into() }),
        action: action.into(),
        resource: Some(Resource { r#type: "document".into(), id: format!("doc-{actor}") }),
        outcome: Outcome::Success as i32,
        source: Some(Source {
            ip: "10.1.2.3".into(),
            user_agent: "test/1".into(),
            service: "mesh-test".into(),
        }),
        ..Default::default()
    }
}

/// Appends one event.
pub(crate) async fn append(
    client: &mut AuditServiceClient<Channel>,
    event: AuditEvent,
    key: &str,
) -> Result<AppendResponse, tonic::Status> {
    client
        .append(AppendRequest { event: Some(event), idempotency_key: key.into() })
        .await
        .map(tonic::Response::into_inner)
}

/// Every event matching `req`'s filter, following page tokens.
pub(crate) async fn query_all(
    client: &mut AuditServiceClient<Channel>,
    mut req: QueryRequest,
) -> Vec<AuditEvent> {
    let mut out = Vec::new();
    loop {
        let page = client.query(req.clone()).await.expect("query").into_inner();
        out.extend(page.events);
        if page.next_page_token.is_empty() {
            return out;
        }
        req.page_token = page.next_page_token;
    }
}

pub(crate) use mesh_testkit::eventually;

/// Runs psql against `url` with one command; returns (success, stderr).
pub(crate) async fn psql(url: &str, command: &str) -> (bool, String) {
    let out = tokio::process::Command::new("psql")
        .args([url, "-X", "-q", "-v", "ON_ERROR_STOP=1", "-c", command])
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .expect("psql runs");
    (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// Runs `mesh-audit <args>` to completion, without the environment's
/// database URL: (exit code, stdout, stderr).
pub(crate) async fn cli_full(args: &[&str]) -> (i32, String, String) {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_mesh-audit"))
        .args(args)
        .env_remove("MESH_DATABASE_WRITE_URL")
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// [`cli_full`]'s exit code and stdout.
pub(crate) async fn cli(args: &[&str]) -> (i32, String) {
    let (code, out, _) = cli_full(args).await;
    (code, out)
}

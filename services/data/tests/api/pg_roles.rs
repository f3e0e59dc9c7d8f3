//! The shipped deploy/k8s/postgres/roles.sql, run by psql as the superuser
//! with role and schema names of this test run (its psql variables), and
//! dropped again afterwards. Shared by data's and audit's `roles` tests
//! (audit includes this file by path).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use mesh_testkit::{Infra, repo_root};

/// One run of roles.sql: an owner and a serving login for data and audit,
/// and their two fresh schemas.
pub(crate) struct Roles {
    port: u16,
    pub(crate) data_owner: String,
    pub(crate) data_app: String,
    pub(crate) data_schema: String,
    pub(crate) audit_owner: String,
    pub(crate) audit_app: String,
    pub(crate) audit_schema: String,
}

const PASSWORD: &str = "roles-test-pw";

fn unique() -> (u64, u32) {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    let mix = now.subsec_nanos() ^ std::process::id().rotate_left(16) ^ rand::random::<u32>();
    (now.as_secs(), mix)
}

impl Roles {
    /// Runs roles.sql with new names (retried: two runs at once may collide
    /// on the database's privileges, "tuple concurrently updated"; the file
    /// is idempotent).
    pub(crate) async fn create(infra: &Infra) -> Self {
        let (secs, mix) = unique();
        let r = |what: &str| format!("r{mix:08x}_{what}");
        // The TestDb naming, so a schema a crashed run left is dropped a day later.
        let s = |n: u32| format!("t_{secs}_{:08x}", mix.wrapping_add(n));
        let roles = Self {
            port: infra.pg_primary_port,
            data_owner: r("data"),
            data_app: r("data_app"),
            data_schema: s(1),
            audit_owner: r("audit"),
            audit_app: r("audit_app"),
            audit_schema: s(2),
        };
        let file = repo_root().join("deploy/k8s/postgres/roles.sql");
        let vars = [
            ("data_role", &roles.data_owner),
            ("data_app_role", &roles.data_app),
            ("data_schema", &roles.data_schema),
            ("audit_role", &roles.audit_owner),
            ("audit_app_role", &roles.audit_app),
            ("audit_schema", &roles.audit_schema),
        ];
        let mut args = vec!["-X".to_owned(), "-q".to_owned(), "-v".to_owned(), "ON_ERROR_STOP=1".to_owned()];
        for (k, v) in vars {
            args.extend(["-v".to_owned(), format!("{k}={v}")]);
        }
        for k in ["data_password", "data_app_password", "audit_password", "audit_app_password"] {
            args.extend(["-v".to_owned(), format!("{k}={PASSWORD}")]);
        }
        args.extend(["-f".to_owned(), file.display().to_string()]);
        roles.psql(&args).await;
        roles
    }

    /// The primary's URL as `role`.
    pub(crate) fn url(&self, role: &str) -> String {
        format!("postgres://{role}:{PASSWORD}@127.0.0.1:{}/mesh", self.port)
    }

    /// The primary's URL as the superuser.
    pub(crate) fn admin_url(&self) -> String {
        format!("postgres://postgres:mesh@127.0.0.1:{}/mesh", self.port)
    }

    async fn psql(&self, args: &[String]) {
        let (url, args) = (self.admin_url(), args.to_vec());
        tokio::task::spawn_blocking(move || psql(&url, &args)).await.unwrap();
    }
}

/// Runs psql as the superuser; panics with its stderr on failure.
fn psql(url: &str, args: &[String]) {
    let mut last = String::new();
    for _ in 0..5 {
        let out = std::process::Command::new("psql")
            .env("PGOPTIONS", "-c client_min_messages=warning")
            .arg(url)
            .args(args)
            .stdin(std::process::Stdio::null())
            .output()
            .expect("psql runs");
        if out.status.success() {
            return;
        }
        last = String::from_utf8_lossy(&out.stderr).into_owned();
        if !last.contains("concurrently") {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    panic!("psql {args:?} failed: {last}");
}

/// Drops the schemas and the roles, also when the test failed.
impl Drop for Roles {
    fn drop(&mut self) {
        let sql = format!(
            "drop schema if exists {ds}, {as_} cascade; drop owned by {a}, {b}, {c}, {d}; \
             drop role {a}, {b}, {c}, {d}",
            ds = self.data_schema,
            as_ = self.audit_schema,
            a = self.data_owner,
            b = self.data_app,
            c = self.audit_owner,
            d = self.audit_app,
        );
        let args = ["-X", "-q", "-v", "ON_ERROR_STOP=1", "-c", &sql].map(str::to_owned);
        // No second panic while unwinding: a failed drop is reported, not raised.
        if let Err(e) = std::panic::catch_unwind(|| psql(&self.admin_url(), &args)) {
            eprintln!("dropping the test roles failed: {e:?}");
        }
    }
}

/// Runs `binary migrate` with `env`; its exit code and stdout+stderr.
pub(crate) async fn migrate(binary: &str, env: &[(String, String)]) -> (Option<i32>, String) {
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new(binary)
            .arg("migrate")
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(std::process::Stdio::null())
            .output(),
    )
    .await
    .expect("migrate finishes within 60 s")
    .expect("migrate runs");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.code(), text)
}

/// The SQLSTATE of a statement's failure (panics if it succeeded).
pub(crate) async fn refused(conn: &mut mesh_db::sqlx::PgConnection, sql: &str) -> String {
    match mesh_db::sqlx::query(sql).execute(conn).await {
        Ok(_) => panic!("{sql:?} succeeded"),
        Err(mesh_db::sqlx::Error::Database(e)) => e.code().unwrap_or_default().into_owned(),
        Err(e) => panic!("{sql:?}: {e}"),
    }
}

/// The tables of `schema`, by name (as the superuser sees them).
pub(crate) async fn tables_in(schema: &str) -> Vec<String> {
    use mesh_db::sqlx::Connection as _;
    let mut c = mesh_db::sqlx::PgConnection::connect(&Infra::shared().pg_primary_url()).await.unwrap();
    mesh_db::sqlx::query_scalar("select tablename::text from pg_tables where schemaname = $1 order by 1")
        .bind(schema)
        .fetch_all(&mut c)
        .await
        .unwrap()
}

/// The owner-only migration up to the point where the service may serve,
/// as every database service must pass it: (a) against the unmigrated
/// `schema`, `binary` as the serving role with `MESH_DATABASE_MIGRATE=verify`
/// (`verify_env`) exits 1 naming `binary migrate`, creates nothing and shows
/// no password; `binary migrate` as the serving role (`app_env`) fails too;
/// (b) as the owner (`owner_env`) it applies `applied` (e.g. "1, 2"), and a
/// second run applies nothing.
pub(crate) async fn unmigrated_until_the_owner_migrates(
    binary: &str,
    schema: &str,
    verify_env: &[(String, String)],
    app_env: &[(String, String)],
    owner_env: &[(String, String)],
    applied: &str,
) {
    let name = std::path::Path::new(binary).file_name().unwrap().to_string_lossy().into_owned();
    let output = mesh_testkit::LogBuffer::default();
    let mut early = mesh_testkit::Process::start_captured(binary, verify_env, &output).unwrap();
    let status = early.wait(Duration::from_secs(30)).await.unwrap();
    let text = output.text();
    assert_eq!(status.code(), Some(1), "{text}");
    assert!(text.contains(&format!("run `{name} migrate` as the schema owner first")), "{text}");
    assert!(!text.contains("roles-test-pw"), "{text}");
    assert_eq!(tables_in(schema).await, Vec::<String>::new(), "verify ran no DDL");

    // The serving role cannot migrate either.
    let (code, text) = migrate(binary, app_env).await;
    assert_eq!(code, Some(1), "{text}");
    assert!(!text.contains("roles-test-pw"), "{text}");

    // The owner migrates; a second run applies nothing.
    let (code, text) = migrate(binary, owner_env).await;
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains(&format!("applied versions {applied}")), "{text}");
    let (code, text) = migrate(binary, owner_env).await;
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("nothing applied"), "{text}");
}

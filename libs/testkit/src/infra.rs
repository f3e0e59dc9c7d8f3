//! The local infrastructure tests run against.
//!
//! [`Infra::shared`] is the stack `deploy/local/infra.sh` runs on the default
//! ports (started on first use). Tests must never stop it: a test that stops
//! or kills PostgreSQL or Redis starts a [`PrivateInfra`] on ports of its own.

use std::{
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    sync::OnceLock,
    time::Duration,
};

use anyhow::{Context as _, bail};
use mesh_db::DbConfig;
use mesh_runtime::redis::RedisConfig;
use rand::Rng;

/// The repository root (where `deploy/` lives).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().expect("repo root exists")
}

/// Password of the `mesh` role on local databases (local use only).
const PG_PASSWORD: &str = "mesh";

/// Where one copy of the infrastructure listens.
#[derive(Debug, Clone)]
pub struct Infra {
    /// Primary port.
    pub pg_primary_port: u16,
    /// Replica port.
    pub pg_replica_port: u16,
    /// The six Redis Cluster ports.
    pub redis_ports: Vec<u16>,
}

impl Infra {
    fn defaults() -> Self {
        Self { pg_primary_port: 55432, pg_replica_port: 55433, redis_ports: (7000..7006).collect() }
    }

    /// The shared local stack, started by `deploy/local/infra.sh` if any part
    /// of it is not answering.
    pub fn shared() -> &'static Infra {
        static SHARED: OnceLock<Infra> = OnceLock::new();
        SHARED.get_or_init(|| {
            let infra = Infra::defaults();
            if !infra.all_listening() {
                run_script(&[], &["start", "all"]).expect("local infrastructure starts");
            }
            infra
        })
    }

    fn all_listening(&self) -> bool {
        let mut ports = vec![self.pg_primary_port, self.pg_replica_port];
        ports.extend(&self.redis_ports);
        ports.iter().all(|p| {
            TcpStream::connect_timeout(&SocketAddr::from(([127, 0, 0, 1], *p)), Duration::from_millis(200))
                .is_ok()
        })
    }

    /// URL of the primary, as role `mesh`.
    pub fn pg_primary_url(&self) -> String {
        format!("postgres://mesh:{PG_PASSWORD}@127.0.0.1:{}/mesh", self.pg_primary_port)
    }

    /// URL of the replica, as role `mesh`.
    pub fn pg_replica_url(&self) -> String {
        format!("postgres://mesh:{PG_PASSWORD}@127.0.0.1:{}/mesh", self.pg_replica_port)
    }

    /// URL of the superuser `postgres` on the server at `port` (the primary's
    /// or the replica's), for tests that change server settings.
    pub fn pg_admin_url(&self, port: u16) -> String {
        format!("postgres://postgres:{PG_PASSWORD}@127.0.0.1:{port}/postgres")
    }

    /// `host:port` of every Redis node.
    pub fn redis_urls(&self) -> Vec<String> {
        self.redis_ports.iter().map(|p| format!("127.0.0.1:{p}")).collect()
    }

    /// Database settings (primary + replica) using `schema`.
    pub fn db_config(&self, schema: &str) -> DbConfig {
        let mut c = DbConfig::new(self.pg_primary_url(), [self.pg_replica_url()]);
        c.schema = Some(schema.to_owned());
        c
    }

    /// Redis settings with every key under `prefix`.
    pub fn redis_config(&self, prefix: &str) -> RedisConfig {
        RedisConfig::new(self.redis_urls(), prefix)
    }

    /// Environment for a service binary: the `MESH_REDIS_*`/`MESH_DATABASE_*` variables.
    pub fn env(&self, schema: &str, redis_prefix: &str) -> Vec<(String, String)> {
        vec![
            ("MESH_REDIS_URLS".into(), self.redis_urls().join(",")),
            ("MESH_REDIS_KEY_PREFIX".into(), redis_prefix.into()),
            ("MESH_DATABASE_WRITE_URL".into(), self.pg_primary_url()),
            ("MESH_DATABASE_READ_URLS".into(), self.pg_replica_url()),
            ("MESH_DATABASE_SCHEMA".into(), schema.into()),
        ]
    }
}

fn run_script_blocking(env: &[(String, String)], args: &[&str]) -> anyhow::Result<()> {
    let script = repo_root().join("deploy/local/infra.sh");
    let out = std::process::Command::new("bash")
        .arg(&script)
        .args(args)
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdin(std::process::Stdio::null())
        .output()
        .with_context(|| format!("running {}", script.display()))?;
    if !out.status.success() {
        bail!(
            "infra.sh {} failed ({}):\n{}{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

fn run_script(env: &[(String, String)], args: &[&str]) -> anyhow::Result<()> {
    run_script_blocking(env, args)
}

async fn run_script_async(env: Vec<(String, String)>, args: Vec<&'static str>) -> anyhow::Result<()> {
    tokio::task::spawn_blocking(move || run_script_blocking(&env, &args)).await?
}

/// A private PostgreSQL pair and Redis Cluster on free ports in a temporary
/// directory, for tests that stop, kill or fail over infrastructure. Nothing
/// runs until a `start_*` method is called; everything stops on drop.
#[derive(Debug)]
pub struct PrivateInfra {
    dir: tempfile::TempDir,
    /// Where it listens.
    pub infra: Infra,
}

fn bindable(port: u16) -> bool {
    TcpListener::bind(("127.0.0.1", port)).is_ok()
}

impl PrivateInfra {
    /// Picks free ports (Redis bus ports, +10000, included) and a state directory.
    ///
    /// Every port is below Linux's ephemeral range (32768 and up): a port
    /// merely free now could otherwise become the local end of some other
    /// test's outgoing connection before the server binds it.
    pub fn new() -> Self {
        let mut rng = rand::rng();
        let redis_ports = loop {
            let base: u16 = rng.random_range(10_000..16_000);
            let ports: Vec<u16> = (base..base + 6).collect();
            if ports.iter().all(|p| bindable(*p) && bindable(p + 10_000)) {
                break ports;
            }
        };
        let pg = loop {
            let base: u16 = rng.random_range(27_000..32_000);
            if bindable(base) && bindable(base + 1) {
                break base;
            }
        };
        let dir = tempfile::Builder::new().prefix("mesh-infra-").tempdir().expect("temp dir");
        // The postgres user must reach its data directory inside.
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755));
        }
        Self { dir, infra: Infra { pg_primary_port: pg, pg_replica_port: pg + 1, redis_ports } }
    }

    fn env(&self) -> Vec<(String, String)> {
        vec![
            ("MESH_LOCAL_DIR".into(), self.dir.path().display().to_string()),
            ("MESH_PG_PRIMARY_PORT".into(), self.infra.pg_primary_port.to_string()),
            ("MESH_PG_REPLICA_PORT".into(), self.infra.pg_replica_port.to_string()),
            (
                "MESH_REDIS_PORTS".into(),
                self.infra.redis_ports.iter().map(u16::to_string).collect::<Vec<_>>().join(" "),
            ),
            // Tools are shared with the main checkout, not re-installed per test.
            ("MESH_TOOLS_DIR".into(), repo_root().join(".local/tools").display().to_string()),
        ]
    }

    /// Starts (or restarts) the Redis Cluster and waits for `cluster_state:ok`
    /// on every node, full slot coverage, and an in-sync replica for every
    /// master (so a test may kill a master at once and expect a failover).
    pub async fn start_redis(&self) -> anyhow::Result<()> {
        run_script_async(self.env(), vec!["start", "redis"]).await
    }

    /// Stops every Redis node.
    pub async fn stop_redis(&self) -> anyhow::Result<()> {
        run_script_async(self.env(), vec!["stop", "redis"]).await
    }

    /// Starts (or restarts) the PostgreSQL primary and replica.
    pub async fn start_pg(&self) -> anyhow::Result<()> {
        run_script_async(self.env(), vec!["start", "pg"]).await
    }

    /// Stops the primary only (fast shutdown).
    pub async fn stop_pg_primary(&self) -> anyhow::Result<()> {
        run_script_async(self.env(), vec!["stop", "pg-primary"]).await
    }

    /// Stops the replica only (fast shutdown).
    pub async fn stop_pg_replica(&self) -> anyhow::Result<()> {
        run_script_async(self.env(), vec!["stop", "pg-replica"]).await
    }

    /// Delays the replica's replay of every commit by `delay`
    /// (`recovery_min_apply_delay`; zero: none), as a slow or distant
    /// replica would be, and waits until the replica runs with it.
    pub async fn delay_replica(&self, delay: Duration) -> anyhow::Result<()> {
        use sqlx::Connection as _;
        let url = self.infra.pg_admin_url(self.infra.pg_replica_port);
        let ms = delay.as_millis();
        let mut conn = sqlx::PgConnection::connect(&url).await?;
        sqlx::query(&format!("alter system set recovery_min_apply_delay = {ms}")).execute(&mut conn).await?;
        sqlx::query("select pg_reload_conf()").execute(&mut conn).await?;
        let start = std::time::Instant::now();
        loop {
            // A fresh session reads the reloaded configuration.
            let mut check = sqlx::PgConnection::connect(&url).await?;
            let now: String =
                sqlx::query_scalar("select setting from pg_settings where name = 'recovery_min_apply_delay'")
                    .fetch_one(&mut check)
                    .await?;
            if now == ms.to_string() {
                return Ok(());
            }
            if start.elapsed() > Duration::from_secs(10) {
                bail!("the replica still runs with recovery_min_apply_delay = {now} ms");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Kills one Redis node with SIGKILL, as a crash would.
    pub fn kill_redis_node(&self, port: u16) -> anyhow::Result<()> {
        let pidfile = self.dir.path().join(format!("redis/{port}/redis.pid"));
        let pid: i32 = std::fs::read_to_string(&pidfile)
            .with_context(|| format!("reading {}", pidfile.display()))?
            .trim()
            .parse()?;
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL)?;
        Ok(())
    }

    /// Ports of the nodes that are currently masters serving slots.
    pub async fn redis_masters(&self) -> anyhow::Result<Vec<u16>> {
        for port in &self.infra.redis_ports {
            let out = tokio::process::Command::new("redis-cli")
                .args(["-p", &port.to_string(), "cluster", "nodes"])
                .output()
                .await?;
            if !out.status.success() || out.stdout.is_empty() {
                continue;
            }
            let text = String::from_utf8_lossy(&out.stdout);
            let masters = text
                .lines()
                .filter(|l| {
                    let f: Vec<&str> = l.split_whitespace().collect();
                    f.len() > 8 && f[2].contains("master") && !f[2].contains("fail")
                })
                .filter_map(|l| {
                    let addr = l.split_whitespace().nth(1)?;
                    addr.split('@').next()?.rsplit(':').next()?.parse().ok()
                })
                .collect();
            return Ok(masters);
        }
        bail!("no redis node answered CLUSTER NODES")
    }
}

impl Default for PrivateInfra {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for PrivateInfra {
    fn drop(&mut self) {
        let _ = run_script_blocking(&self.env(), &["stop", "all"]);
    }
}

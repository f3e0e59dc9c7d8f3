//! The local infrastructure tests run against.
//!
//! [`Infra::shared`] is the stack `deploy/local/infra.sh` runs on the default
//! ports (started on first use). Tests must never stop it: a test that stops
//! or kills PostgreSQL or Redis starts a [`PrivateInfra`] on ports of its own.

use std::{
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    sync::{Mutex, OnceLock},
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
    /// Redis nodes started by [`PrivateInfra::add_redis_master`] (stopped on drop).
    extra_redis: Mutex<Vec<u16>>,
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
        Self {
            dir,
            infra: Infra { pg_primary_port: pg, pg_replica_port: pg + 1, redis_ports },
            extra_redis: Mutex::new(Vec::new()),
        }
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

    /// Stops (SIGSTOP) or resumes (SIGCONT) one Redis node: a paused
    /// replica acknowledges nothing, as a stalled or partitioned one would.
    pub fn pause_redis_node(&self, port: u16, paused: bool) -> anyhow::Result<()> {
        let pidfile = self.dir.path().join(format!("redis/{port}/redis.pid"));
        let pid: i32 = std::fs::read_to_string(&pidfile)
            .with_context(|| format!("reading {}", pidfile.display()))?
            .trim()
            .parse()?;
        let signal =
            if paused { nix::sys::signal::Signal::SIGSTOP } else { nix::sys::signal::Signal::SIGCONT };
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal)?;
        Ok(())
    }

    /// The port of the replica of the master at `master`.
    pub async fn redis_replica_of(&self, master: u16) -> anyhow::Result<u16> {
        let info = self.redis_cli(master, &["info", "replication"]).await?;
        let line = info.lines().find(|l| l.starts_with("slave0:")).context("the master has no replica")?;
        let port = line.split(',').find_map(|f| f.strip_prefix("port=")).context("replica port")?;
        Ok(port.trim().parse()?)
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

    // ---------------------------------------------------------------- resharding
    //
    // The steps `redis-cli --cluster reshard` takes, one at a time, so a test
    // can hold a slot half-moved, and the whole commands for load tests.

    /// Runs `redis-cli -p <port> <args>` and returns its output; fails on an
    /// error reply (`ERR`, `MOVED`, ...) as well as on a failed process.
    pub async fn redis_cli(&self, port: u16, args: &[&str]) -> anyhow::Result<String> {
        let out = tokio::process::Command::new("redis-cli")
            .args(["-p", &port.to_string()])
            .args(args)
            .stdin(std::process::Stdio::null())
            .output()
            .await?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let first = text.lines().next().unwrap_or_default();
        if !out.status.success()
            || ["ERR", "MOVED", "ASK", "TRYAGAIN", "CLUSTERDOWN", "IOERR"]
                .iter()
                .any(|e| first.starts_with(e))
        {
            bail!(
                "redis-cli -p {port} {} failed: {text}{}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(text)
    }

    /// The cluster node id of the node at `port`.
    pub async fn redis_node_id(&self, port: u16) -> anyhow::Result<String> {
        Ok(self.redis_cli(port, &["cluster", "myid"]).await?.trim().to_owned())
    }

    /// The port of the master serving `slot`, as the node at `ask` sees it.
    pub async fn redis_slot_owner(&self, slot: u16) -> anyhow::Result<u16> {
        let ask = self.redis_masters().await?[0];
        let text = self.redis_cli(ask, &["cluster", "nodes"]).await?;
        for line in text.lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 9 || !f[2].contains("master") {
                continue;
            }
            for range in &f[8..] {
                if range.starts_with('[') {
                    continue;
                }
                let (a, b) = range.split_once('-').unwrap_or((range, range));
                let (a, b): (u16, u16) = (a.parse()?, b.parse()?);
                if (a..=b).contains(&slot) {
                    let port = f[1].split('@').next().and_then(|h| h.rsplit(':').next());
                    return Ok(port.context("node address")?.parse()?);
                }
            }
        }
        bail!("no master serves slot {slot}")
    }

    /// First steps of moving `slot` from the master at `from` to the one at
    /// `to`: `IMPORTING` on `to`, `MIGRATING` on `from`. Keys stay put until
    /// [`PrivateInfra::redis_migrate_keys`] moves them.
    pub async fn redis_begin_slot_move(&self, slot: u16, from: u16, to: u16) -> anyhow::Result<()> {
        let (from_id, to_id) = (self.redis_node_id(from).await?, self.redis_node_id(to).await?);
        let s = slot.to_string();
        self.redis_cli(to, &["cluster", "setslot", &s, "importing", &from_id]).await?;
        self.redis_cli(from, &["cluster", "setslot", &s, "migrating", &to_id]).await?;
        Ok(())
    }

    /// `MIGRATE`s `keys` (all in one slot being moved) from `from` to `to`.
    pub async fn redis_migrate_keys(&self, from: u16, to: u16, keys: &[String]) -> anyhow::Result<()> {
        let to = to.to_string();
        let mut args = vec!["migrate", "127.0.0.1", &to, "", "0", "5000", "KEYS"];
        args.extend(keys.iter().map(String::as_str));
        self.redis_cli(from, &args).await?;
        Ok(())
    }

    /// Last steps of moving `slot`: migrates whatever keys are left, then
    /// `CLUSTER SETSLOT <slot> NODE <to>` on `to`, `from` and every other master.
    pub async fn redis_finish_slot_move(&self, slot: u16, from: u16, to: u16) -> anyhow::Result<()> {
        let s = slot.to_string();
        loop {
            let keys: Vec<String> = self
                .redis_cli(from, &["cluster", "getkeysinslot", &s, "100"])
                .await?
                .lines()
                .filter(|l| !l.is_empty())
                .map(str::to_owned)
                .collect();
            if keys.is_empty() {
                break;
            }
            self.redis_migrate_keys(from, to, &keys).await?;
        }
        let to_id = self.redis_node_id(to).await?;
        self.redis_cli(to, &["cluster", "setslot", &s, "node", &to_id]).await?;
        self.redis_cli(from, &["cluster", "setslot", &s, "node", &to_id]).await?;
        for m in self.redis_masters().await? {
            if m != to && m != from {
                self.redis_cli(m, &["cluster", "setslot", &s, "node", &to_id]).await?;
            }
        }
        Ok(())
    }

    /// `redis-cli --cluster reshard`: moves `slots` slots from the master at
    /// `from` to the one at `to`, key by key, as an operator would.
    pub async fn redis_reshard(&self, from: u16, to: u16, slots: u16) -> anyhow::Result<()> {
        let (from_id, to_id) = (self.redis_node_id(from).await?, self.redis_node_id(to).await?);
        let seed = format!("127.0.0.1:{from}");
        let n = slots.to_string();
        let args = [
            "--cluster",
            "reshard",
            &seed,
            "--cluster-from",
            &from_id,
            "--cluster-to",
            &to_id,
            "--cluster-slots",
            &n,
            "--cluster-yes",
        ];
        self.redis_cli_cluster(&args).await
    }

    /// `redis-cli --cluster rebalance --cluster-use-empty-masters`.
    pub async fn redis_rebalance(&self) -> anyhow::Result<()> {
        let seed = format!("127.0.0.1:{}", self.redis_masters().await?[0]);
        self.redis_cli_cluster(&["--cluster", "rebalance", &seed, "--cluster-use-empty-masters"]).await
    }

    async fn redis_cli_cluster(&self, args: &[&str]) -> anyhow::Result<()> {
        let out = tokio::process::Command::new("redis-cli")
            .args(args)
            .stdin(std::process::Stdio::null())
            .output()
            .await?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() || stdout.contains("[ERR]") {
            bail!("redis-cli {} failed: {stdout}{}", args.join(" "), String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    }

    /// `redis-cli --cluster reshard` of a third of all slots from one master
    /// to another, then waits until the cluster is ok.
    pub async fn redis_reshard_a_third(&self) -> anyhow::Result<()> {
        let masters = self.redis_masters().await?;
        self.redis_reshard(masters[0], masters[1], 16384 / 3).await?;
        self.wait_redis_ok(Duration::from_secs(10)).await
    }

    /// A fourth master joins and `redis-cli --cluster rebalance` moves its
    /// share of the slots onto it; waits until the cluster is ok and returns
    /// the new master's port.
    pub async fn redis_rebalance_onto_a_new_master(&self) -> anyhow::Result<u16> {
        let new = self.add_redis_master().await?;
        self.redis_rebalance().await?;
        self.wait_redis_ok(Duration::from_secs(10)).await?;
        let owners = self.redis_masters().await?;
        if !owners.contains(&new) {
            bail!("the new master serves no slot after the rebalance: {owners:?}");
        }
        Ok(new)
    }

    /// Starts one more Redis node (the cluster's settings, in this
    /// infrastructure's directory), joins it to the cluster as an empty
    /// master and returns its port. It is stopped on drop.
    pub async fn add_redis_master(&self) -> anyhow::Result<u16> {
        let port = {
            let mut rng = rand::rng();
            loop {
                let p: u16 = rng.random_range(10_000..16_000);
                if bindable(p) && bindable(p + 10_000) && !self.infra.redis_ports.contains(&p) {
                    break p;
                }
            }
        };
        let dir = self.dir.path().join(format!("redis/{port}"));
        std::fs::create_dir_all(&dir)?;
        let seed_conf = self.dir.path().join(format!("redis/{}/redis.conf", self.infra.redis_ports[0]));
        let conf = std::fs::read_to_string(&seed_conf)?
            .lines()
            .map(|l| match l.split_whitespace().next() {
                Some("port") => format!("port {port}"),
                Some("dir") => format!("dir {}", dir.display()),
                Some("pidfile") => format!("pidfile {}/redis.pid", dir.display()),
                Some("logfile") => format!("logfile {}/redis.log", dir.display()),
                _ => l.to_owned(),
            })
            .collect::<Vec<_>>()
            .join("\n");
        std::fs::write(dir.join("redis.conf"), conf + "\n")?;
        let status = tokio::process::Command::new("redis-server")
            .arg(dir.join("redis.conf"))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .await?;
        if !status.success() {
            bail!("redis-server on port {port} did not start");
        }
        self.extra_redis.lock().unwrap_or_else(|p| p.into_inner()).push(port);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while self.redis_cli(port, &["ping"]).await.is_err() {
            if std::time::Instant::now() > deadline {
                bail!("redis on port {port} does not answer");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let (new, seed) =
            (format!("127.0.0.1:{port}"), format!("127.0.0.1:{}", self.redis_masters().await?[0]));
        self.redis_cli_cluster(&["--cluster", "add-node", &new, &seed]).await?;
        // Joined once every node knows it.
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let mut known = true;
            for p in self.infra.redis_ports.iter().chain([&port]) {
                let nodes = self.redis_cli(*p, &["cluster", "nodes"]).await.unwrap_or_default();
                known &=
                    nodes.lines().filter(|l| !l.contains("fail")).count() == self.infra.redis_ports.len() + 1;
            }
            if known {
                // And it has learnt every slot's owner (else it answers CLUSTERDOWN).
                self.wait_redis_ok(Duration::from_secs(20)).await?;
                return Ok(port);
            }
            if std::time::Instant::now() > deadline {
                bail!("the new node on port {port} did not join the cluster");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until every node (added ones included) says `cluster_state:ok`
    /// and `redis-cli --cluster check` finds every slot covered and none open.
    pub async fn wait_redis_ok(&self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = std::time::Instant::now() + timeout;
        let ports: Vec<u16> = self
            .infra
            .redis_ports
            .iter()
            .copied()
            .chain(self.extra_redis.lock().unwrap_or_else(|p| p.into_inner()).iter().copied())
            .collect();
        loop {
            let mut ok = true;
            for p in &ports {
                ok &= self
                    .redis_cli(*p, &["cluster", "info"])
                    .await
                    .is_ok_and(|i| i.contains("cluster_state:ok"));
            }
            let seed = format!("127.0.0.1:{}", ports[0]);
            if ok && self.redis_cli_cluster(&["--cluster", "check", &seed]).await.is_ok() {
                return Ok(());
            }
            if std::time::Instant::now() > deadline {
                bail!("the redis cluster is not ok after {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Default for PrivateInfra {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for PrivateInfra {
    fn drop(&mut self) {
        for port in self.extra_redis.lock().unwrap_or_else(|p| p.into_inner()).drain(..) {
            let _ = std::process::Command::new("redis-cli")
                .args(["-p", &port.to_string(), "shutdown", "nosave"])
                .stdin(std::process::Stdio::null())
                .output();
        }
        let _ = run_script_blocking(&self.env(), &["stop", "all"]);
    }
}

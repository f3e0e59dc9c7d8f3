//! The fault run: mixed load over the four services while, in turn, a Redis
//! master is killed, a third of the slots are resharded, the PostgreSQL
//! replica and then the primary are restarted, and service instances are
//! SIGKILLed and restarted; then a check of everything the load generator
//! saw acknowledged (Jepsen's habit: count what was acknowledged, then look
//! for it).
//!
//! Run it through `deploy/local/fault-run.sh`, which starts a private
//! PostgreSQL pair and Redis Cluster on ports of its own and passes them in
//! the environment `deploy/local/infra.sh` reads (`MESH_LOCAL_DIR`,
//! `MESH_PG_PRIMARY_PORT`, `MESH_PG_REPLICA_PORT`, `MESH_REDIS_PORTS`); this
//! program refuses the default ports, so it can never fault the shared stack.
//! It starts the four release binaries itself (`--bin-dir`), each service's
//! log in `--logs`.
//!
//! # What the load does, and what counts as wrong
//!
//! - **session**: CreateSession (a new user each, so no per-user cap evicts),
//!   ValidateSession with touch, then every other session revoked
//!   (RevokeSession by token) and validated again. A valid, unrevoked token
//!   answered UNAUTHENTICATED, or an acknowledged-revoked token answered OK,
//!   is a wrong answer.
//! - **ratelimit**: Check in domain `fault` (fail_closed) on descriptor `fa`,
//!   `fb` or both in one call (two hash slots, decided all-or-nothing), each
//!   a fixed window of `--limit` per second the load exceeds. The window is
//!   the Redis server's clock's second; an OK whose request and response
//!   fell in the same second of this machine's clock is counted in that
//!   window: more OKs in one window than the limit is a wrong answer.
//! - **audit**: Append with a fresh idempotency key; a failed Append is
//!   retried with the same key until acknowledged (after the load stops too).
//! - **data**: Put (unconditional) on a few keys per caller, then Get of an
//!   acknowledged key with the Put's consistency token. UNAUTHENTICATED for
//!   the caller's valid token, NOT_FOUND or an older version than the
//!   acknowledged one is a wrong answer.
//!
//! # Checks after the load
//!
//! Every acknowledged session validates; every acknowledged revocation is
//! still in force (UNAUTHENTICATED); every acknowledged document is at its
//! acknowledged version or later; the data service's audit outbox drains
//! and every acknowledged Put has its audit event (resource `fault/<key>`,
//! metadata `version`); every acknowledged Append is in the log (Query) with
//! the sequence and hash it was acknowledged with, and exactly once; Verify
//! over the whole chain is ok. Exit status 1 when anything acknowledged is
//! missing or any answer was wrong, 2 when the run itself failed.
//!
//! # Per phase
//!
//! Errors by operation and status code with when they began and ended, each
//! service's readiness sampled every ~200 ms (time not SERVING), when every
//! service was ready again after the fault, and the machine's CPU use
//! (`mesh_bench::cpu`). A phase ends once no call failed for `--settle-secs`
//! and every service is ready, or `--max-recovery-secs` after its fault.
//! Results: `libs/bench/results/fault-run.md`.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    fmt::Write as _,
    fs::OpenOptions,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Command, ExitCode, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, bail};
use clap::Parser;
use futures::{StreamExt as _, stream};
use mesh_bench::{ChildService, cpu};
use mesh_proto::{
    audit::{
        self, AppendRequest, AuditEvent, EventFilter, VerifyRequest, audit_service_client::AuditServiceClient,
    },
    data::{GetRequest, PutRequest, data_service_client::DataServiceClient},
    ratelimit::{
        CheckRequest, Code as RlCode, Descriptor, Entry, rate_limit_service_client::RateLimitServiceClient,
    },
    session::{
        CreateSessionRequest, RevokeSessionRequest, ValidateSessionRequest, revoke_session_request,
        session_service_client::SessionServiceClient,
    },
};
use mesh_testkit::Infra;
use rand::Rng as _;
use serde_json::json;
use tonic::{Code, Request, Status, metadata::AsciiMetadataValue, transport::Channel};
use tonic_health::pb::health_check_response::ServingStatus;

#[derive(Debug, Parser)]
#[command(
    about = "Mixed load over the four services through Redis, PostgreSQL and service faults; checks what was acknowledged"
)]
struct Args {
    /// Where the service binaries are.
    #[arg(long, default_value = "target/release")]
    bin_dir: PathBuf,
    /// Where each service's log goes (`<service>.log`).
    #[arg(long, default_value = "target/fault-run")]
    logs: PathBuf,
    /// Concurrent callers of each kind (session, ratelimit, audit, data).
    #[arg(long, default_value_t = 4)]
    workers: usize,
    /// Seconds of load before the first fault.
    #[arg(long, default_value_t = 10)]
    baseline_secs: u64,
    /// A phase is over once no call failed for this many seconds and every
    /// service is ready.
    #[arg(long, default_value_t = 5)]
    settle_secs: u64,
    /// Longest a phase waits for that after its fault (then it moves on and
    /// says the phase did not recover).
    #[arg(long, default_value_t = 60)]
    max_recovery_secs: u64,
    /// How long a stopped PostgreSQL server stays down.
    #[arg(long, default_value_t = 5)]
    pg_down_secs: u64,
    /// Checks per second each rate-limit descriptor allows (fixed window).
    #[arg(long, default_value_t = 20)]
    limit: u32,
    /// Service instances SIGKILLed and restarted, one phase each.
    #[arg(long, value_delimiter = ',', default_value = "data,session")]
    kill: Vec<String>,
    /// `MESH_RATELIMIT_REDIS_TIMEOUT_MS` (the service's default is 10 ms; on
    /// a loaded 2-core machine Redis round trips under load take longer).
    #[arg(long, default_value_t = 100)]
    ratelimit_redis_timeout_ms: u64,
}

/// Client-side bound on any one call.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// A caller's pause after a failed call (so an outage is not a busy loop).
const ERROR_PAUSE: Duration = Duration::from_millis(20);
/// Rate-limit domain of the checked limits.
const RL_DOMAIN: &str = "fault";
/// Data collection.
const COLLECTION: &str = "fault";
/// Keys each data caller writes.
const KEYS_PER_WORKER: usize = 16;
/// Schemas of the audit and data services.
const AUDIT_SCHEMA: &str = "fault_audit";
const DATA_SCHEMA: &str = "fault_data";
/// Audit action of the generator's own events.
const APPEND_ACTION: &str = "fault.append";

// ---------------------------------------------------------------- the infrastructure

/// The private infrastructure `deploy/local/fault-run.sh` started.
#[derive(Debug, Clone)]
struct Cluster {
    infra: Infra,
    local_dir: PathBuf,
    infra_sh: PathBuf,
}

impl Cluster {
    fn from_env() -> anyhow::Result<Self> {
        let var = |k: &str| {
            std::env::var(k).with_context(|| format!("{k} is not set: run deploy/local/fault-run.sh"))
        };
        let local_dir = PathBuf::from(var("MESH_LOCAL_DIR")?);
        let pg_primary_port: u16 = var("MESH_PG_PRIMARY_PORT")?.parse()?;
        let pg_replica_port: u16 = var("MESH_PG_REPLICA_PORT")?.parse()?;
        let redis_ports: Vec<u16> =
            var("MESH_REDIS_PORTS")?.split_whitespace().map(str::parse).collect::<Result<_, _>>()?;
        if redis_ports.len() != 6 {
            bail!("MESH_REDIS_PORTS must list 6 ports");
        }
        let shared = [55432, 55433, 7000, 7001, 7002, 7003, 7004, 7005];
        if [pg_primary_port, pg_replica_port].iter().chain(&redis_ports).any(|p| shared.contains(p)) {
            bail!("refusing to fault the shared local stack's ports: use deploy/local/fault-run.sh");
        }
        let infra_sh = mesh_testkit::repo_root().join("deploy/local/infra.sh");
        Ok(Self { infra: Infra { pg_primary_port, pg_replica_port, redis_ports }, local_dir, infra_sh })
    }

    /// `deploy/local/infra.sh args…` on this infrastructure (the environment is inherited).
    async fn infra_sh(&self, args: &[&str]) -> anyhow::Result<()> {
        let out = tokio::process::Command::new("bash")
            .arg(&self.infra_sh)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .await?;
        if !out.status.success() {
            bail!("infra.sh {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(())
    }

    async fn redis_cli(&self, port: u16, args: &[&str]) -> anyhow::Result<String> {
        let out = tokio::process::Command::new("redis-cli")
            .args(["-p", &port.to_string()])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .await?;
        if !out.status.success() {
            bail!("redis-cli {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// CLUSTER NODES as one live node sees it, skipping `dead`.
    async fn nodes(&self, dead: Option<u16>) -> anyhow::Result<Vec<Node>> {
        for &port in &self.infra.redis_ports {
            if Some(port) == dead {
                continue;
            }
            if let Ok(text) = self.redis_cli(port, &["cluster", "nodes"]).await
                && !text.trim().is_empty()
            {
                return Ok(text.lines().filter_map(Node::parse).collect());
            }
        }
        bail!("no redis node answered CLUSTER NODES")
    }

    /// Slots served by masters other than `dead` not flagged as failing.
    async fn covered_slots(&self, dead: u16) -> u32 {
        match self.nodes(Some(dead)).await {
            Ok(nodes) => {
                nodes.iter().filter(|n| n.master && !n.failing && n.port != dead).map(|n| n.slots).sum()
            }
            Err(_) => 0,
        }
    }

    fn redis_pid(&self, port: u16) -> anyhow::Result<u32> {
        let path = self.local_dir.join(format!("redis/{port}/redis.pid"));
        Ok(std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?
            .trim()
            .parse()?)
    }
}

/// One line of CLUSTER NODES.
#[derive(Debug, Clone)]
struct Node {
    id: String,
    port: u16,
    master: bool,
    failing: bool,
    slots: u32,
}

impl Node {
    fn parse(line: &str) -> Option<Self> {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 8 {
            return None;
        }
        let port = f[1].split('@').next()?.rsplit(':').next()?.parse().ok()?;
        let slots = f[8..]
            .iter()
            .filter(|s| !s.starts_with('['))
            .map(|s| match s.split_once('-') {
                Some((a, b)) => b.parse::<u32>().unwrap_or(0) + 1 - a.parse::<u32>().unwrap_or(0),
                None => 1,
            })
            .sum();
        Some(Self {
            id: f[0].to_owned(),
            port,
            master: f[2].contains("master"),
            failing: f[2].contains("fail"),
            slots,
        })
    }
}

// ---------------------------------------------------------------- the services

/// The four services, each a child process on fixed ports (kept across restarts).
struct Services {
    bin_dir: PathBuf,
    logs: PathBuf,
    env: HashMap<&'static str, Vec<(String, String)>>,
    running: Mutex<HashMap<&'static str, ChildService>>,
}

const SERVICES: [&str; 4] = ["ratelimit", "audit", "session", "data"];

impl Services {
    fn addr(&self, name: &str) -> SocketAddr {
        self.running.lock().expect("lock")[name].addr
    }

    /// Starts `mesh-<name>` on `addr`/`metrics` and waits until it is ready.
    async fn start(&self, name: &'static str, addr: SocketAddr, metrics: SocketAddr) -> anyhow::Result<()> {
        let path = self.bin_dir.join(format!("mesh-{name}"));
        if !path.exists() {
            bail!("{} is missing: cargo build --release -p mesh-{name}", path.display());
        }
        let log = OpenOptions::new().create(true).append(true).open(self.logs.join(format!("{name}.log")))?;
        let mut cmd = Command::new(&path);
        cmd.env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
            .envs(self.env[name].iter().map(|(k, v)| (k, v)))
            .env("MESH_LISTEN_ADDR", addr.to_string())
            .env("MESH_METRICS_ADDR", metrics.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        let child = cmd.spawn().with_context(|| format!("starting {}", path.display()))?;
        let pid = child.id();
        // The script kills what is left of these if this program dies first.
        if let Ok(mut f) = OpenOptions::new().create(true).append(true).open(self.logs.join("pids")) {
            use std::io::Write as _;
            let _ = writeln!(f, "{pid}");
        }
        self.running.lock().expect("lock").insert(name, ChildService { child, addr, metrics });
        wait_ready(addr, Duration::from_secs(60))
            .await
            .with_context(|| format!("mesh-{name} did not become ready"))?;
        Ok(())
    }

    /// SIGKILLs `name` and starts it again on the same ports; how long until it was ready again.
    async fn kill_and_restart(&self, name: &'static str) -> anyhow::Result<Duration> {
        let (addr, metrics) = {
            let mut running = self.running.lock().expect("lock");
            let svc = running.get_mut(name).with_context(|| format!("no service {name}"))?;
            svc.child.kill()?; // SIGKILL
            svc.child.wait()?;
            (svc.addr, svc.metrics)
        };
        let start = Instant::now();
        self.start(name, addr, metrics).await?;
        Ok(start.elapsed())
    }
}

async fn wait_ready(addr: SocketAddr, timeout: Duration) -> anyhow::Result<()> {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if ready(addr).await {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("not ready within {timeout:?}")
}

async fn ready(addr: SocketAddr) -> bool {
    let Ok(endpoint) = tonic::transport::Endpoint::from_shared(format!("http://{addr}")) else {
        return false;
    };
    let endpoint = endpoint.connect_timeout(Duration::from_millis(500)).timeout(Duration::from_secs(1));
    let Ok(ch) = endpoint.connect().await else { return false };
    matches!(mesh_testkit::health_status(&ch, "readiness").await, Ok(ServingStatus::Serving))
}

// ---------------------------------------------------------------- what happened

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_millis() as u64
}

fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// Calls and errors of one phase.
#[derive(Debug, Default)]
struct PhaseStats {
    ok: BTreeMap<&'static str, u64>,
    errors: BTreeMap<(&'static str, &'static str), u64>,
    /// One message per (operation, code).
    /// Per (operation, code): the first message, and when the first and the
    /// last such error happened (ms since the phase began).
    samples: BTreeMap<(&'static str, &'static str), (String, u64, u64)>,
    /// Milliseconds since the phase began.
    first_error_ms: Option<u64>,
    last_error_ms: Option<u64>,
    /// Milliseconds each service's readiness was not SERVING (sampled).
    not_ready_ms: BTreeMap<&'static str, u64>,
}

/// Everything the workers record.
#[derive(Debug)]
struct Record {
    phase: AtomicUsize,
    phase_started_ms: AtomicU64,
    last_error_ms: AtomicU64,
    phases: Mutex<Vec<PhaseStats>>,
    wrong: Mutex<BTreeMap<&'static str, (u64, Vec<String>)>>,
    ledger: Mutex<Ledger>,
}

/// What was acknowledged.
#[derive(Debug, Default)]
struct Ledger {
    /// Tokens of acknowledged sessions nobody tried to revoke.
    live: Vec<String>,
    /// Tokens whose revocation was acknowledged.
    revoked: Vec<String>,
    /// Acknowledged Appends: id → (sequence, hash).
    appends: HashMap<String, (u64, Vec<u8>)>,
    /// Appends still unacknowledged when the load stopped (retried after).
    pending_appends: Vec<AppendRequest>,
    /// Latest acknowledged Put per key: (version, n, consistency token).
    docs: HashMap<String, (u64, u64, String)>,
    /// Every acknowledged Put: (key, version).
    puts: Vec<(String, u64)>,
    /// OK Checks as (request sent, response received) in ms since the epoch, per descriptor.
    allowed: HashMap<&'static str, Vec<(u64, u64)>>,
}

impl Record {
    fn new() -> Self {
        Self {
            phase: AtomicUsize::new(0),
            phase_started_ms: AtomicU64::new(now_ms()),
            last_error_ms: AtomicU64::new(0),
            phases: Mutex::new(vec![PhaseStats::default()]),
            wrong: Mutex::new(BTreeMap::new()),
            ledger: Mutex::new(Ledger::default()),
        }
    }

    fn next_phase(&self) {
        self.phases.lock().expect("lock").push(PhaseStats::default());
        self.phase_started_ms.store(now_ms(), Ordering::Relaxed);
        self.phase.fetch_add(1, Ordering::Relaxed);
    }

    fn ok(&self, op: &'static str) {
        let i = self.phase.load(Ordering::Relaxed);
        *self.phases.lock().expect("lock")[i].ok.entry(op).or_default() += 1;
    }

    fn error(&self, op: &'static str, status: &Status) {
        let now = now_ms();
        self.last_error_ms.store(now, Ordering::Relaxed);
        let at = now.saturating_sub(self.phase_started_ms.load(Ordering::Relaxed));
        let i = self.phase.load(Ordering::Relaxed);
        let code = code_name(status.code());
        let mut phases = self.phases.lock().expect("lock");
        let p = &mut phases[i];
        *p.errors.entry((op, code)).or_default() += 1;
        let sample = p
            .samples
            .entry((op, code))
            .or_insert_with(|| (status.message().chars().take(160).collect(), at, at));
        sample.2 = at;
        p.first_error_ms.get_or_insert(at);
        p.last_error_ms = Some(at);
    }

    /// Counts `result` under `op`.
    fn count<T>(&self, op: &'static str, result: &Result<T, Status>) {
        match result {
            Ok(_) => self.ok(op),
            Err(s) => self.error(op, s),
        }
    }

    fn not_ready(&self, service: &'static str, ms: u64) {
        let i = self.phase.load(Ordering::Relaxed);
        *self.phases.lock().expect("lock")[i].not_ready_ms.entry(service).or_default() += ms;
    }

    fn wrong(&self, kind: &'static str, detail: String) {
        let mut wrong = self.wrong.lock().expect("lock");
        let (n, samples) = wrong.entry(kind).or_default();
        *n += 1;
        if samples.len() < 5 {
            samples.push(detail);
        }
    }

    fn ledger(&self) -> std::sync::MutexGuard<'_, Ledger> {
        self.ledger.lock().expect("lock")
    }
}

/// Runs one call with the client-side bound.
async fn call<T>(fut: impl Future<Output = Result<tonic::Response<T>, Status>>) -> Result<T, Status> {
    match tokio::time::timeout(CALL_TIMEOUT, fut).await {
        Ok(r) => r.map(tonic::Response::into_inner),
        Err(_) => Err(Status::deadline_exceeded("no answer within the client's 5 s bound")),
    }
}

fn short(token: &str) -> String {
    format!("{}…", token.chars().take(8).collect::<String>())
}

// ---------------------------------------------------------------- the load

#[derive(Clone)]
struct Clients {
    session: SessionServiceClient<Channel>,
    ratelimit: RateLimitServiceClient<Channel>,
    audit: AuditServiceClient<Channel>,
    data: DataServiceClient<Channel>,
}

impl Clients {
    async fn connect(services: &Services) -> Self {
        Self {
            session: SessionServiceClient::new(mesh_testkit::channel(services.addr("session")).await),
            ratelimit: RateLimitServiceClient::new(mesh_testkit::channel(services.addr("ratelimit")).await),
            audit: AuditServiceClient::new(mesh_testkit::channel(services.addr("audit")).await),
            data: DataServiceClient::new(mesh_testkit::channel(services.addr("data")).await),
        }
    }
}

async fn validate(c: &mut Clients, token: &str, touch: bool) -> Result<(), Status> {
    call(c.session.validate_session(ValidateSessionRequest { token: token.to_owned(), touch }))
        .await
        .map(|_| ())
}

/// ValidateSession of a token that must be valid.
async fn check_valid(rec: &Record, c: &mut Clients, token: &str) {
    let r = validate(c, token, true).await;
    rec.count("session.validate", &r);
    if let Err(s) = r
        && s.code() == Code::Unauthenticated
    {
        rec.wrong(
            "valid session token answered UNAUTHENTICATED",
            format!("{}: {}", short(token), s.message()),
        );
    }
}

async fn session_worker(rec: Arc<Record>, mut c: Clients, w: usize, stop: Arc<AtomicBool>) {
    let mut mine: Vec<String> = Vec::new();
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let r = call(c.session.create_session(CreateSessionRequest {
            user_id: format!("fault-s{w}-{n}"),
            ..Default::default()
        }))
        .await;
        rec.count("session.create", &r);
        let Ok(created) = r else {
            tokio::time::sleep(ERROR_PAUSE).await;
            continue;
        };
        let token = created.token;
        check_valid(&rec, &mut c, &token).await;
        if n.is_multiple_of(2) {
            let r = call(c.session.revoke_session(RevokeSessionRequest {
                target: Some(revoke_session_request::Target::Token(token.clone())),
                ..Default::default()
            }))
            .await;
            rec.count("session.revoke", &r);
            // An unacknowledged revocation may or may not have happened: not checked.
            if r.is_ok() {
                rec.ledger().revoked.push(token.clone());
                let r = validate(&mut c, &token, false).await;
                match &r {
                    Ok(()) => {
                        rec.ok("session.validate-revoked");
                        rec.wrong("revoked session token answered OK", short(&token));
                    }
                    Err(s) if s.code() == Code::Unauthenticated => rec.ok("session.validate-revoked"),
                    Err(s) => rec.error("session.validate-revoked", s),
                }
            }
        } else {
            rec.ledger().live.push(token.clone());
            mine.push(token);
        }
        // An older session of this caller: sessions must not drop out.
        if !mine.is_empty() {
            let old = mine[rand::rng().random_range(0..mine.len())].clone();
            check_valid(&rec, &mut c, &old).await;
        }
    }
}

/// The descriptor sets the rate-limit callers send, by name.
const RL_SETS: [(&str, &[&str]); 3] = [("fa", &["fa"]), ("fb", &["fb"]), ("fa+fb", &["fa", "fb"])];

async fn ratelimit_worker(rec: Arc<Record>, mut c: Clients, w: usize, stop: Arc<AtomicBool>) {
    let (_, keys) = RL_SETS[w % RL_SETS.len()];
    let req = CheckRequest {
        domain: RL_DOMAIN.into(),
        descriptors: keys
            .iter()
            .map(|k| Descriptor {
                entries: vec![Entry { key: (*k).into(), value: "all".into() }],
                hits_addend: None,
            })
            .collect(),
        hits_addend: 1,
    };
    while !stop.load(Ordering::Relaxed) {
        let sent = now_ms();
        let r = call(c.ratelimit.check(req.clone())).await;
        let received = now_ms();
        rec.count("ratelimit.check", &r);
        if let Ok(resp) = r
            && resp.overall_code == RlCode::Ok as i32
        {
            let mut ledger = rec.ledger();
            for k in keys {
                let k: &'static str = if *k == "fa" { "fa" } else { "fb" };
                ledger.allowed.entry(k).or_default().push((sent, received));
            }
        }
        // Paced: the limit is exceeded many times over anyway, and the
        // refusals (from the over-limit cache) would take the CPU the other
        // callers need on a small machine.
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn append_request(w: usize, n: u64) -> AppendRequest {
    let now = SystemTime::now();
    AppendRequest {
        event: Some(AuditEvent {
            occurred_at: Some(now.into()),
            actor: Some(audit::Actor { r#type: "service".into(), id: format!("fault-a{w}") }),
            action: APPEND_ACTION.into(),
            resource: Some(audit::Resource { r#type: "fault".into(), id: format!("{w}-{n}") }),
            outcome: audit::Outcome::Success as i32,
            source: Some(audit::Source { service: "fault-run".into(), ..Default::default() }),
            metadata: Some(mesh_testkit::json::object(json!({ "worker": w, "n": n }))),
            ..Default::default()
        }),
        idempotency_key: uuid::Uuid::new_v4().to_string(),
    }
}

async fn audit_worker(rec: Arc<Record>, mut c: Clients, w: usize, stop: Arc<AtomicBool>) {
    let mut n = 0u64;
    let mut pending: Option<AppendRequest> = None;
    while !stop.load(Ordering::Relaxed) {
        let req = pending.take().unwrap_or_else(|| {
            n += 1;
            append_request(w, n)
        });
        let r = call(c.audit.append(req.clone())).await;
        rec.count("audit.append", &r);
        match r {
            Ok(resp) => {
                rec.ledger().appends.insert(resp.id, (resp.sequence, resp.hash));
            }
            Err(_) => {
                pending = Some(req);
                tokio::time::sleep(ERROR_PAUSE).await;
            }
        }
    }
    if let Some(req) = pending {
        rec.ledger().pending_appends.push(req);
    }
}

fn authed<T>(auth: &AsciiMetadataValue, body: T) -> Request<T> {
    let mut req = Request::new(body);
    req.metadata_mut().insert("authorization", auth.clone());
    req
}

fn doc_key(w: usize, i: usize) -> String {
    format!("w{w}-k{i}")
}

/// `n` of a document the load wrote.
fn doc_n(doc: &Option<prost_types::Struct>) -> Option<u64> {
    use prost_types::value::Kind;
    match doc.as_ref()?.fields.get("n")?.kind {
        Some(Kind::NumberValue(n)) => Some(n as u64),
        _ => None,
    }
}

/// Get of `key` with the consistency token of its latest acknowledged Put:
/// the answer must be that version or a later one.
async fn check_doc(
    rec: &Record,
    c: &mut Clients,
    auth: &AsciiMetadataValue,
    key: &str,
    (version, n, token): (u64, u64, String),
    op: &'static str,
) -> Result<(), Status> {
    let r = call(c.data.get(authed(
        auth,
        GetRequest { collection: COLLECTION.into(), key: key.to_owned(), consistency_token: token },
    )))
    .await;
    rec.count(op, &r);
    match r {
        Ok(got) if got.version < version => rec.wrong(
            "data read older than an acknowledged write",
            format!("{key}: v{} < v{version}", got.version),
        ),
        Ok(got) if got.version == version && doc_n(&got.document) != Some(n) => rec.wrong(
            "data read of another write under an acknowledged version",
            format!("{key} v{version}: n {:?}, acknowledged {n}", doc_n(&got.document)),
        ),
        Ok(_) => {}
        Err(s) if s.code() == Code::NotFound => {
            rec.wrong("acknowledged document NOT_FOUND", format!("{key} v{version}"))
        }
        Err(s) if s.code() == Code::Unauthenticated => {
            rec.wrong("data call with a valid token answered UNAUTHENTICATED", s.message().to_owned())
        }
        Err(s) => return Err(s),
    }
    Ok(())
}

async fn data_worker(
    rec: Arc<Record>,
    mut c: Clients,
    w: usize,
    auth: AsciiMetadataValue,
    stop: Arc<AtomicBool>,
) {
    let mut n = 0u64;
    let mut mine: HashMap<String, (u64, u64, String)> = HashMap::new();
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let key = doc_key(w, n as usize % KEYS_PER_WORKER);
        let doc = mesh_testkit::json::object(json!({ "w": w, "n": n }));
        let r = call(c.data.put(authed(
            &auth,
            PutRequest {
                collection: COLLECTION.into(),
                key: key.clone(),
                document: Some(doc),
                expected_version: None,
            },
        )))
        .await;
        rec.count("data.put", &r);
        match r {
            Ok(resp) => {
                if let Some((v, ..)) = mine.get(&key)
                    && resp.version <= *v
                {
                    rec.wrong(
                        "data put acknowledged a version not above an earlier one",
                        format!("{key}: v{} after v{v}", resp.version),
                    );
                }
                let acked = (resp.version, n, resp.consistency_token);
                mine.insert(key.clone(), acked.clone());
                let mut ledger = rec.ledger();
                ledger.puts.push((key.clone(), resp.version));
                ledger.docs.insert(key, acked);
            }
            Err(s) => {
                if s.code() == Code::Unauthenticated {
                    rec.wrong(
                        "data call with a valid token answered UNAUTHENTICATED",
                        s.message().to_owned(),
                    );
                }
                tokio::time::sleep(ERROR_PAUSE).await;
            }
        }
        let pick = doc_key(w, rand::rng().random_range(0..KEYS_PER_WORKER));
        if let Some(acked) = mine.get(&pick).cloned() {
            let _ = check_doc(&rec, &mut c, &auth, &pick, acked, "data.get").await;
        }
    }
}

// ---------------------------------------------------------------- phases

#[derive(Debug, Clone)]
enum Fault {
    None,
    KillRedisMaster,
    Reshard,
    RestartPgReplica,
    RestartPgPrimary,
    KillService(&'static str),
}

impl Fault {
    fn name(&self) -> String {
        match self {
            Fault::None => "baseline".into(),
            Fault::KillRedisMaster => "redis master SIGKILL".into(),
            Fault::Reshard => "reshard 1/3 of slots".into(),
            Fault::RestartPgReplica => "pg replica stop/start".into(),
            Fault::RestartPgPrimary => "pg primary stop/start".into(),
            Fault::KillService(s) => format!("mesh-{s} SIGKILL"),
        }
    }
}

/// What one phase did and saw.
#[derive(Debug)]
struct PhaseReport {
    name: String,
    /// What the fault did, with its timings.
    action: String,
    /// How long the fault itself took (kill to rejoin, reshard, stop to start).
    fault_secs: f64,
    /// Whether the phase saw a clean period and every service ready.
    recovered: bool,
    /// Seconds from the phase start to every service ready again (after the fault).
    ready_secs: Option<f64>,
    cpu: cpu::Usage,
}

async fn inject(
    fault: &Fault,
    cluster: &Cluster,
    services: &Services,
    args: &Args,
) -> anyhow::Result<String> {
    match fault {
        Fault::None => {
            tokio::time::sleep(Duration::from_secs(args.baseline_secs)).await;
            Ok(format!("{} s of load", args.baseline_secs))
        }
        Fault::KillRedisMaster => {
            let nodes = cluster.nodes(None).await?;
            let victim = nodes
                .iter()
                .filter(|n| n.master && n.slots > 0)
                .max_by_key(|n| n.slots)
                .context("no master serving slots")?
                .clone();
            let pid = cluster.redis_pid(victim.port)?;
            let start = Instant::now();
            let status = Command::new("kill").args(["-KILL", &pid.to_string()]).status()?;
            if !status.success() {
                bail!("kill -KILL {pid} failed");
            }
            let deadline = start + Duration::from_secs(60);
            while cluster.covered_slots(victim.port).await < 16384 {
                if Instant::now() > deadline {
                    bail!("no failover of 127.0.0.1:{} within 60 s", victim.port);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let failover = start.elapsed();
            cluster.infra_sh(&["start", "redis"]).await?;
            Ok(format!(
                "SIGKILL of master 127.0.0.1:{} ({} slots); slots served again after {:.1} s; node restarted, cluster ok with every master replicated after {:.1} s",
                victim.port,
                victim.slots,
                failover.as_secs_f64(),
                start.elapsed().as_secs_f64()
            ))
        }
        Fault::Reshard => {
            let nodes = cluster.nodes(None).await?;
            let target = nodes
                .iter()
                .filter(|n| n.master && !n.failing)
                .min_by_key(|n| n.slots)
                .context("no master")?
                .clone();
            let start = Instant::now();
            let out = tokio::process::Command::new("redis-cli")
                .args(["--cluster", "reshard", &format!("127.0.0.1:{}", target.port)])
                .args(["--cluster-from", "all", "--cluster-to", &target.id])
                .args(["--cluster-slots", "5461", "--cluster-yes"])
                .stdin(Stdio::null())
                .output()
                .await?;
            if !out.status.success() {
                let text = String::from_utf8_lossy(&out.stdout);
                let tail: Vec<&str> = text.lines().rev().take(5).collect();
                bail!("redis-cli --cluster reshard failed: {}", tail.join(" / "));
            }
            let moved = start.elapsed();
            cluster.infra_sh(&["start", "redis"]).await?;
            Ok(format!(
                "`redis-cli --cluster reshard` of 5461 slots from every master to 127.0.0.1:{} (had {}) took {:.1} s; cluster check ok after {:.1} s",
                target.port,
                target.slots,
                moved.as_secs_f64(),
                start.elapsed().as_secs_f64()
            ))
        }
        Fault::RestartPgReplica | Fault::RestartPgPrimary => {
            let which = if matches!(fault, Fault::RestartPgReplica) { "pg-replica" } else { "pg-primary" };
            let start = Instant::now();
            cluster.infra_sh(&["stop", which]).await?;
            let stopped = start.elapsed();
            tokio::time::sleep(Duration::from_secs(args.pg_down_secs)).await;
            cluster.infra_sh(&["start", "pg"]).await?;
            Ok(format!(
                "fast shutdown of the {} ({:.1} s), down {} s, started again after {:.1} s in all",
                &which[3..],
                stopped.as_secs_f64(),
                args.pg_down_secs,
                start.elapsed().as_secs_f64()
            ))
        }
        Fault::KillService(name) => {
            let took = services.kill_and_restart(name).await?;
            Ok(format!(
                "SIGKILL of mesh-{name}, restarted on the same ports, ready again after {:.1} s",
                took.as_secs_f64()
            ))
        }
    }
}

/// Samples every service's readiness until `stop`, adding the time between
/// samples to each one found not SERVING.
async fn readiness_sampler(rec: Arc<Record>, addrs: Vec<(&'static str, SocketAddr)>, stop: Arc<AtomicBool>) {
    let mut last = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        let states = futures::future::join_all(addrs.iter().map(|(_, a)| ready(*a))).await;
        let ms = last.elapsed().as_millis() as u64;
        last = Instant::now();
        for ((name, _), up) in addrs.iter().zip(states) {
            if !up {
                rec.not_ready(name, ms);
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn all_ready(services: &Services) -> bool {
    let addrs: Vec<SocketAddr> = SERVICES.iter().map(|s| services.addr(s)).collect();
    futures::future::join_all(addrs.into_iter().map(ready)).await.into_iter().all(|r| r)
}

async fn run_phase(
    fault: &Fault,
    rec: &Record,
    cluster: &Cluster,
    services: &Services,
    args: &Args,
) -> anyhow::Result<PhaseReport> {
    let name = fault.name();
    eprintln!("phase: {name}");
    let started = Instant::now();
    let cpu_before = cpu::Snapshot::take();
    let action = inject(fault, cluster, services, args).await?;
    let fault_secs = started.elapsed().as_secs_f64();
    eprintln!("  {action}");
    let settle = Duration::from_secs(args.settle_secs);
    let max = Duration::from_secs(args.max_recovery_secs);
    let after_fault = Instant::now();
    let mut ready_secs = None;
    let recovered = loop {
        if ready_secs.is_none() && all_ready(services).await {
            ready_secs = Some(started.elapsed().as_secs_f64());
        }
        let quiet_ms = now_ms().saturating_sub(rec.last_error_ms.load(Ordering::Relaxed));
        if ready_secs.is_some()
            && quiet_ms >= settle.as_millis() as u64
            && after_fault.elapsed() >= Duration::from_secs(1)
        {
            break true;
        }
        if after_fault.elapsed() > max {
            break false;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let cpu = cpu::Usage::between(&cpu_before, &cpu::Snapshot::take(), started.elapsed());
    Ok(PhaseReport { name, action, fault_secs, recovered, ready_secs, cpu })
}

// ---------------------------------------------------------------- checks after the load

/// One line of the final checks.
#[derive(Debug)]
struct Check {
    what: String,
    checked: u64,
    missing: u64,
    detail: String,
}

fn check(what: &str, checked: u64, missing: u64, detail: impl Into<String>) -> Check {
    Check { what: what.to_owned(), checked, missing, detail: detail.into() }
}

/// Retries `f` while it answers anything but what it is asked about, for up to 30 s.
async fn settled<T, F, Fut>(mut f: F) -> Result<T, Status>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, Status>>,
{
    let start = Instant::now();
    loop {
        match f().await {
            Err(s)
                if matches!(
                    s.code(),
                    Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Unknown
                ) && start.elapsed() < Duration::from_secs(30) =>
            {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            r => return r,
        }
    }
}

async fn check_sessions(c: &Clients, live: &[String], revoked: &[String]) -> Vec<Check> {
    let results: Vec<(bool, Result<(), Status>)> = stream::iter(
        live.iter().map(|t| (true, t.clone())).chain(revoked.iter().map(|t| (false, t.clone()))),
    )
    .map(|(valid, token)| {
        let c = c.clone();
        async move {
            let r = settled(|| {
                let mut c = c.clone();
                let token = token.clone();
                async move { validate(&mut c, &token, false).await }
            })
            .await;
            (valid, r)
        }
    })
    .buffer_unordered(16)
    .collect()
    .await;
    let (mut lost, mut kept, mut unknown) = (0, 0, 0);
    for (valid, r) in &results {
        match (valid, r) {
            (true, Err(s)) if s.code() == Code::Unauthenticated => lost += 1,
            (false, Ok(())) => kept += 1,
            (_, Err(s)) if s.code() != Code::Unauthenticated => unknown += 1,
            _ => {}
        }
    }
    vec![
        check(
            "acknowledged sessions still valid",
            live.len() as u64,
            lost,
            format!("{unknown} of all session checks could not be answered"),
        ),
        check("acknowledged revocations still in force (UNAUTHENTICATED)", revoked.len() as u64, kept, ""),
    ]
}

async fn check_docs(
    rec: &Record,
    c: &Clients,
    auths: &[AsciiMetadataValue],
    docs: &HashMap<String, (u64, u64, String)>,
) -> Check {
    let wrong_before = rec.wrong.lock().expect("lock").values().map(|(n, _)| n).sum::<u64>();
    let mut unanswered = 0;
    for (key, acked) in docs {
        let w: usize = key[1..].split('-').next().and_then(|s| s.parse().ok()).unwrap_or(0);
        let auth = &auths[w % auths.len()];
        let r = settled(|| {
            let mut c = c.clone();
            let acked = acked.clone();
            async move { check_doc(rec, &mut c, auth, key, acked, "final.data.get").await }
        })
        .await;
        if r.is_err() {
            unanswered += 1;
        }
    }
    let wrong_after = rec.wrong.lock().expect("lock").values().map(|(n, _)| n).sum::<u64>();
    check(
        "acknowledged documents at their version or later",
        docs.len() as u64,
        wrong_after - wrong_before,
        format!("{unanswered} Gets not answered"),
    )
}

/// Every event a Query with `filter` returns (read from a replica; repeated
/// until two reads agree, so a lagging replica is not taken for a loss).
async fn query_all(c: &Clients, filter: EventFilter) -> anyhow::Result<Vec<AuditEvent>> {
    let mut previous: Option<usize> = None;
    let start = Instant::now();
    loop {
        let mut events = Vec::new();
        let mut page_token = String::new();
        loop {
            let mut client = c.audit.clone();
            let resp = settled(|| {
                let mut client = client.clone();
                let req = audit::QueryRequest {
                    filter: Some(filter.clone()),
                    page_size: 1000,
                    page_token: page_token.clone(),
                };
                async move { call(client.query(req)).await }
            })
            .await
            .context("audit Query")?;
            let _ = &mut client;
            events.extend(resp.events);
            if resp.next_page_token.is_empty() {
                break;
            }
            page_token = resp.next_page_token;
        }
        if previous == Some(events.len()) || start.elapsed() > Duration::from_secs(30) {
            return Ok(events);
        }
        previous = Some(events.len());
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

async fn check_audit(
    c: &Clients,
    appends: &HashMap<String, (u64, Vec<u8>)>,
    unresolved: usize,
) -> anyhow::Result<Vec<Check>> {
    let events = query_all(c, EventFilter { action: APPEND_ACTION.into(), ..Default::default() }).await?;
    let by_id: HashMap<&str, &AuditEvent> = events.iter().map(|e| (e.id.as_str(), e)).collect();
    let mut missing = 0;
    let mut samples = Vec::new();
    for (id, (seq, hash)) in appends {
        match by_id.get(id.as_str()) {
            Some(e) if e.sequence == *seq && e.hash == *hash => {}
            other => {
                missing += 1;
                if samples.len() < 3 {
                    samples.push(format!(
                        "{id} (acknowledged as #{seq}): {}",
                        if other.is_some() { "different sequence or hash" } else { "absent" }
                    ));
                }
            }
        }
    }
    // Each idempotency key was retried until acknowledged: one row each.
    let extra = events.len().saturating_sub(appends.len());
    let mut checks = vec![
        check(
            "acknowledged audit Appends present, same sequence and hash",
            appends.len() as u64,
            missing,
            samples.join("; "),
        ),
        check(
            "audit Appends recorded exactly once (retried with one idempotency key)",
            appends.len() as u64,
            if unresolved == 0 { extra as u64 } else { 0 },
            format!(
                "{} events of the load in the log; {unresolved} Appends never acknowledged",
                events.len()
            ),
        ),
    ];
    let verify = settled(|| {
        let mut a = c.audit.clone();
        async move { call(a.verify(VerifyRequest { from_sequence: 0, to_sequence: 0 })).await }
    })
    .await;
    checks.push(match verify {
        Ok(v) => check(
            "audit chain verifies (Verify over the whole log)",
            v.checked,
            u64::from(!v.ok),
            if v.ok {
                String::new()
            } else {
                format!("first bad sequence {:?}: {}", v.first_bad_sequence, v.problem)
            },
        ),
        Err(s) => {
            check("audit chain verifies (Verify over the whole log)", 0, 1, format!("Verify failed: {s}"))
        }
    });
    Ok(checks)
}

async fn check_data_audit(c: &Clients, cluster: &Cluster, puts: &[(String, u64)]) -> anyhow::Result<Check> {
    use sqlx::Connection as _;
    // The outbox drains: events the data service committed with each write.
    let mut pg = sqlx::PgConnection::connect(&cluster.infra.pg_primary_url()).await?;
    let start = Instant::now();
    let (pending, dead) = loop {
        let (pending, dead): (i64, i64) = sqlx::query_as(&format!(
            "select count(*) filter (where dead_at is null), count(*) filter (where dead_at is not null) from {DATA_SCHEMA}.audit_outbox"
        ))
        .fetch_one(&mut pg)
        .await?;
        if pending == 0 || start.elapsed() > Duration::from_secs(120) {
            break (pending, dead);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let drained = start.elapsed();
    let events = query_all(c, EventFilter { resource_type: "document".into(), ..Default::default() }).await?;
    let seen: HashSet<(String, u64)> = events
        .iter()
        .filter_map(|e| {
            let id = e.resource.as_ref()?.id.strip_prefix(&format!("{COLLECTION}/"))?.to_owned();
            let v = match e.metadata.as_ref()?.fields.get("version")?.kind {
                Some(prost_types::value::Kind::NumberValue(v)) => v as u64,
                _ => return None,
            };
            Some((id, v))
        })
        .collect();
    let missing: Vec<&(String, u64)> = puts.iter().filter(|p| !seen.contains(*p)).collect();
    Ok(check(
        "acknowledged Puts have their audit event",
        puts.len() as u64,
        missing.len() as u64,
        format!(
            "outbox: {pending} undelivered, {dead} refused for good, after {:.1} s{}",
            drained.as_secs_f64(),
            missing.first().map(|(k, v)| format!("; e.g. {k} v{v}")).unwrap_or_default()
        ),
    ))
}

/// OKs per fixed window against the limit, per descriptor.
fn check_limits(allowed: &HashMap<&'static str, Vec<(u64, u64)>>, limit: u32) -> Vec<Check> {
    let mut out = Vec::new();
    for k in ["fa", "fb"] {
        let mut per_window: BTreeMap<u64, u64> = BTreeMap::new();
        let mut ambiguous = 0;
        for (sent, received) in allowed.get(k).map(Vec::as_slice).unwrap_or_default() {
            if sent / 1000 == received / 1000 {
                *per_window.entry(sent / 1000).or_default() += 1;
            } else {
                ambiguous += 1;
            }
        }
        let over: Vec<(&u64, &u64)> = per_window.iter().filter(|(_, n)| **n > u64::from(limit)).collect();
        let max = per_window.values().max().copied().unwrap_or(0);
        out.push(check(
            &format!("rate limit `{k}`: OKs per 1 s window ≤ {limit}"),
            per_window.len() as u64,
            over.len() as u64,
            format!(
                "{} OKs in all, most in one window {max}; {ambiguous} OKs spanning a window edge not counted{}",
                allowed.get(k).map_or(0, Vec::len),
                over.first()
                    .map(|(w, n)| format!("; e.g. {n} OKs in the second starting {w}"))
                    .unwrap_or_default()
            ),
        ));
    }
    out
}

// ---------------------------------------------------------------- main

fn rules(limit: u32) -> String {
    format!(
        r#"domain: {RL_DOMAIN}
failure_mode: fail_closed
descriptors:
  - key: fa
    rate_limit: {{ unit: second, requests_per_unit: {limit}, algorithm: fixed_window, name: fa }}
  - key: fb
    rate_limit: {{ unit: second, requests_per_unit: {limit}, algorithm: fixed_window, name: fb }}
---
domain: session
failure_mode: fail_open
descriptors:
  - key: user_id
    rate_limit: {{ unit: second, requests_per_unit: 1000000, name: create_per_user }}
---
domain: data
failure_mode: fail_open
descriptors:
  - key: user_id
    rate_limit: {{ unit: second, requests_per_unit: 1000000, name: data_per_user }}
"#
    )
}

fn service_env(
    cluster: &Cluster,
    rules_path: &Path,
    args: &Args,
) -> HashMap<&'static str, Vec<(String, String)>> {
    let redis = cluster.infra.redis_urls().join(",");
    let db = |schema: &str| {
        vec![
            ("MESH_DATABASE_WRITE_URL".to_owned(), cluster.infra.pg_primary_url()),
            ("MESH_DATABASE_READ_URLS".to_owned(), cluster.infra.pg_replica_url()),
            ("MESH_DATABASE_SCHEMA".to_owned(), schema.to_owned()),
        ]
    };
    let kv = |k: &str, v: String| (k.to_owned(), v);
    let mut env = HashMap::new();
    env.insert(
        "ratelimit",
        vec![
            kv("MESH_REDIS_URLS", redis.clone()),
            kv("MESH_REDIS_KEY_PREFIX", "fault:rl:".into()),
            kv("MESH_RATELIMIT_RULES", rules_path.display().to_string()),
            kv("MESH_RATELIMIT_REDIS_TIMEOUT_MS", args.ratelimit_redis_timeout_ms.to_string()),
        ],
    );
    env.insert("audit", db(AUDIT_SCHEMA));
    env.insert(
        "session",
        vec![
            kv("MESH_REDIS_URLS", redis),
            kv("MESH_REDIS_KEY_PREFIX", "fault:s:".into()),
            kv("MESH_SESSION_AUDIT_HASH_KEY", "fault-run-only-audit-hash-key".into()),
        ],
    );
    let mut data = db(DATA_SCHEMA);
    data.push(kv("MESH_DATA_OUTBOX_RETRY_MAX_MS", "5000".into()));
    env.insert("data", data);
    env
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    match run(args).await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

async fn run(args: Args) -> anyhow::Result<bool> {
    use sqlx::Connection as _;
    let cluster = Cluster::from_env()?;
    std::fs::create_dir_all(&args.logs)?;
    let rules_path = args.logs.join("ratelimit.yaml");
    std::fs::write(&rules_path, rules(args.limit))?;
    let mut pg = sqlx::PgConnection::connect(&cluster.infra.pg_primary_url()).await?;
    for schema in [AUDIT_SCHEMA, DATA_SCHEMA] {
        sqlx::query(&format!("create schema if not exists {schema}")).execute(&mut pg).await?;
    }
    drop(pg);

    // Every address is picked first: dependants are configured with them.
    let mut ports: HashMap<&'static str, (SocketAddr, SocketAddr)> = HashMap::new();
    let mut taken = HashSet::new();
    for name in SERVICES {
        let mut pick = || loop {
            let a = mesh_testkit::free_addr();
            if taken.insert(a) {
                return a;
            }
        };
        ports.insert(name, (pick(), pick()));
    }
    let mut env = service_env(&cluster, &rules_path, &args);
    for name in ["session", "data"] {
        let e = env.get_mut(name).expect("listed");
        e.push(("MESH_RATELIMIT_ADDR".into(), format!("http://{}", ports["ratelimit"].0)));
        e.push(("MESH_AUDIT_ADDR".into(), format!("http://{}", ports["audit"].0)));
    }
    env.get_mut("data")
        .expect("listed")
        .push(("MESH_SESSION_ADDR".into(), format!("http://{}", ports["session"].0)));
    let services = Services {
        bin_dir: args.bin_dir.clone(),
        logs: args.logs.clone(),
        env,
        running: Mutex::new(HashMap::new()),
    };
    for name in SERVICES {
        let (addr, metrics) = ports[name];
        services.start(name, addr, metrics).await?;
    }
    let clients = Clients::connect(&services).await;

    let rec = Arc::new(Record::new());
    // One session per data caller, used for every call it makes.
    let mut auths = Vec::with_capacity(args.workers);
    for w in 0..args.workers {
        let mut c = clients.clone();
        let token =
            call(c.session.create_session(CreateSessionRequest {
                user_id: format!("fault-d{w}"),
                ..Default::default()
            }))
            .await
            .context("creating the data callers' sessions")?
            .token;
        auths.push(format!("Bearer {token}").parse::<AsciiMetadataValue>()?);
        rec.ledger().live.push(token);
    }

    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    let addrs = SERVICES.iter().map(|s| (*s, ports[s].0)).collect();
    tasks.push(tokio::spawn(readiness_sampler(rec.clone(), addrs, stop.clone())));
    for (w, auth) in auths.iter().enumerate() {
        let s = || stop.clone();
        tasks.push(tokio::spawn(session_worker(rec.clone(), clients.clone(), w, s())));
        tasks.push(tokio::spawn(ratelimit_worker(rec.clone(), clients.clone(), w, s())));
        tasks.push(tokio::spawn(audit_worker(rec.clone(), clients.clone(), w, s())));
        tasks.push(tokio::spawn(data_worker(rec.clone(), clients.clone(), w, auth.clone(), s())));
    }

    let mut faults = vec![
        Fault::None,
        Fault::KillRedisMaster,
        Fault::Reshard,
        Fault::RestartPgReplica,
        Fault::RestartPgPrimary,
    ];
    for k in &args.kill {
        let name = SERVICES
            .iter()
            .find(|s| **s == k.as_str())
            .with_context(|| format!("--kill {k}: no such service"))?;
        faults.push(Fault::KillService(name));
    }
    let run_started = Instant::now();
    let mut reports = Vec::new();
    for (i, fault) in faults.iter().enumerate() {
        if i > 0 {
            rec.next_phase();
        }
        match run_phase(fault, &rec, &cluster, &services, &args).await {
            Ok(r) => reports.push(r),
            Err(e) => {
                eprintln!("  fault failed: {e:#}");
                reports.push(PhaseReport {
                    name: fault.name(),
                    action: format!("**the fault itself failed**: {e:#}"),
                    fault_secs: 0.0,
                    recovered: false,
                    ready_secs: None,
                    cpu: cpu::Usage::default(),
                });
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await?;
    }
    let load_secs = run_started.elapsed().as_secs_f64();
    rec.next_phase(); // the checks' own calls

    // Appends left unacknowledged are retried with their idempotency keys.
    let pending = std::mem::take(&mut rec.ledger().pending_appends);
    let mut unresolved = 0;
    for req in pending {
        let r = settled(|| {
            let mut a = clients.audit.clone();
            let req = req.clone();
            async move { call(a.append(req)).await }
        })
        .await;
        match r {
            Ok(resp) => {
                rec.ledger().appends.insert(resp.id, (resp.sequence, resp.hash));
            }
            Err(_) => unresolved += 1,
        }
    }

    eprintln!("checking what was acknowledged");
    let (live, revoked, appends, docs, puts, allowed) = {
        let l = rec.ledger();
        (
            l.live.clone(),
            l.revoked.clone(),
            l.appends.clone(),
            l.docs.clone(),
            l.puts.clone(),
            l.allowed.clone(),
        )
    };
    let mut checks = check_sessions(&clients, &live, &revoked).await;
    checks.push(check_docs(&rec, &clients, &auths, &docs).await);
    checks.push(check_data_audit(&clients, &cluster, &puts).await?);
    checks.extend(check_audit(&clients, &appends, unresolved).await?);
    checks.extend(check_limits(&allowed, args.limit));

    let (text, pass) = report(&rec, &reports, &checks, &args, load_secs);
    println!("{text}");
    Ok(pass)
}

/// The run as Markdown, and whether it passed.
fn report(
    rec: &Record,
    phases: &[PhaseReport],
    checks: &[Check],
    args: &Args,
    load_secs: f64,
) -> (String, bool) {
    let stats = rec.phases.lock().expect("lock");
    let wrong = rec.wrong.lock().expect("lock");
    let mut s = String::new();
    let _ = writeln!(
        s,
        "Load: {} callers each of session, ratelimit, audit and data for {load_secs:.0} s; rate limit {} per second per descriptor (fixed window, fail_closed).\n",
        args.workers, args.limit
    );
    let _ = writeln!(s, "### Phases\n");
    let _ = writeln!(
        s,
        "| phase | calls OK | errors (operation code × n) | errors from → to (s into phase) | readiness not SERVING (sampled) | all ready after the fault (s into phase) | recovered | machine busy |"
    );
    let _ = writeln!(s, "| --- | ---: | --- | --- | --- | ---: | --- | ---: |");
    for (i, p) in phases.iter().enumerate() {
        let Some(st) = stats.get(i) else { continue };
        let ok: u64 = st.ok.values().sum();
        let errors = if st.errors.is_empty() {
            "none".to_owned()
        } else {
            st.errors
                .iter()
                .map(|((op, code), n)| format!("{op} {code} × {n}"))
                .collect::<Vec<_>>()
                .join("<br>")
        };
        let span = match (st.first_error_ms, st.last_error_ms) {
            (Some(a), Some(b)) => format!("{:.2} → {:.2}", a as f64 / 1000.0, b as f64 / 1000.0),
            _ => "–".into(),
        };
        let not_ready = if st.not_ready_ms.is_empty() {
            "none".to_owned()
        } else {
            st.not_ready_ms
                .iter()
                .map(|(svc, ms)| format!("{svc} {:.1} s", *ms as f64 / 1000.0))
                .collect::<Vec<_>>()
                .join("<br>")
        };
        let _ = writeln!(
            s,
            "| {} | {ok} | {errors} | {span} | {not_ready} | {} | {} | {:.0} % |",
            p.name,
            match (i, p.ready_secs) {
                (0, _) => "–".into(),
                (_, Some(r)) => format!("{r:.1}"),
                (_, None) => "never".into(),
            },
            if p.recovered { "yes" } else { "**no**" },
            p.cpu.machine_busy * 100.0
        );
    }
    let _ = writeln!(s, "\nWhat each fault did:\n");
    for (i, p) in phases.iter().enumerate() {
        let _ = writeln!(s, "- **{}** ({:.1} s): {}", p.name, p.fault_secs, p.action);
        if let Some(st) = stats.get(i) {
            for ((op, code), (msg, first, last)) in &st.samples {
                let _ = writeln!(
                    s,
                    "  - {op} {code} from {:.2} to {:.2} s: `{}`",
                    *first as f64 / 1000.0,
                    *last as f64 / 1000.0,
                    msg.replace('`', "'")
                );
            }
        }
    }
    if let Some(st) = stats.get(phases.len())
        && !st.errors.is_empty()
    {
        let _ = writeln!(s, "\nErrors of the checks' own calls (answered after retries for up to 30 s):\n");
        for ((op, code), n) in &st.errors {
            let _ = writeln!(s, "- {op} {code} × {n}: `{}`", st.samples[&(*op, *code)].0);
        }
    }
    let _ = writeln!(s, "\n### Checks of what was acknowledged\n");
    let _ = writeln!(s, "| check | checked | missing or wrong | detail |\n| --- | ---: | ---: | --- |");
    for c in checks {
        let _ = writeln!(s, "| {} | {} | {} | {} |", c.what, c.checked, c.missing, c.detail);
    }
    let _ = writeln!(s, "\n### Wrong answers during the load and the checks\n");
    if wrong.is_empty() {
        let _ = writeln!(s, "None.");
    } else {
        let _ = writeln!(s, "| wrong answer | count | examples |\n| --- | ---: | --- |");
        for (kind, (n, samples)) in wrong.iter() {
            let _ = writeln!(s, "| {kind} | {n} | {} |", samples.join("; "));
        }
    }
    let lost: u64 = checks.iter().map(|c| c.missing).sum();
    let wrong_n: u64 = wrong.values().map(|(n, _)| n).sum();
    let pass = lost == 0 && wrong_n == 0;
    let _ = writeln!(
        s,
        "\n**{}**: {lost} acknowledged items missing or failed checks, {wrong_n} wrong answers.",
        if pass { "PASS" } else { "FAIL" }
    );
    (s, pass)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_nodes_lines_count_slot_ranges_and_skip_migrations() {
        let line = "07c3 127.0.0.1:30004@40004 myself,master - 0 0 4 connected 0-99 200 300-301 [302->-e7d1]";
        let n = Node::parse(line).expect("a node");
        assert_eq!((n.port, n.master, n.failing, n.slots), (30004, true, false, 103));
        let failed =
            Node::parse("e7d1 127.0.0.1:30005@40005 master,fail - 1 0 5 disconnected").expect("a node");
        assert_eq!((failed.port, failed.master, failed.failing, failed.slots), (30005, true, true, 0));
        assert!(Node::parse("garbage").is_none());
    }

    #[test]
    fn more_oks_in_a_window_than_the_limit_is_found_and_edge_spanning_oks_are_left_out() {
        // Three OKs within second 1000 (limit 2), one spanning 1000 → 1001, one in 1001.
        let allowed = HashMap::from([(
            "fa",
            vec![
                (1_000_000, 1_000_010),
                (1_000_100, 1_000_200),
                (1_000_900, 1_000_950),
                (1_000_990, 1_001_005),
                (1_001_500, 1_001_600),
            ],
        )]);
        let checks = check_limits(&allowed, 2);
        assert_eq!((checks[0].checked, checks[0].missing), (2, 1), "{:?}", checks[0]);
        assert!(checks[0].detail.contains("1 OKs spanning"), "{}", checks[0].detail);
        assert_eq!((checks[1].checked, checks[1].missing), (0, 0));
        assert_eq!(check_limits(&allowed, 3)[0].missing, 0);
    }
}

//! Data-service benchmark: Get and Put over the full mesh path at N
//! concurrent callers, as ratios to `pgbench` on the same PostgreSQL servers
//! in the same run, with the CPU time per call of every process; then Query
//! and Get latency on a collection of `--docs` documents.
//!
//! Every mesh service runs as its own release binary (`target/release/
//! mesh-{session,ratelimit,audit,data}`, built first), each with a schema or
//! Redis key prefix of its own, so `/proc` tells their CPU apart: a Get is
//! authenticated by the session service (ValidateSession, `touch`), counted
//! by the rate-limit service (two descriptors in Redis) and read from the
//! replica (or, with a consistency token the replica has not replayed, the
//! primary); a Put is the same plus one `data_write` statement on the primary
//! (document row, GIN entries, audit outbox row), delivered to the audit
//! service (a hash-chained row) and deleted from the outbox. The baselines:
//!
//! - a plain tonic echo of a Put-sized message in this process (gRPC alone);
//! - `pgbench -S` (select-only) on the replica, on `pgbench -i` tables with
//!   as many accounts as the collection has documents;
//! - `pgbench` single-row INSERTs on the primary into a table shaped like
//!   `documents` (same columns and indexes: a jsonb and a bytea per row);
//! - the service's own SQL in pgbench, to tell the database's share from the
//!   mesh's: the Get's SELECT on the seeded collection (replica), and the
//!   Put's `data_write` call plus its WAL-position query (primary, into
//!   copies of `documents` and `audit_outbox`).
//!
//! The collection (`big`) is seeded by COPY straight into the data service's
//! schema, `body` being the protobuf encoding of the same Struct as
//! `document` (what the service writes), and its GIN index built afterwards.
//! Everything is dropped at the end (`--keep` keeps the schemas).
//!
//! ```sh
//! cargo build --release --bins      # the four services and this program
//! target/release/data --concurrency 64 --seconds 10 --docs 1000000
//! ```

use std::{
    ffi::OsStr,
    fmt::Write as _,
    path::{Path, PathBuf},
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use chrono::{SecondsFormat, Utc};
use clap::Parser;
use mesh_bench::{
    ChildService, Load, Report, TABLE_HEADER, channels, cpu, pg, run, run_echo, spawn_plain_echo,
};
use mesh_proto::{
    data::{GetRequest, PutRequest, QueryRequest, data_service_client::DataServiceClient},
    session::{
        CreateSessionRequest, RevokeUserSessionsRequest, session_service_client::SessionServiceClient,
    },
};
use mesh_testkit::{Infra, grpc::metric_value, scrape_metrics};
use prost::Message as _;
use serde_json::json;
use sqlx::{Connection as _, PgConnection};
use tonic::{
    Request,
    metadata::{AsciiMetadataValue, MetadataMap},
    transport::Channel,
};

#[derive(Debug, Parser)]
#[command(about = "Data service Get/Put vs pgbench, and Query/Get latency on a large collection")]
struct Args {
    /// Concurrent callers (and pgbench clients).
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Measured seconds per load run (the latency runs on the collection get half).
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Unmeasured warm-up seconds before each load run.
    #[arg(long, default_value_t = 2)]
    warmup: u64,
    /// Documents in the seeded collection.
    #[arg(long, default_value_t = 1_000_000)]
    docs: u64,
    /// Concurrent callers of the Query and Get latency runs on the collection.
    #[arg(long, default_value_t = 8)]
    query_concurrency: usize,
    /// HTTP/2 connections the callers share.
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// `MESH_DATABASE_MIN_CONNECTIONS` and `MAX_CONNECTIONS` of the data
    /// service (per pool: the primary's and the replica's).
    #[arg(long, default_value_t = 64)]
    db_connections: usize,
    /// `MESH_RATELIMIT_REDIS_TIMEOUT_MS` of the rate-limit service (its
    /// default is 10 ms): long enough on a loaded 2-core machine for Checks to
    /// be decided in Redis, not by the fallback (those that are anyway are
    /// counted and printed per run).
    #[arg(long, default_value_t = 100)]
    ratelimit_redis_timeout_ms: u64,
    /// Where the service binaries are.
    #[arg(long, default_value = "target/release")]
    bin_dir: PathBuf,
    /// Keep the schemas afterwards.
    #[arg(long)]
    keep: bool,
}

/// The seeded collection.
const BIG: &str = "big";
/// The collection Puts create documents in.
const PUTS: &str = "puts";
/// Query page size (the service's default).
const PAGE: u32 = 50;

/// Limits nobody reaches, on both descriptors the data service sends.
const RULES: &str = r#"
domain: data
descriptors:
  - key: user_id
    rate_limit: { unit: second, requests_per_unit: 1000000000, name: data_per_user }
    descriptors:
      - key: collection
        rate_limit: { unit: second, requests_per_unit: 1000000000, name: data_per_user_collection }
"#;

#[derive(Debug)]
struct Schemas {
    data: String,
    audit: String,
    pgbench: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let infra = Infra::shared();
    let stamp = Utc::now().timestamp();
    let schemas = Schemas {
        data: format!("bench_data_{stamp}"),
        audit: format!("bench_data_{stamp}_audit"),
        pgbench: format!("bench_data_{stamp}_pgbench"),
    };
    let mut owner = PgConnection::connect(&infra.pg_primary_url()).await?;
    for s in [&schemas.data, &schemas.audit, &schemas.pgbench] {
        sqlx::query(&format!("create schema {s}")).execute(&mut owner).await?;
    }
    let result = bench(&args, infra, &schemas, &mut owner).await;
    if args.keep {
        eprintln!("kept schemas {}, {} and {}", schemas.data, schemas.audit, schemas.pgbench);
    } else {
        for s in [&schemas.data, &schemas.audit, &schemas.pgbench] {
            sqlx::query(&format!("drop schema {s} cascade")).execute(&mut owner).await?;
        }
    }
    result
}

/// The four services, each its own process.
struct Mesh {
    ratelimit: ChildService,
    session: ChildService,
    audit: ChildService,
    data: ChildService,
    _rules: tempfile::TempDir,
}

impl Mesh {
    async fn start(args: &Args, infra: &Infra, schemas: &Schemas) -> anyhow::Result<Self> {
        let bin = |name: &str| -> anyhow::Result<Command> {
            let path = args.bin_dir.join(name);
            if !path.exists() {
                bail!("{} is missing: cargo build --release --bins", path.display());
            }
            let mut cmd = Command::new(path);
            cmd.env_clear().env("RUST_LOG", "warn");
            Ok(cmd)
        };
        let redis = infra.redis_urls().join(",");
        let prefix = format!("benchdata{}", std::process::id());

        let rules = tempfile::tempdir()?;
        std::fs::write(rules.path().join("data.yaml"), RULES)?;
        let mut cmd = bin("mesh-ratelimit")?;
        cmd.env("MESH_REDIS_URLS", &redis)
            .env("MESH_REDIS_KEY_PREFIX", format!("{prefix}:rl:"))
            .env("MESH_RATELIMIT_RULES", rules.path())
            .env("MESH_RATELIMIT_REDIS_TIMEOUT_MS", args.ratelimit_redis_timeout_ms.to_string());
        let ratelimit = ChildService::start(cmd).await.context("starting mesh-ratelimit")?;

        let mut cmd = bin("mesh-session")?;
        cmd.env("MESH_REDIS_URLS", &redis)
            .env("MESH_REDIS_KEY_PREFIX", format!("{prefix}:s:"))
            .env("MESH_SESSION_AUDIT_HASH_KEY", "benchmark-only-audit-hash-key")
            // Its own audit events (the sessions created here) are not on the
            // measured path: nobody drains them, they expire a minute later.
            .env("MESH_SESSION_OUTBOX_TTL_MS", "60000");
        let session = ChildService::start(cmd).await.context("starting mesh-session")?;

        let db = |cmd: &mut Command, schema: &str, min: usize, max: usize| {
            cmd.env("MESH_DATABASE_WRITE_URL", infra.pg_primary_url())
                .env("MESH_DATABASE_READ_URLS", infra.pg_replica_url())
                .env("MESH_DATABASE_SCHEMA", schema)
                .env("MESH_DATABASE_MIN_CONNECTIONS", min.to_string())
                .env("MESH_DATABASE_MAX_CONNECTIONS", max.to_string());
        };
        let mut cmd = bin("mesh-audit")?;
        db(&mut cmd, &schemas.audit, 4, 16);
        let audit = ChildService::start(cmd).await.context("starting mesh-audit")?;

        let mut cmd = bin("mesh-data")?;
        db(&mut cmd, &schemas.data, args.db_connections, args.db_connections);
        cmd.env("MESH_SESSION_ADDR", session.addr.to_string())
            .env("MESH_RATELIMIT_ADDR", ratelimit.addr.to_string())
            .env("MESH_AUDIT_ADDR", audit.addr.to_string());
        let data = ChildService::start(cmd).await.context("starting mesh-data")?;
        Ok(Self { ratelimit, session, audit, data, _rules: rules })
    }

    fn pids(&self) -> Pids {
        Pids {
            data: self.data.child.id(),
            session: self.session.child.id(),
            ratelimit: self.ratelimit.child.id(),
            audit: self.audit.child.id(),
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Pids {
    data: u32,
    session: u32,
    ratelimit: u32,
    audit: u32,
}

/// Calls to the data service carry `authorization: Bearer <token>` of caller `worker`'s session.
#[derive(Clone)]
struct Callers {
    chans: Arc<Vec<Channel>>,
    auth: Arc<Vec<AsciiMetadataValue>>,
}

impl Callers {
    fn client(&self, worker: usize) -> DataServiceClient<Channel> {
        DataServiceClient::new(self.chans[worker % self.chans.len()].clone())
    }

    fn request<T>(&self, worker: usize, body: T) -> Request<T> {
        let mut req = Request::new(body);
        req.metadata_mut().insert("authorization", self.auth[worker % self.auth.len()].clone());
        req
    }
}

fn user(i: usize) -> String {
    format!("bench-user-{i}")
}

/// One session per caller (user `bench-user-<i>`).
async fn sessions(mesh: &Mesh, n: usize) -> anyhow::Result<Vec<AsciiMetadataValue>> {
    let mut c = SessionServiceClient::new(mesh_testkit::channel(mesh.session.addr).await);
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let token = c
            .create_session(CreateSessionRequest { user_id: user(i), ..Default::default() })
            .await
            .context("creating a session")?
            .into_inner()
            .token;
        out.push(format!("Bearer {token}").parse()?);
    }
    Ok(out)
}

async fn revoke_sessions(mesh: &Mesh, n: usize) {
    let mut c = SessionServiceClient::new(mesh_testkit::channel(mesh.session.addr).await);
    for i in 0..n {
        let _ = c
            .revoke_user_sessions(RevokeUserSessionsRequest { user_id: user(i), ..Default::default() })
            .await;
    }
}

fn doc_key(i: u64) -> String {
    format!("doc-{i:07}")
}

fn status(i: u64) -> &'static str {
    match i % 100 {
        0 => "deleted",
        1..=10 => "archived",
        11..=30 => "draft",
        _ => "active",
    }
}

/// Document `i` of the seeded collection: `group` is shared by 10
/// documents, `owner` by 0.1 %, `status` `deleted` by 1 % and `active` by 69 %.
fn seed_json(i: u64) -> serde_json::Value {
    json!({
        "n": i as f64,
        "group": format!("g{:06}", i / 10),
        "owner": format!("user-{}", i % 1000),
        "status": status(i),
        "title": format!("document {i}"),
        "tags": ["bench", format!("t{}", i % 7)],
    })
}

/// The document Put `n` writes (pgbench's INSERT writes the same shape).
fn put_json(n: u64) -> serde_json::Value {
    json!({
        "n": n as f64,
        "owner": format!("user-{}", n % 1000),
        "status": "active",
        "title": format!("put {n}"),
        "tags": ["bench", "put"],
    })
}

fn hex(b: &[u8]) -> String {
    b.iter().fold(String::with_capacity(b.len() * 2), |mut s, x| {
        let _ = write!(s, "{x:02x}");
        s
    })
}

/// A value in COPY's text format.
fn copy_text(s: &str) -> String {
    s.replace('\\', "\\\\").replace('\t', "\\t").replace('\n', "\\n").replace('\r', "\\r")
}

/// Writes `docs` documents into `schema.documents` by COPY (the GIN index
/// dropped first and built afterwards, as a bulk load does), then vacuums
/// and analyses the table.
async fn seed(owner: &mut PgConnection, schema: &str, docs: u64) -> anyhow::Result<()> {
    sqlx::query(&format!("drop index {schema}.documents_containment")).execute(&mut *owner).await?;
    let now = Utc::now().to_rfc3339_opts(SecondsFormat::Micros, true);
    let copy = format!(
        "copy {schema}.documents (collection, key, version, document, body, created_at, updated_at) from stdin"
    );
    let mut sink = owner.copy_in_raw(&copy).await?;
    let mut buf = String::with_capacity(8 << 20);
    for i in 0..docs {
        let json = seed_json(i);
        let text = copy_text(&json.to_string());
        let body = mesh_testkit::json::object(json).encode_to_vec();
        writeln!(buf, "{BIG}\t{}\t1\t{text}\t\\\\x{}\t{now}\t{now}", doc_key(i), hex(&body))?;
        if buf.len() > (8 << 20) - 4096 {
            sink.send(buf.as_bytes()).await?;
            buf.clear();
        }
    }
    if !buf.is_empty() {
        sink.send(buf.as_bytes()).await?;
    }
    sink.finish().await?;
    sqlx::query("set maintenance_work_mem = '512MB'").execute(&mut *owner).await?;
    // The index of migrations/0002_documents_outbox.sql, as it is there.
    sqlx::query(&format!(
        "create index documents_containment on {schema}.documents using gin (document jsonb_path_ops)"
    ))
    .execute(&mut *owner)
    .await?;
    sqlx::query("reset maintenance_work_mem").execute(&mut *owner).await?;
    sqlx::query(&format!("vacuum (analyze) {schema}.documents")).execute(&mut *owner).await?;
    Ok(())
}

fn status_text(s: tonic::Status) -> String {
    format!("{:?}: {}", s.code(), s.message())
}

/// Where reads were served (`x-mesh-served-by`).
#[derive(Debug, Default)]
struct Served {
    replica: AtomicU64,
    primary: AtomicU64,
}

impl Served {
    fn count(&self, md: &MetadataMap) {
        match md.get("x-mesh-served-by").and_then(|v| v.to_str().ok()) {
            Some("replica") => self.replica.fetch_add(1, Ordering::Relaxed),
            _ => self.primary.fetch_add(1, Ordering::Relaxed),
        };
    }

    fn summary(&self) -> String {
        format!(
            "served by the replica {}, by the primary {} (warm-up included)",
            self.replica.load(Ordering::Relaxed),
            self.primary.load(Ordering::Relaxed)
        )
    }
}

/// A well-spread key index for call `n` (a multiplicative hash, no RNG on the hot path).
fn spread(n: u64, of: u64) -> u64 {
    (n.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 11) % of.max(1)
}

/// Gets of random documents of the seeded collection, with `token` if given.
async fn get_load(
    name: &str,
    load: Load,
    callers: &Callers,
    docs: u64,
    token: Option<String>,
) -> (Report, String) {
    let (callers, counter, served) =
        (callers.clone(), Arc::new(AtomicU64::new(0)), Arc::new(Served::default()));
    let report = run(name, load, {
        let served = served.clone();
        move |w| {
            let mut c = callers.client(w);
            let n = counter.fetch_add(1, Ordering::Relaxed);
            let req = callers.request(
                w,
                GetRequest {
                    collection: BIG.into(),
                    key: doc_key(spread(n, docs)),
                    consistency_token: token.clone().unwrap_or_default(),
                },
            );
            let served = served.clone();
            async move {
                let resp = c.get(req).await.map_err(status_text)?;
                served.count(resp.metadata());
                Ok::<_, String>(())
            }
        }
    })
    .await;
    eprintln!("{report}");
    (report, served.summary())
}

/// Puts of new documents (every call creates one).
async fn put_load(name: &str, load: Load, callers: &Callers) -> Report {
    let (callers, counter) = (callers.clone(), Arc::new(AtomicU64::new(0)));
    let report = run(name, load, move |w| {
        let mut c = callers.client(w);
        let n = counter.fetch_add(1, Ordering::Relaxed);
        let req = callers.request(
            w,
            PutRequest {
                collection: PUTS.into(),
                key: format!("put-{n}"),
                document: Some(mesh_testkit::json::object(put_json(n))),
                expected_version: None,
            },
        );
        async move { c.put(req).await.map(|_| ()).map_err(status_text) }
    })
    .await;
    eprintln!("{report}");
    report
}

type Filter = Arc<dyn Fn(u64) -> Option<serde_json::Value> + Send + Sync>;

/// Query pages of the seeded collection; a page that comes back empty is an error.
async fn query_load(name: &str, load: Load, callers: &Callers, filter: Filter) -> (Report, String) {
    let (callers, counter, served) =
        (callers.clone(), Arc::new(AtomicU64::new(0)), Arc::new(Served::default()));
    let report = run(name, load, {
        let served = served.clone();
        move |w| {
            let mut c = callers.client(w);
            let n = counter.fetch_add(1, Ordering::Relaxed);
            let req = callers.request(
                w,
                QueryRequest {
                    collection: BIG.into(),
                    filter: filter(n).map(mesh_testkit::json::object),
                    page_size: PAGE,
                    ..Default::default()
                },
            );
            let served = served.clone();
            async move {
                let resp = c.query(req).await.map_err(status_text)?;
                served.count(resp.metadata());
                if resp.get_ref().documents.is_empty() {
                    return Err("an empty page".to_owned());
                }
                Ok(())
            }
        }
    })
    .await;
    eprintln!("{report}");
    (report, served.summary())
}

/// The sum of every sample of metric `name`.
fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#') && l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Counters of the services that say whether a call took the whole path.
#[derive(Debug, Clone, Copy, Default)]
struct Counters {
    fallback: f64,
    undecided: f64,
    session_unavailable: f64,
    puts: f64,
    delivered: f64,
}

impl Counters {
    async fn scrape(mesh: &Mesh) -> Self {
        let rl = scrape_metrics(mesh.ratelimit.metrics).await.unwrap_or_default();
        let data = scrape_metrics(mesh.data.metrics).await.unwrap_or_default();
        Self {
            fallback: metric_sum(&rl, "mesh_ratelimit_fallback_decisions_total"),
            undecided: metric_sum(&data, "mesh_data_ratelimit_undecided_total"),
            session_unavailable: metric_sum(&data, "mesh_data_session_unavailable_total"),
            puts: metric_value(&data, "mesh_data_writes_total", &["op=\"put\""]).unwrap_or(0.0),
            delivered: metric_value(&data, "mesh_data_audit_events_total", &["result=\"delivered\""])
                .unwrap_or(0.0),
        }
    }

    /// Rate-limit decisions that did not come from Redis, and calls refused for want of a session.
    fn shortcuts_since(&self, before: &Self) -> String {
        format!(
            "rate-limit Checks decided by the fallback, not Redis: {:.0}; undecided (failed open) in the data \
             service: {:.0}; session unavailable: {:.0}",
            self.fallback - before.fallback,
            self.undecided - before.undecided,
            self.session_unavailable - before.session_unavailable,
        )
    }
}

/// Events waiting in the data service's audit outbox.
async fn outbox_depth(owner: &mut PgConnection, schema: &str) -> anyhow::Result<i64> {
    Ok(sqlx::query_scalar(&format!("select count(*) from {schema}.audit_outbox where dead_at is null"))
        .fetch_one(&mut *owner)
        .await?)
}

/// `a` followed by `b`: the CPU of both windows, per process.
fn then(a: &cpu::Usage, b: &cpu::Usage) -> cpu::Usage {
    let mut procs = a.procs.clone();
    for p in &b.procs {
        match procs.iter_mut().find(|q| q.pid == p.pid) {
            Some(q) => q.seconds += p.seconds,
            None => procs.push(p.clone()),
        }
    }
    let (ta, tb) = (a.elapsed.as_secs_f64(), b.elapsed.as_secs_f64());
    cpu::Usage {
        procs,
        machine_busy: (a.machine_busy * ta + b.machine_busy * tb) / (ta + tb).max(1e-9),
        elapsed: a.elapsed + b.elapsed,
    }
}

const CPU_HEADER: &str = "| target | machine busy | load generator | data | session | ratelimit | audit | Redis | \
     PG queries | PG WAL, replication | PG upkeep | pgbench | other | total |\n\
     | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |";

/// What a PostgreSQL process does, from its title: serving a connection's
/// queries; writing WAL or shipping and replaying it (walwriter, walsender,
/// walreceiver, startup); or upkeep, work deferred from earlier writes that
/// lands in whatever window it runs in (checkpointer, background writer,
/// autovacuum, and any process whose title could not be read).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PgRole {
    Queries,
    Wal,
    Upkeep,
}

fn pg_role(title: &str) -> PgRole {
    if ["walwriter", "walsender", "walreceiver", "startup"].iter().any(|w| title.contains(w)) {
        PgRole::Wal
    } else if title.starts_with("postgres: ") && title.contains('(') {
        PgRole::Queries
    } else {
        PgRole::Upkeep
    }
}

/// Where the CPU went per successful call: this process (the callers; for
/// echo also the echo server), each service's process, every Redis node,
/// PostgreSQL (primary and replica) by role, pgbench, everything else.
fn cpu_row(r: &Report, p: Pids) -> String {
    let pid = |id: u32| r.cpu.seconds(|x| x.pid == id);
    let pg = |role: PgRole| r.cpu.seconds(|x| x.comm == "postgres" && pg_role(&x.title) == role);
    r.cpu_row(&[
        ("load generator", r.cpu.this_process()),
        ("data", pid(p.data)),
        ("session", pid(p.session)),
        ("ratelimit", pid(p.ratelimit)),
        ("audit", pid(p.audit)),
        ("Redis", r.cpu.named("redis-server")),
        ("PostgreSQL queries", pg(PgRole::Queries)),
        ("PostgreSQL WAL", pg(PgRole::Wal)),
        ("PostgreSQL upkeep", pg(PgRole::Upkeep)),
        ("pgbench", r.cpu.named("pgbench")),
    ])
}

/// The ratios the CPU accounting allows: on a saturated machine calls/s is
/// cores / CPU per call, so a ratio cannot pass the baseline's CPU per call
/// over the mesh call's.
fn ceiling(label: &str, mesh: &Report, base: &Report, p: Pids) -> String {
    let per = |r: &Report, s: f64| r.us_per_call(s);
    let base_total = per(base, base.cpu.total());
    let base_client = per(base, base.cpu.named("pgbench"));
    let mesh_total = per(mesh, mesh.cpu.total());
    let loadgen = per(mesh, mesh.cpu.this_process());
    let data = per(mesh, mesh.cpu.seconds(|x| x.pid == p.data));
    format!(
        "- {label}: pgbench {base_total:.0} µs of CPU per transaction ({base_client:.0} of it pgbench itself); \
         the mesh call {mesh_total:.0} µs ({loadgen:.0} the load generator, {data:.0} the data service). \
         Ratio ≤ **{:.2}×** with both saturating this machine; ≤ {:.2}× with the callers (load generator, \
         pgbench) on another machine; ≤ {:.2}× if, besides, the data service's own process cost nothing. \
         Measured {:.2}× (machine {:.0} % busy vs {:.0} %).",
        base_total / mesh_total,
        (base_total - base_client) / (mesh_total - loadgen),
        (base_total - base_client) / (mesh_total - loadgen - data),
        mesh.throughput() / base.throughput(),
        mesh.cpu.machine_busy * 100.0,
        base.cpu.machine_busy * 100.0,
    )
}

fn verdict(ratio: f64, goal: f64) -> &'static str {
    if ratio >= goal { "met" } else { "**not met**" }
}

/// The pgbench scripts, written into `dir`: the INSERT baseline (one row
/// shaped like a Put's document into a copy of `documents`), the data
/// service's own Get SELECT (on the seeded collection), and its own Put
/// statements (`data_write` of one new document, then the WAL position for
/// the consistency token, each its own transaction as the service runs them;
/// `data_write` writes into the copies of `documents` and `audit_outbox` its
/// caller's `search_path` names).
struct Scripts {
    insert: PathBuf,
    get: PathBuf,
    write: PathBuf,
}

impl Scripts {
    fn write(dir: &Path, data_schema: &str, docs: u64) -> anyhow::Result<Self> {
        let body = hex(&mesh_testkit::json::object(put_json(123_456_789)).encode_to_vec());
        let document = "jsonb_build_object('n', cast(:n as float8), 'owner', 'user-' || cast(:u as text), \
             'status', 'active', 'title', 'put ' || cast(:n as text), 'tags', jsonb_build_array('bench', 'put'))";
        let vars = "\\set n random(1, 1000000000)\n\\set u random(0, 999)\n";
        let scripts =
            Self { insert: dir.join("insert.sql"), get: dir.join("get.sql"), write: dir.join("write.sql") };
        std::fs::write(
            &scripts.insert,
            format!(
                "{vars}insert into documents (collection, key, version, document, body, created_at, updated_at) \
                 values ('{PUTS}', 'pg-' || nextval('pgbench_key_seq'), 1, {document}, '\\x{body}'::bytea, \
                 now(), now());\n"
            ),
        )?;
        std::fs::write(
            &scripts.get,
            format!(
                "\\set k random(0, {})\nselect body, version, updated_at from documents \
                 where collection = '{BIG}' and key = 'doc-' || lpad(cast(:k as text), 7, '0');\n",
                docs.max(1) - 1
            ),
        )?;
        std::fs::write(
            &scripts.write,
            format!(
                "{vars}select failed_op, actual_version, versions, outbox_ids, written_at from \
                 {data_schema}.data_write(array[false], array['{PUTS}'], array['pgw-' || nextval('pgbench_key_seq')], \
                 array[{document}], array['\\x{body}'::bytea], array[null::bigint], array[gen_random_uuid()], \
                 'bench-user-0', 'ses_pgbench', 'req-pgbench', '', '', '127.0.0.1', 'pgbench', interval '10 s');\n\
                 select pg_current_wal_insert_lsn();\n"
            ),
        )?;
        Ok(scripts)
    }
}

/// A plan's nodes, outermost first: `Limit → Sort → Bitmap Heap Scan → Bitmap Index Scan (documents_containment)`.
fn plan_shape(node: &serde_json::Value, out: &mut Vec<String>) {
    let mut name = node["Node Type"].as_str().unwrap_or("?").to_owned();
    if let Some(index) = node["Index Name"].as_str() {
        name.push_str(&format!(" ({index})"));
    }
    out.push(name);
    if let Some(children) = node["Plans"].as_array() {
        for c in children {
            plan_shape(c, out);
        }
    }
}

/// EXPLAIN ANALYZE of the service's filtered first-page query on the replica.
async fn explain(replica: &mut PgConnection, filter: &serde_json::Value) -> anyhow::Result<String> {
    let sql = "explain (analyze, format json) select key, body, version, updated_at from documents \
               where collection = $1 and key > '' and document @> $2::jsonb order by key limit $3";
    let plan: serde_json::Value = sqlx::query_scalar(sql)
        .bind(BIG)
        .bind(filter.to_string())
        .bind(i64::from(PAGE) + 1)
        .persistent(false)
        .fetch_one(&mut *replica)
        .await?;
    let top = &plan[0];
    let mut shape = Vec::new();
    plan_shape(&top["Plan"], &mut shape);
    Ok(format!(
        "{}; {} rows; planning {:.2} ms, execution {:.2} ms",
        shape.join(" → "),
        top["Plan"]["Actual Rows"],
        top["Planning Time"].as_f64().unwrap_or(0.0),
        top["Execution Time"].as_f64().unwrap_or(0.0),
    ))
}

async fn bench(
    args: &Args,
    infra: &Infra,
    schemas: &Schemas,
    owner: &mut PgConnection,
) -> anyhow::Result<()> {
    let load = Load {
        concurrency: args.concurrency,
        duration: Duration::from_secs(args.seconds),
        warmup: Duration::from_secs(args.warmup),
    };
    let mesh = Mesh::start(args, infra, schemas).await?;
    let pids = mesh.pids();
    let callers = Callers {
        chans: Arc::new(channels(mesh.data.addr, args.connections).await),
        auth: Arc::new(sessions(&mesh, args.concurrency).await?),
    };
    let mut out = String::new();
    writeln!(
        out,
        "{} cores; load average at the start: {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim()
    )?;

    // 1. The collection, and pgbench's tables of the same size on the same servers.
    let t = Instant::now();
    seed(owner, &schemas.data, args.docs).await?;
    let seeded = t.elapsed();
    eprintln!("seeded {} documents in {seeded:.1?}", args.docs);
    let scale = args.docs.div_ceil(100_000).max(1);
    let t = Instant::now();
    pg::init(infra.pg_primary_port, &schemas.pgbench, scale).await?;
    let (d, p) = (&schemas.data, &schemas.pgbench);
    for sql in [
        format!("create table {p}.documents (like {d}.documents including all)"),
        format!("create table {p}.audit_outbox (like {d}.audit_outbox including all)"),
        format!("create sequence {p}.pgbench_key_seq"),
    ] {
        sqlx::query(&sql).execute(&mut *owner).await?;
    }
    eprintln!("pgbench -i -s {scale} in {:.1?}", t.elapsed());
    let sizes: (String, String) = sqlx::query_as(&format!(
        "select pg_size_pretty(pg_total_relation_size('{d}.documents')), \
                pg_size_pretty(pg_total_relation_size('{p}.pgbench_accounts'))"
    ))
    .fetch_one(&mut *owner)
    .await?;
    // A consistency token of a write the replica will have replayed.
    let probe = callers
        .client(0)
        .put(callers.request(
            0,
            PutRequest {
                collection: PUTS.into(),
                key: "probe".into(),
                document: Some(mesh_testkit::json::object(put_json(0))),
                expected_version: None,
            },
        ))
        .await
        .context("the first Put")?
        .into_inner();
    pg::wait_replica(owner, &infra.pg_replica_url()).await?;
    // The seeded documents read back through the service as the Struct they were made from,
    // and a filter finds its group.
    let i = args.docs / 2;
    let got = callers
        .client(0)
        .get(callers.request(0, GetRequest { collection: BIG.into(), key: doc_key(i), ..Default::default() }))
        .await
        .context("reading a seeded document")?
        .into_inner();
    if got.document != Some(mesh_testkit::json::object(seed_json(i))) {
        bail!("seeded document {i} reads back as {:?}", got.document);
    }
    let page = callers
        .client(0)
        .query(callers.request(
            0,
            QueryRequest {
                collection: BIG.into(),
                filter: Some(mesh_testkit::json::object(json!({ "group": format!("g{:06}", i / 10) }))),
                page_size: PAGE,
                ..Default::default()
            },
        ))
        .await
        .context("querying a seeded group")?
        .into_inner();
    if page.documents.len() != 10.min(args.docs as usize) {
        bail!("group of document {i} has {} documents, not 10", page.documents.len());
    }
    writeln!(
        out,
        "schemas `{d}` (data), `{}` (audit), `{p}` (pgbench); {} callers over {} HTTP/2 connections; data \
         service pools {} connections each (primary, replica)\n",
        schemas.audit, args.concurrency, args.connections, args.db_connections
    )?;
    writeln!(
        out,
        "seeded {} documents into `{BIG}` by COPY, GIN index built after, vacuum analyze: {seeded:.1?} ({}, \
         indexes included); pgbench -i -s {scale}: {} accounts ({})\n",
        args.docs,
        sizes.0,
        scale * 100_000,
        sizes.1
    )?;

    // What the machine does with no load from here (others' work, PostgreSQL's
    // upkeep after the seeding), to read the CPU tables against.
    let (before, t) = (cpu::Snapshot::take(), Instant::now());
    tokio::time::sleep(Duration::from_secs(3)).await;
    let idle = cpu::Usage::between(&before, &cpu::Snapshot::take(), t.elapsed());
    let share =
        |which: &dyn Fn(&cpu::ProcUse) -> bool| idle.seconds(which) / idle.elapsed.as_secs_f64() * 100.0;
    writeln!(
        out,
        "idle for 3 s before the load runs: machine {:.0} % busy; PostgreSQL serving queries {:.0} % of a core, \
         WAL and replication {:.0} %, upkeep {:.0} %; everything else {:.0} % ({})\n",
        idle.machine_busy * 100.0,
        share(&|p| p.comm == "postgres" && pg_role(&p.title) == PgRole::Queries),
        share(&|p| p.comm == "postgres" && pg_role(&p.title) == PgRole::Wal),
        share(&|p| p.comm == "postgres" && pg_role(&p.title) == PgRole::Upkeep),
        share(&|p| p.comm != "postgres"),
        idle.busiest(|p| p.comm != "postgres"),
    )?;

    // 2. Baselines, then the mesh.
    let echo_payload = vec![
        7;
        PutRequest {
            collection: PUTS.into(),
            key: "put-1234567".into(),
            document: Some(mesh_testkit::json::object(put_json(1_234_567))),
            expected_version: None,
        }
        .encoded_len()
    ];
    let echo_name = format!("plain tonic echo ({} bytes, in process)", echo_payload.len());
    let echo = run_echo(&echo_name, load, spawn_plain_echo().await, args.connections, echo_payload).await;
    eprintln!("{echo}");
    let select = pg::pgbench(
        &format!("pgbench -S (replica), {} clients", args.concurrency),
        infra.pg_replica_port,
        &schemas.pgbench,
        load,
        ["-S"],
    )
    .await?;
    let dir = tempfile::tempdir()?;
    let scripts = Scripts::write(dir.path(), &schemas.data, args.docs)?;
    let f = |script: &PathBuf| [OsStr::new("-f").to_owned(), script.as_os_str().to_owned()];
    let get_sql = pg::pgbench(
        &format!("pgbench: the Get's SELECT on `{BIG}` (replica), {} clients", args.concurrency),
        infra.pg_replica_port,
        &schemas.data,
        load,
        f(&scripts.get),
    )
    .await?;
    let insert = pg::pgbench(
        &format!("pgbench INSERT (primary), {} clients", args.concurrency),
        infra.pg_primary_port,
        &schemas.pgbench,
        load,
        f(&scripts.insert),
    )
    .await?;
    let write_sql = pg::pgbench(
        &format!("pgbench: the Put's data_write + WAL position (primary), {} clients", args.concurrency),
        infra.pg_primary_port,
        &schemas.pgbench,
        load,
        f(&scripts.write),
    )
    .await?;
    pg::wait_replica(owner, &infra.pg_replica_url()).await?;

    let mut notes = String::new();
    let before = Counters::scrape(&mesh).await;
    let (get, get_served) =
        get_load(&format!("Get, {} callers", args.concurrency), load, &callers, args.docs, None).await;
    let after = Counters::scrape(&mesh).await;
    writeln!(notes, "- {}: {get_served}; {}", get.name, after.shortcuts_since(&before))?;
    let (get_token, token_served) = get_load(
        &format!("Get with consistency token, {} callers", args.concurrency),
        load,
        &callers,
        args.docs,
        Some(probe.consistency_token.clone()),
    )
    .await;
    let before = Counters::scrape(&mesh).await;
    writeln!(notes, "- {}: {token_served}; {}", get_token.name, before.shortcuts_since(&after))?;

    let put = put_load(&format!("Put (new document), {} callers", args.concurrency), load, &callers).await;
    let backlog = outbox_depth(owner, &schemas.data).await?;
    let (drain_start, t) = (cpu::Snapshot::take(), Instant::now());
    while outbox_depth(owner, &schemas.data).await? > 0 && t.elapsed() < Duration::from_secs(300) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let drained = t.elapsed();
    let drain = cpu::Usage::between(&drain_start, &cpu::Snapshot::take(), drained);
    let after = Counters::scrape(&mesh).await;
    let left = outbox_depth(owner, &schemas.data).await?;
    let recorded: i64 = sqlx::query_scalar(&format!("select count(*) from {}.audit_events", schemas.audit))
        .fetch_one(&mut *owner)
        .await?;
    writeln!(notes, "- {}: {}", put.name, after.shortcuts_since(&before))?;
    writeln!(
        notes,
        "- audit outbox: {backlog} events waiting when the Put window closed, drained in {drained:.2?} \
         ({left} left); {:.0} Puts committed in all, {:.0} audit events delivered, {recorded} rows in the \
         audit log",
        after.puts, after.delivered
    )?;
    let put_drained = Report {
        name: format!("{} + outbox drain after the window", put.name),
        cpu: then(&put.cpu, &drain),
        ..put.clone()
    };

    writeln!(out, "## Throughput and latency, {} callers\n\n{TABLE_HEADER}", args.concurrency)?;
    for r in [&echo, &select, &get_sql, &insert, &write_sql, &get, &get_token, &put] {
        writeln!(out, "{r}")?;
    }
    writeln!(out, "\n{notes}")?;
    writeln!(out, "| ratio | throughput | p50 | p99 | goal |\n| --- | ---: | ---: | ---: | --- |")?;
    let ratio = |m: &Report, b: &Report| {
        (
            m.throughput() / b.throughput(),
            m.quantile_us(0.5) as f64 / b.quantile_us(0.5).max(1) as f64,
            m.quantile_us(0.99) as f64 / b.quantile_us(0.99).max(1) as f64,
        )
    };
    for (label, m, b, goal) in [
        ("Get / pgbench -S", &get, &select, Some(0.25)),
        ("Get with token / pgbench -S", &get_token, &select, None),
        ("Put / pgbench INSERT", &put, &insert, Some(0.5)),
        ("Get / its own SELECT in pgbench", &get, &get_sql, None),
        ("Put / its own data_write in pgbench", &put, &write_sql, None),
        ("Get / echo", &get, &echo, None),
        ("Put / echo", &put, &echo, None),
    ] {
        let (tp, p50, p99) = ratio(m, b);
        let goal = goal.map(|g| format!("≥ {g}×: {}", verdict(tp, g))).unwrap_or_default();
        writeln!(out, "| {label} | **{tp:.2}×** | {p50:.2}× | {p99:.2}× | {goal} |")?;
    }
    writeln!(
        out,
        "\n### CPU per call (µs of CPU time in the measured window, every process on the machine)\n"
    )?;
    writeln!(out, "{CPU_HEADER}")?;
    for r in [&echo, &select, &get_sql, &insert, &write_sql, &get, &get_token, &put, &put_drained] {
        writeln!(out, "{}", cpu_row(r, pids))?;
    }
    writeln!(out)?;
    let me = std::process::id();
    let known = [pids.data, pids.session, pids.ratelimit, pids.audit, me];
    for r in [&echo, &select, &get_sql, &insert, &write_sql, &get, &get_token, &put] {
        let other = r.cpu.busiest(|p| {
            !known.contains(&p.pid) && !["redis-server", "postgres", "pgbench"].contains(&p.comm.as_str())
        });
        writeln!(out, "- other processes during {}: {other}", r.name)?;
    }
    writeln!(out, "\n### Ceiling on this machine, CPU-bound\n")?;
    writeln!(out, "{}", ceiling("Get / pgbench -S", &get, &select, pids))?;
    writeln!(out, "{}", ceiling("Get with token / pgbench -S", &get_token, &select, pids))?;
    writeln!(
        out,
        "{}",
        ceiling("Put (with its outbox drain) / pgbench INSERT", &put_drained, &insert, pids)
    )?;
    writeln!(out, "{}", ceiling("Get / its own SELECT in pgbench", &get, &get_sql, pids))?;
    writeln!(
        out,
        "{}",
        ceiling(
            "Put (with its outbox drain) / its own data_write in pgbench",
            &put_drained,
            &write_sql,
            pids
        )
    )?;
    for r in [&echo, &select, &get_sql, &insert, &write_sql, &get, &get_token, &put] {
        if let Some(e) = &r.first_error {
            writeln!(out, "\nfirst error of {}: {e}", r.name)?;
        }
    }
    print!("{out}");
    out.clear();

    // 3. Latency on the seeded collection, fewer callers.
    let groups = args.docs.div_ceil(10);
    type Shape = (&'static str, Filter);
    let shapes: Vec<Shape> = vec![
        (
            "group (10 docs)",
            Arc::new(move |n: u64| Some(json!({ "group": format!("g{:06}", spread(n, groups)) }))),
        ),
        ("owner (0.1 %)", Arc::new(|n: u64| Some(json!({ "owner": format!("user-{}", spread(n, 1000)) })))),
        ("status deleted (1 %)", Arc::new(|_: u64| Some(json!({ "status": "deleted" })))),
        ("status active (69 %)", Arc::new(|_: u64| Some(json!({ "status": "active" })))),
        ("no filter", Arc::new(|_: u64| None::<serde_json::Value>)),
    ];
    let qload = Load {
        concurrency: args.query_concurrency,
        duration: Duration::from_secs((args.seconds / 2).max(1)),
        warmup: Duration::from_secs(1),
    };
    writeln!(
        out,
        "\n## Query (first page of {PAGE}) and Get on the {} documents of `{BIG}`, {} callers\n\n{TABLE_HEADER}",
        args.docs, args.query_concurrency
    )?;
    let mut served_notes = String::new();
    let mut latency = Vec::new();
    for (name, filter) in &shapes {
        let (r, served) = query_load(&format!("Query: {name}"), qload, &callers, filter.clone()).await;
        writeln!(served_notes, "- {}: {served}", r.name)?;
        latency.push(r);
    }
    let (r, served) = get_load("Get", qload, &callers, args.docs, None).await;
    writeln!(served_notes, "- {}: {served}", r.name)?;
    latency.push(r);
    let one = Load { concurrency: 1, ..qload };
    latency.push(query_load("Query: group (10 docs), 1 caller", one, &callers, shapes[0].1.clone()).await.0);
    latency.push(get_load("Get, 1 caller", one, &callers, args.docs, None).await.0);
    for r in &latency {
        writeln!(out, "{r}")?;
    }
    writeln!(out, "\n{served_notes}\nCPU per call (µs):\n\n{CPU_HEADER}")?;
    for r in &latency {
        writeln!(out, "{}", cpu_row(r, pids))?;
    }
    writeln!(out)?;

    let mut replica = PgConnection::connect(&infra.pg_replica_url()).await?;
    sqlx::query(&format!("set search_path = {d}")).execute(&mut replica).await?;
    writeln!(out, "EXPLAIN ANALYZE of the service's first-page query on the replica:\n")?;
    for (name, filter) in &shapes {
        if let Some(f) = filter(7) {
            writeln!(out, "- {name}, `{f}`: {}", explain(&mut replica, &f).await?)?;
        }
    }
    let text = scrape_metrics(mesh.data.metrics).await.unwrap_or_default();
    let routing: Vec<&str> = text.lines().filter(|l| l.starts_with("mesh_db_reads_total{")).collect();
    writeln!(out, "\nread routing over the whole run (`mesh_db_reads_total`): {}", routing.join("; "))?;
    print!("{out}");

    revoke_sessions(&mesh, args.concurrency).await;
    drop(mesh);
    Ok(())
}

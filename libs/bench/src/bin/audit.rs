//! Audit-log benchmark: durable appends/s and latency at N concurrent callers
//! (group commit) against `pgbench` single-row inserts into a table of the
//! same shape on the same primary, in the same run; then Query latency per
//! filter shape on a chain of `--rows` seeded events, and one Verify of it.
//!
//! ```sh
//! cargo run --release -p mesh-bench --bin audit -- --rows 1000000 --seconds 10
//! ```
//!
//! Everything happens in a schema of its own (`bench_audit_<time>`) on the
//! shared local primary/replica, dropped at the end (`--keep` keeps it).

use std::{
    ffi::OsStr,
    fmt::Write as _,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::Context as _;
use chrono::{DateTime, Datelike as _, SecondsFormat, TimeZone as _, Utc};
use clap::Parser;
use mesh_audit::{
    App, AuditConfig, Config,
    chain::{Event, GENESIS, HashVersion, Outcome},
};
use mesh_bench::{Load, Report, TABLE_HEADER, channels, pg, run};
use mesh_proto::audit::{
    Actor, AppendRequest, AuditEvent, EventFilter, QueryRequest, Resource, Source, VerifyRequest,
    audit_service_client::AuditServiceClient,
};
use mesh_runtime::ServerConfig;
use mesh_testkit::{Infra, grpc::metric_value, scrape_metrics, spawn};
use prost::Message as _;
use sqlx::{Connection as _, PgConnection};
use tonic::transport::Channel;

#[derive(Debug, Parser)]
struct Args {
    /// Events seeded before the Query benchmark.
    #[arg(long, default_value_t = 1_000_000)]
    rows: u64,
    /// Measured seconds per load run (Query shapes get half).
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Concurrent Append callers (and pgbench clients).
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// A second, higher level of concurrency for Append and pgbench (0: none).
    #[arg(long, default_value_t = 256)]
    high_concurrency: usize,
    /// Concurrent Query callers.
    #[arg(long, default_value_t = 8)]
    query_concurrency: usize,
    /// Keep the schema afterwards.
    #[arg(long)]
    keep: bool,
}

const ACTORS: u64 = 10_000;
const ACTIONS: u64 = 50;
const RESOURCES: u64 = 100_000;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let infra = Infra::shared();
    let schema = format!("bench_audit_{}", Utc::now().timestamp());
    let mut owner = PgConnection::connect(&infra.pg_primary_url()).await?;
    sqlx::query(&format!("create schema {schema}")).execute(&mut owner).await?;
    let result = bench(&args, infra, &schema, &mut owner).await;
    if !args.keep {
        sqlx::query(&format!("drop schema {schema} cascade")).execute(&mut owner).await?;
    }
    result
}

async fn bench(args: &Args, infra: &Infra, schema: &str, owner: &mut PgConnection) -> anyhow::Result<()> {
    let config = Config {
        server: ServerConfig::for_tests(),
        db: infra.db_config(schema),
        audit: AuditConfig::default(),
    };
    let app = App::build(config).await?;
    let running = spawn(app.local_addr(), app.metrics_addr(), |sd| app.serve(sd));
    sqlx::query(&format!("set search_path = {schema}")).execute(&mut *owner).await?;

    let mut out = String::new();
    writeln!(out, "schema `{schema}`, {} seeded events\n", args.rows)?;

    // 1. Seed the chain (valid hashes) in the past, so appends continue it.
    let t = Instant::now();
    seed(owner, args.rows).await?;
    let seeded = t.elapsed();
    pg::wait_replica(owner, &infra.pg_replica_url()).await?;
    eprintln!("seeded {} events in {seeded:.1?}", args.rows);
    writeln!(out, "seeding {} events by COPY (7 indexes, valid chain): {seeded:.1?}\n", args.rows)?;

    let clients: Arc<Vec<AuditServiceClient<Channel>>> =
        Arc::new(channels(running.addr, 8).await.into_iter().map(AuditServiceClient::new).collect());
    let load = Load {
        concurrency: args.concurrency,
        duration: Duration::from_secs(args.seconds),
        warmup: Duration::from_secs(2),
    };

    // 2. Durable appends through the service, then the baseline: one
    //    INSERT per transaction into a table of the same shape.
    writeln!(out, "## Durable appends\n\n{TABLE_HEADER}")?;
    let mut notes = String::new();
    let mut cpu_rows = String::new();
    let mut others = String::new();
    let mut ceilings = String::new();
    let mut reports = Vec::new();
    let mut levels = vec![args.concurrency];
    if args.high_concurrency > 0 {
        levels.push(args.high_concurrency);
    }
    // The gRPC floor: a plain tonic echo of an Append-sized message at the
    // first level, measured in this run like everything else.
    let echo = {
        let addr = mesh_bench::spawn_plain_echo().await;
        let payload = vec![
            7;
            prost::Message::encoded_len(&AppendRequest {
                event: Some(bench_event(0)),
                idempotency_key: "bench-0".into(),
            })
        ];
        let name = format!("plain tonic echo ({} bytes), {} callers", payload.len(), args.concurrency);
        mesh_bench::run_echo(&name, load, addr, 8, payload).await
    };
    writeln!(out, "{echo}")?;
    let echo_cost = echo.us_per_call(echo.cpu.this_process());
    writeln!(cpu_rows, "{}", cpu_row(&echo))?;
    for (i, &n) in levels.iter().enumerate() {
        let load = Load { concurrency: n, ..load };
        let before = Batches::scrape(running.metrics_addr).await?;
        let appends = append_load(&clients, &format!("audit Append, {n} callers"), load).await;
        let grouped = Batches::scrape(running.metrics_addr).await?.since(&before);
        let pg = pgbench(owner, infra, schema, n, load, i == 0).await?;
        writeln!(out, "{appends}\n{pg}")?;
        writeln!(cpu_rows, "{}\n{}", cpu_row(&appends), cpu_row(&pg))?;
        for r in [&appends, &pg] {
            let other = r.cpu.busiest(|p| {
                p.pid != std::process::id() && !["postgres", "pgbench"].contains(&p.comm.as_str())
            });
            writeln!(others, "- other processes during {}: {other}", r.name)?;
        }
        writeln!(
            notes,
            "- {n} callers: Append / pgbench **{:.2}× throughput**, p99 {:.2}× ({} µs vs {} µs); {grouped}",
            appends.throughput() / pg.throughput(),
            appends.quantile_us(0.99) as f64 / pg.quantile_us(0.99) as f64,
            appends.quantile_us(0.99),
            pg.quantile_us(0.99),
        )?;
        // The work per appended event outside this process (PostgreSQL: the
        // rows, their index entries, WAL, the replica replaying it; the
        // kernel writing it back) bounds the ratio even if the callers, gRPC
        // and the service cost nothing; with the gRPC floor (an echo call,
        // client and server) it bounds it tighter. Both sides count every
        // process on the machine.
        let (pgbench_cost, pg_share) = (
            pg.us_per_call(pg.cpu.total()),
            appends.us_per_call(appends.cpu.total() - appends.cpu.this_process()),
        );
        writeln!(
            ceilings,
            "- {n} callers: pgbench {pgbench_cost:.0} µs per insert; an Append {pg_share:.0} µs outside \
             the service's process: Append / pgbench ≤ {:.1}× if gRPC and the service cost nothing, \
             ≤ {:.1}× if they cost what an echo call does ({echo_cost:.0} µs)",
            pgbench_cost / pg_share,
            pgbench_cost / (pg_share + echo_cost),
        )?;
        reports.extend([appends, pg]);
    }
    let before = Batches::scrape(running.metrics_addr).await?;
    let single = append_load(
        &clients,
        "audit Append, 1 caller",
        Load {
            concurrency: 1,
            duration: Duration::from_secs(args.seconds / 2),
            warmup: Duration::from_secs(1),
        },
    )
    .await;
    let alone = Batches::scrape(running.metrics_addr).await?.since(&before);
    writeln!(out, "{single}\n\n{notes}- 1 caller: {alone}\n")?;
    writeln!(out, "CPU per call in the measured windows (µs of CPU time, all processes on the machine):\n")?;
    writeln!(out, "{CPU_HEADER}\n{cpu_rows}\n{others}\nCeiling on this machine, CPU-bound:\n\n{ceilings}")?;
    reports.push(single);
    for r in &reports {
        if let Some(e) = &r.first_error {
            writeln!(out, "first error of {}: {e}\n", r.name)?;
        }
    }
    print!("{out}");
    out.clear();

    // 4. Query, one shape at a time, on what is now ~rows + appended events.
    pg::wait_replica(owner, &infra.pg_replica_url()).await?;
    sqlx::query("analyze audit_events").execute(&mut *owner).await?;
    let total: i64 = sqlx::query_scalar("select count(*) from audit_events").fetch_one(&mut *owner).await?;
    writeln!(out, "## Query (page of 100, {total} events, served by the replica)\n\n{TABLE_HEADER}")?;
    let qload = Load {
        concurrency: args.query_concurrency,
        duration: Duration::from_secs((args.seconds / 2).max(1)),
        warmup: Duration::from_secs(1),
    };
    let deep_token = deep_token(&clients[0]).await?;
    let week_ago = Utc::now() - chrono::Duration::days(7);
    type Shape = (&'static str, Arc<dyn Fn(u64) -> QueryRequest + Send + Sync>);
    let shapes: Vec<Shape> = vec![
        ("newest, no filter", Arc::new(|_| QueryRequest { page_size: 100, ..Default::default() })),
        (
            "actor_id (10k actors)",
            Arc::new(|n| {
                filter_page(EventFilter { actor_id: format!("user-{}", n % ACTORS), ..Default::default() })
            }),
        ),
        (
            "action + since 7 days",
            Arc::new(move |n| {
                filter_page(EventFilter {
                    action: format!("action-{}", n % ACTIONS),
                    since: Some(ts(week_ago)),
                    ..Default::default()
                })
            }),
        ),
        (
            "resource type + id (100k ids)",
            Arc::new(|n| {
                filter_page(EventFilter {
                    resource_type: format!("type-{}", n % 10),
                    resource_id: format!("doc-{}", (n * 7919) % RESOURCES),
                    ..Default::default()
                })
            }),
        ),
        (
            "outcome DENIED (3%)",
            Arc::new(|_| {
                filter_page(EventFilter {
                    outcome: mesh_proto::audit::Outcome::Denied as i32,
                    ..Default::default()
                })
            }),
        ),
        (
            "page 51 via page token",
            Arc::new(move |_| QueryRequest {
                page_size: 100,
                page_token: deep_token.clone(),
                ..Default::default()
            }),
        ),
    ];
    for (name, make) in shapes {
        let clients = clients.clone();
        let counter = Arc::new(AtomicU64::new(0));
        let report = run(&format!("Query: {name}"), qload, move |w| {
            let mut c = clients[w % clients.len()].clone();
            let req = make(counter.fetch_add(1, Ordering::Relaxed));
            async move { c.query(req).await.map(|_| ()) }
        })
        .await;
        eprintln!("{report}");
        writeln!(out, "{report}")?;
    }

    // 5. Verify the whole chain once.
    let t = Instant::now();
    let v = clients[0].clone().verify(VerifyRequest::default()).await?.into_inner();
    let took = t.elapsed();
    anyhow::ensure!(v.ok, "verify failed: {v:?}");
    writeln!(
        out,
        "\n## Verify\n\nVerify of the whole chain ({} events, replica): {took:.2?} ({:.0} events/s)",
        v.checked,
        v.checked as f64 / took.as_secs_f64()
    )?;
    print!("{out}");
    running.stop().await?;
    Ok(())
}

fn ts(t: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp { seconds: t.timestamp(), nanos: t.timestamp_subsec_nanos() as i32 }
}

fn filter_page(filter: EventFilter) -> QueryRequest {
    QueryRequest { filter: Some(filter), page_size: 100, ..Default::default() }
}

fn bench_event(n: u64) -> AuditEvent {
    AuditEvent {
        actor: Some(Actor { r#type: "user".into(), id: format!("user-{}", n % ACTORS) }),
        action: format!("action-{}", n % ACTIONS),
        resource: Some(Resource { r#type: format!("type-{}", n % 10), id: format!("doc-{}", n % RESOURCES) }),
        outcome: mesh_proto::audit::Outcome::Success as i32,
        source: Some(Source {
            ip: "10.0.0.1".into(),
            user_agent: "bench/1".into(),
            service: "mesh-bench".into(),
        }),
        metadata: Some(prost_types::Struct {
            fields: [(
                "bytes".to_owned(),
                prost_types::Value { kind: Some(prost_types::value::Kind::NumberValue(1234.0)) },
            )]
            .into(),
        }),
        ..Default::default()
    }
}

/// Idempotency keys of every append in the run (all distinct).
static NEXT_KEY: AtomicU64 = AtomicU64::new(0);

async fn append_load(clients: &Arc<Vec<AuditServiceClient<Channel>>>, name: &str, load: Load) -> Report {
    let clients = clients.clone();
    let report = run(name, load, move |w| {
        let mut c = clients[w % clients.len()].clone();
        let n = NEXT_KEY.fetch_add(1, Ordering::Relaxed);
        async move {
            let req = AppendRequest { event: Some(bench_event(n)), idempotency_key: format!("bench-{n}") };
            c.append(req).await.map(|_| ())
        }
    })
    .await;
    eprintln!("{report}");
    report
}

/// Group-commit counters from the service's metrics.
#[derive(Debug, Clone, Copy)]
struct Batches {
    batches: f64,
    events: f64,
    batch_seconds: f64,
    flushes: f64,
    flush_seconds: f64,
}

impl Batches {
    async fn scrape(metrics: std::net::SocketAddr) -> anyhow::Result<Self> {
        let text = scrape_metrics(metrics).await?;
        let v = |name: &str| metric_value(&text, name, &[]).unwrap_or(0.0);
        Ok(Self {
            batches: v("mesh_audit_batch_size_count"),
            events: v("mesh_audit_batch_size_sum"),
            batch_seconds: v("mesh_audit_batch_seconds_sum"),
            flushes: v("mesh_audit_flush_seconds_count"),
            flush_seconds: v("mesh_audit_flush_seconds_sum"),
        })
    }

    /// "mean batch N events, serial part X ms; mean flush Y ms covering Z batches"
    fn since(&self, before: &Self) -> String {
        let batches = (self.batches - before.batches).max(1.0);
        let flushes = (self.flushes - before.flushes).max(1.0);
        format!(
            "mean batch {:.1} events, its serial part (lock → async commit) {:.2} ms; \
             mean WAL flush {:.2} ms, covering {:.1} batches",
            (self.events - before.events) / batches,
            (self.batch_seconds - before.batch_seconds) / batches * 1000.0,
            (self.flush_seconds - before.flush_seconds) / flushes * 1000.0,
            batches / flushes,
        )
    }
}

/// A token 50 pages (5,000 events) deep into the unfiltered listing.
async fn deep_token(client: &AuditServiceClient<Channel>) -> anyhow::Result<String> {
    let mut c = client.clone();
    let mut token = String::new();
    for _ in 0..50 {
        let page = c.query(QueryRequest { page_size: 100, page_token: token, ..Default::default() }).await?;
        token = page.into_inner().next_page_token;
    }
    Ok(token)
}

/// Writes `rows` chained events with `recorded_at` spread over the last 60
/// days (up to an hour ago) by COPY, then points the chain head at them.
async fn seed(owner: &mut PgConnection, rows: u64) -> anyhow::Result<()> {
    let end = Utc::now() - chrono::Duration::hours(1);
    let start = end - chrono::Duration::days(60);
    let mut month =
        Utc.with_ymd_and_hms(start.year(), start.month(), 1, 0, 0, 0).single().context("month")?;
    while month <= end {
        sqlx::query("select audit_ensure_partition($1)").bind(month).execute(&mut *owner).await?;
        month = month.checked_add_months(chrono::Months::new(1)).context("month")?;
    }
    let step = (end - start).num_microseconds().context("span")? / rows.max(1) as i64;
    let copy = "copy audit_events (sequence, id, occurred_at, recorded_at, actor_type, actor_id, action, \
                resource_type, resource_id, outcome, source_ip, source_user_agent, source_service, request_id, \
                trace_id, metadata, prev_hash, hash, hash_version, metadata_pb) from stdin";
    let mut sink = owner.copy_in_raw(copy).await?;
    let mut prev = GENESIS;
    let mut last = None;
    let mut buf = String::with_capacity(8 << 20);
    for n in 0..rows {
        let recorded_at = start + chrono::Duration::microseconds(step * n as i64);
        let mut e = Event {
            sequence: n + 1,
            id: uuid::Uuid::now_v7(),
            occurred_at: recorded_at - chrono::Duration::milliseconds((n % 5000) as i64),
            recorded_at,
            actor_type: "user".into(),
            actor_id: format!("user-{}", n % ACTORS),
            action: format!("action-{}", n % ACTIONS),
            resource_type: format!("type-{}", n % 10),
            resource_id: format!("doc-{}", (n * 7919) % RESOURCES),
            outcome: match n % 100 {
                0..=2 => Outcome::Denied,
                3..=9 => Outcome::Failure,
                _ => Outcome::Success,
            },
            source_ip: "10.0.0.1".into(),
            source_user_agent: "bench/1".into(),
            source_service: "mesh-bench".into(),
            request_id: format!("req-{n}"),
            trace_id: String::new(),
            metadata: mesh_proto::json::from_json(
                serde_json::json!({"bytes": n % 10_000, "path": format!("/v1/docs/{}", n % RESOURCES)})
                    .as_object()
                    .expect("an object"),
            ),
            prev_hash: GENESIS,
            hash: GENESIS,
            version: HashVersion::V2,
        };
        e.seal(prev);
        prev = e.hash;
        let t = |t: DateTime<Utc>| t.to_rfc3339_opts(SecondsFormat::Micros, true);
        writeln!(
            buf,
            "{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t\\\\x{}\t\\\\x{}\t{}\t\\\\x{}",
            e.sequence,
            e.id,
            t(e.occurred_at),
            t(e.recorded_at),
            e.actor_type,
            e.actor_id,
            e.action,
            e.resource_type,
            e.resource_id,
            e.outcome.code(),
            e.source_ip,
            e.source_user_agent,
            e.source_service,
            e.request_id,
            e.trace_id,
            mesh_proto::json::to_json(&e.metadata),
            hex(&e.prev_hash),
            hex(&e.hash),
            e.version.code(),
            hex(&e.metadata.encode_to_vec()),
        )?;
        if buf.len() > (8 << 20) - 4096 {
            sink.send(buf.as_bytes()).await?;
            buf.clear();
        }
        last = Some(e);
    }
    if !buf.is_empty() {
        sink.send(buf.as_bytes()).await?;
    }
    sink.finish().await?;
    if let Some(last) = last {
        sqlx::query("update audit_chain_head set next_sequence = $1, head_hash = $2, recorded_at = $3")
            .bind(last.sequence as i64 + 1)
            .bind(last.hash.to_vec())
            .bind(last.recorded_at)
            .execute(&mut *owner)
            .await?;
    }
    sqlx::query("analyze audit_events").execute(&mut *owner).await?;
    Ok(())
}

fn hex(b: &[u8]) -> String {
    b.iter().fold(String::with_capacity(b.len() * 2), |mut s, x| {
        let _ = write!(s, "{x:02x}");
        s
    })
}

const CPU_HEADER: &str = "| target | machine busy | this process | PostgreSQL | pgbench | other | total |\n\
     | --- | ---: | ---: | ---: | ---: | ---: | ---: |";

/// Where the CPU went per successful call: this process (the callers, and
/// for Append the service it runs), every PostgreSQL process (primary
/// backends, WAL writer, walsender, the replica's walreceiver and startup),
/// pgbench, everything else.
fn cpu_row(r: &Report) -> String {
    r.cpu_row(&[
        ("load generator", r.cpu.this_process()),
        ("PostgreSQL", r.cpu.named("postgres")),
        ("pgbench", r.cpu.named("pgbench")),
    ])
}

/// pgbench: `clients` connections, each one INSERT per transaction into a
/// table shaped like `audit_events` (same columns, same indexes), latency of
/// every transaction logged; the first `load.warmup` is left out.
async fn pgbench(
    owner: &mut PgConnection,
    infra: &Infra,
    schema: &str,
    clients: usize,
    load: Load,
    create: bool,
) -> anyhow::Result<Report> {
    if create {
        sqlx::query("create table pgbench_events (like audit_events including defaults including indexes)")
            .execute(&mut *owner)
            .await?;
        sqlx::query("create sequence pgbench_seq").execute(&mut *owner).await?;
    }
    let dir = tempfile::tempdir()?;
    let script = dir.path().join("insert.sql");
    std::fs::write(
        &script,
        "\\set a random(0, 9999)\n\\set b random(0, 49)\n\\set r random(0, 99999)\n\
         insert into pgbench_events (sequence, id, occurred_at, recorded_at, actor_type, actor_id, action, \
         resource_type, resource_id, outcome, source_ip, source_user_agent, source_service, request_id, trace_id, \
         metadata, prev_hash, hash) values (nextval('pgbench_seq'), gen_random_uuid(), now(), now(), 'user', \
         'user-' || :a, 'action-' || :b, 'type-1', 'doc-' || :r, 1, '10.0.0.1', 'bench/1', 'mesh-bench', '', '', \
         '{\"bytes\": 1234}', '\\x00', '\\x00');\n",
    )?;
    let name = format!("pgbench INSERT, {clients} clients");
    let load = Load { concurrency: clients, ..load };
    pg::pgbench(&name, infra.pg_primary_port, schema, load, [OsStr::new("-f"), script.as_os_str()]).await
}

//! Scaling of the rate-limit and session services behind the mesh client's
//! balancer (issue 15): throughput with 1, 2 and 3 instances, and latency
//! from 16 to 1024 concurrent callers.
//!
//! For each service and each instance count N, N copies of the real release
//! binary (`target/release/mesh-ratelimit`, `target/release/mesh-session`,
//! build them first) run against the local Redis Cluster with one key prefix
//! and the same rules or settings, so they share their state through Redis as
//! replicas of one deployment do. One mesh-client typed client
//! (`RateLimitClient`, `SessionClient`) is built from a `ClientConfig` whose
//! address list (`MESH_RATELIMIT_ADDR`, `MESH_SESSION_ADDR`) names all N, so
//! every call goes through the whole client stack and its p2c/PeakEWMA
//! balancer (one HTTP/2 connection per instance). At each concurrency the
//! closed loop calls:
//!
//! - rate limit: `Check` with one descriptor (`[route=chat, user_id=u<n mod
//!   users>]`, limits high enough that every call is allowed), through the
//!   generated client over the same channel (`RateLimitClient::raw`) to read
//!   `x-mesh-ratelimit-decided-by`: a call decided other than by Redis (the
//!   fail-open fallback after the service's Redis deadline, 10 ms by
//!   default) counts as an error, not as a call;
//! - session: `ValidateSession` (cache on, as shipped) over sessions created
//!   first through the same client (users × 10), in rotation; before the
//!   first row of each instance count every instance validates every token
//!   once, directly, so that its cache holds them as it would after a while
//!   in service (the rows report the share answered from caches). The
//!   sessions are revoked at the end.
//!
//! Each row reports calls/s, p50/p99, errors, the CPU µs per call of the N
//! service processes together, of the load generator (this process) and of
//! every Redis node, and the share of the calls each instance handled (its
//! `grpc_server_handled_total{grpc_code="OK"}` for the method, read before
//! and after the row: warm-up included), which shows whether the balancer
//! spreads. The baseline, measured in the same run at each concurrency: the
//! plain tonic echo server (`mesh_bench::run_echo`, in this process, over
//! `--echo-connections` connections), so that p99 growing with callers can
//! be told apart from what gRPC alone does on this machine.
//!
//! ```text
//! cargo build --release -p mesh-bench --bin scaling -p mesh-ratelimit -p mesh-session --bin mesh-ratelimit --bin mesh-session
//! target/release/scaling --instances 1,2,3 --concurrency 16,128,512,1024 --duration 5 --warmup 2
//! ```

use std::{
    collections::HashMap,
    path::PathBuf,
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use clap::{Parser, ValueEnum};
use futures::{StreamExt as _, stream};
use mesh_bench::{ChildService, Load, Report, run, run_echo, spawn_plain_echo};
use mesh_client::{ClientConfig, ClientMetrics, RateLimitClient, SessionClient, config::keys};
use mesh_proto::session::{
    ClientInfo, CreateSessionRequest, RevokeUserSessionsRequest, ValidateSessionRequest,
    session_service_client::SessionServiceClient,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Service {
    Ratelimit,
    Session,
}

impl Service {
    fn name(self) -> &'static str {
        match self {
            Self::Ratelimit => "ratelimit",
            Self::Session => "session",
        }
    }

    /// The method measured, as `grpc_service` and `grpc_method` label it
    /// (`grpc.health.v1.Health` has a `Check` too).
    fn method(self) -> [&'static str; 2] {
        match self {
            Self::Ratelimit => {
                ["grpc_service=\"mesh.ratelimit.v1.RateLimitService\"", "grpc_method=\"Check\""]
            }
            Self::Session => {
                ["grpc_service=\"mesh.session.v1.SessionService\"", "grpc_method=\"ValidateSession\""]
            }
        }
    }
}

#[derive(Debug, Parser)]
#[command(
    about = "ratelimit Check and session ValidateSession with 1..N instances behind the mesh client balancer, at 16..1024 callers, vs plain tonic echo"
)]
struct Args {
    /// Instance counts (comma-separated).
    #[arg(long, default_value = "1,2,3", value_delimiter = ',')]
    instances: Vec<usize>,
    /// Concurrent callers (comma-separated levels).
    #[arg(long, default_value = "16,128,512,1024", value_delimiter = ',')]
    concurrency: Vec<usize>,
    /// Measured seconds per row.
    #[arg(long, default_value_t = 5)]
    duration: u64,
    /// Unmeasured warm-up seconds per row.
    #[arg(long, default_value_t = 2)]
    warmup: u64,
    /// Services to measure (comma-separated).
    #[arg(long, default_value = "ratelimit,session", value_delimiter = ',')]
    services: Vec<Service>,
    /// The rate-limit service binary.
    #[arg(long, default_value = "target/release/mesh-ratelimit")]
    ratelimit_binary: PathBuf,
    /// The session service binary.
    #[arg(long, default_value = "target/release/mesh-session")]
    session_binary: PathBuf,
    /// Redis Cluster seed nodes (comma-separated host:port).
    #[arg(long, default_value = "127.0.0.1:7000,127.0.0.1:7001,127.0.0.1:7002")]
    redis: String,
    /// Distinct users the rate-limit descriptors rotate over.
    #[arg(long, default_value_t = 10_000)]
    ratelimit_users: u64,
    /// Session users; each gets 10 sessions, validated in rotation.
    #[arg(long, default_value_t = 1000)]
    session_users: usize,
    /// The rules' algorithm: fixed_window, sliding_window or token_bucket.
    #[arg(long, default_value = "fixed_window")]
    algorithm: String,
    /// HTTP/2 connections of the echo baseline (the balancer holds one per instance).
    #[arg(long, default_value_t = 1)]
    echo_connections: usize,
}

/// N instances of one service, killed on drop.
struct Fleet {
    instances: Vec<ChildService>,
    _rules: Option<tempfile::TempDir>,
}

impl Fleet {
    async fn start(args: &Args, service: Service, prefix: &str, n: usize) -> anyhow::Result<Self> {
        let rules = match service {
            Service::Ratelimit => Some(mesh_bench::check_rules_dir(&args.algorithm)?),
            Service::Session => None,
        };
        let mut instances = Vec::with_capacity(n);
        for _ in 0..n {
            let mut cmd = Command::new(match service {
                Service::Ratelimit => &args.ratelimit_binary,
                Service::Session => &args.session_binary,
            });
            cmd.env_clear();
            if let Some(dir) = &rules {
                cmd.env("MESH_RATELIMIT_RULES", dir.path());
            }
            if service == Service::Session {
                cmd.env("MESH_SESSION_AUDIT_HASH_KEY", "benchmark-only-audit-hash-key")
                    // Nobody drains these outboxes: let them go a minute after the run.
                    .env("MESH_SESSION_OUTBOX_TTL_MS", "60000");
            }
            cmd.env("MESH_REDIS_URLS", &args.redis)
                .env("MESH_REDIS_KEY_PREFIX", prefix)
                .env("RUST_LOG", "warn");
            let child = ChildService::start(cmd).await?;
            if service == Service::Session {
                wait_for_cache(&child).await?;
            }
            instances.push(child);
        }
        Ok(Self { instances, _rules: rules })
    }

    fn pids(&self) -> Vec<u32> {
        self.instances.iter().map(|i| i.child.id()).collect()
    }

    /// `MESH_*_ADDR`: every instance.
    fn target(&self) -> String {
        self.instances.iter().map(|i| i.addr.to_string()).collect::<Vec<_>>().join(",")
    }

    /// Calls of `service`'s method each instance answered OK so far.
    async fn handled(&self, service: Service) -> Vec<f64> {
        let [svc, method] = service.method();
        let mut out = Vec::with_capacity(self.instances.len());
        for i in &self.instances {
            out.push(i.metric("grpc_server_handled_total", &[svc, method, "grpc_code=\"OK\""]).await);
        }
        out
    }

    /// Valid sessions all instances together answered from their caches
    /// and from Redis so far.
    async fn validations(&self) -> [f64; 2] {
        let mut out = [0.0; 2];
        for i in &self.instances {
            for (n, source) in ["source=\"cache\"", "source=\"redis\""].into_iter().enumerate() {
                out[n] += i.metric("mesh_session_validations_total", &["result=\"valid\"", source]).await;
            }
        }
        out
    }

    /// Validates every token once on each instance directly (not through
    /// the balancer), so that every instance's cache holds every session
    /// before the first measured row, as it would after a while in service.
    async fn warm_caches(&self, tokens: &[String]) -> anyhow::Result<()> {
        for i in &self.instances {
            let client = SessionServiceClient::new(mesh_testkit::channel(i.addr).await);
            stream::iter(tokens.iter().cloned())
                .map(|token| {
                    let mut client = client.clone();
                    async move { client.validate_session(ValidateSessionRequest { token, touch: false }).await }
                })
                .buffer_unordered(64)
                .collect::<Vec<_>>()
                .await
                .into_iter()
                .collect::<Result<Vec<_>, _>>()
                .context("warming the session caches")?;
        }
        Ok(())
    }
}

async fn wait_for_cache(service: &ChildService) -> anyhow::Result<()> {
    for _ in 0..300 {
        if service.metric("mesh_session_cache_enabled", &[]).await == 1.0 {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("the session cache never turned on")
}

/// A client configuration as a service reads it from its environment, with
/// `key` listing every instance of `fleet`.
fn client_config(key: &'static str, fleet: &Fleet) -> anyhow::Result<ClientConfig> {
    let env: HashMap<&'static str, String> = [(key, fleet.target())].into();
    Ok(ClientConfig::from_lookup(&env)?)
}

/// One measured row.
struct Row {
    service: &'static str,
    instances: usize,
    callers: usize,
    report: Report,
    /// CPU seconds of the N service processes together.
    service_cpu: f64,
    /// Share of the calls each instance handled (0–1).
    shares: Vec<f64>,
    /// Session: share of valid validations answered from a cache (0–1).
    cache_hits: Option<f64>,
}

async fn measure<F, Fut>(service: Service, load: Load, fleet: &Fleet, call: F) -> Row
where
    F: Fn(usize) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<(), String>> + Send,
{
    let n = fleet.instances.len();
    let name = format!("{} ×{n}, {} callers", service.name(), load.concurrency);
    let session = service == Service::Session;
    let before = fleet.handled(service).await;
    let cache_before = if session { fleet.validations().await } else { [0.0; 2] };
    let report = run(&name, load, call).await;
    let after = fleet.handled(service).await;
    let cache_after = if session { fleet.validations().await } else { [0.0; 2] };
    let [cache, redis] = [0, 1].map(|i| cache_after[i] - cache_before[i]);
    let cache_hits = session.then(|| cache / (cache + redis).max(1.0));
    let served: Vec<f64> = after.iter().zip(&before).map(|(a, b)| a - b).collect();
    let total = served.iter().sum::<f64>().max(1.0);
    let pids = fleet.pids();
    let service_cpu = report.cpu.seconds(|p| pids.contains(&p.pid));
    eprintln!(
        "{name}: {:.0} calls/s, p99 {} µs, {} errors",
        report.throughput(),
        report.quantile_us(0.99),
        report.errors
    );
    Row {
        service: service.name(),
        instances: n,
        callers: load.concurrency,
        report,
        service_cpu,
        shares: served.iter().map(|s| s / total).collect(),
        cache_hits,
    }
}

/// Check, one descriptor, at each concurrency through one balanced client.
async fn ratelimit_rows(args: &Args, fleet: &Fleet, loads: &[Load]) -> anyhow::Result<Vec<Row>> {
    let config = client_config(keys::RATELIMIT_ADDR, fleet)?;
    let client = RateLimitClient::from_config(&config, &ClientMetrics::default())?;
    // The generated client over the same balanced channel: the typed
    // client's `check` drops the response metadata the decision is read from.
    let raw = client.raw();
    let users = args.ratelimit_users;
    let mut rows = Vec::new();
    for &load in loads {
        let counter = Arc::new(AtomicU64::new(0));
        let raw = raw.clone();
        let row = measure(Service::Ratelimit, load, fleet, move |_| {
            let mut client = raw.clone();
            let n = counter.fetch_add(1, Ordering::Relaxed);
            async move {
                mesh_bench::decided_by_redis(client.check(mesh_bench::check_request(n, users, false)).await)
            }
        })
        .await;
        rows.push(row);
    }
    Ok(rows)
}

/// Creates 10 sessions for each of `users` through `client`; the tokens.
async fn create_sessions(client: &SessionClient, users: usize) -> anyhow::Result<Vec<String>> {
    let results: Vec<_> = stream::iter(0..users * 10)
        .map(|n| {
            let client = client.clone();
            async move {
                client
                    .create_session(CreateSessionRequest {
                        user_id: format!("bench-user-{}", n % users),
                        attributes: [("role".to_owned(), "member".to_owned())].into(),
                        idle_timeout: None,
                        absolute_timeout: None,
                        client: Some(ClientInfo { ip: "10.0.0.1".into(), user_agent: "mesh-bench".into() }),
                    })
                    .await
                    .map(|r| r.token)
            }
        })
        .buffer_unordered(64)
        .collect()
        .await;
    results.into_iter().collect::<Result<Vec<_>, _>>().context("creating sessions")
}

async fn revoke_all(client: &SessionClient, users: usize) {
    stream::iter(0..users)
        .for_each_concurrent(32, |n| {
            let client = client.clone();
            async move {
                let _ = client
                    .revoke_user_sessions(RevokeUserSessionsRequest {
                        user_id: format!("bench-user-{n}"),
                        ..Default::default()
                    })
                    .await;
            }
        })
        .await;
}

/// ValidateSession at each concurrency through one balanced client; the
/// sessions are created on the first call (they live in Redis, so later
/// fleets with the same prefix see them), warmed into every instance's
/// cache, and revoked when `last`.
async fn session_rows(
    args: &Args,
    fleet: &Fleet,
    loads: &[Load],
    tokens: &mut Option<Arc<Vec<String>>>,
    last: bool,
) -> anyhow::Result<Vec<Row>> {
    let config = client_config(keys::SESSION_ADDR, fleet)?;
    let client = SessionClient::from_config(&config, &ClientMetrics::default())?;
    let tokens = match tokens {
        Some(t) => t.clone(),
        None => tokens.insert(Arc::new(create_sessions(&client, args.session_users).await?)).clone(),
    };
    fleet.warm_caches(&tokens).await?;
    let mut rows = Vec::new();
    for &load in loads {
        let counter = Arc::new(AtomicU64::new(0));
        let (client, tokens) = (client.clone(), tokens.clone());
        let row = measure(Service::Session, load, fleet, move |_| {
            let client = client.clone();
            let n = counter.fetch_add(1, Ordering::Relaxed) as usize;
            let token = tokens[n % tokens.len()].clone();
            async move {
                client
                    .validate_session(ValidateSessionRequest { token, touch: false })
                    .await
                    .map(|_| ())
                    .map_err(|s| format!("{:?}: {}", s.code(), s.message()))
            }
        })
        .await;
        rows.push(row);
    }
    if last {
        revoke_all(&client, args.session_users).await;
    }
    Ok(rows)
}

fn shares(row: &Row) -> String {
    row.shares.iter().map(|s| format!("{:.0}", s * 100.0)).collect::<Vec<_>>().join(" / ") + " %"
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let started = Instant::now();
    let loads: Vec<Load> = args
        .concurrency
        .iter()
        .map(|&concurrency| Load {
            concurrency,
            duration: Duration::from_secs(args.duration),
            warmup: Duration::from_secs(args.warmup),
        })
        .collect();
    let prefix = format!("bench{}:", std::process::id());

    let echo_addr = spawn_plain_echo().await;
    let mut echo = Vec::new();
    for &load in &loads {
        let name = format!("plain tonic echo, {} callers", load.concurrency);
        let r = run_echo(&name, load, echo_addr, args.echo_connections, vec![b'x'; 64]).await;
        eprintln!("{name}: {:.0} calls/s, p99 {} µs", r.throughput(), r.quantile_us(0.99));
        echo.push((load.concurrency, r));
    }

    let mut rows = Vec::new();
    for &service in &args.services {
        let mut tokens = None;
        for (i, &n) in args.instances.iter().enumerate() {
            let fleet = Fleet::start(&args, service, &prefix, n).await?;
            let last = i + 1 == args.instances.len();
            rows.extend(match service {
                Service::Ratelimit => ratelimit_rows(&args, &fleet, &loads).await?,
                Service::Session => session_rows(&args, &fleet, &loads, &mut tokens, last).await?,
            });
        }
    }

    println!(
        "{} cores; {} s measured + {} s warm-up per row; rules algorithm {}; echo over {} connection(s)",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        args.duration,
        args.warmup,
        args.algorithm,
        args.echo_connections
    );
    println!();
    println!("## Plain tonic echo (in process: client and server CPU both in the load generator)");
    println!();
    println!("| callers | calls/s | p50 µs | p99 µs | errors | load generator CPU µs/call | machine busy |");
    println!("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    for (callers, r) in &echo {
        println!(
            "| {callers} | {:.0} | {} | {} | {} | {:.0} | {:.0} % |",
            r.throughput(),
            r.quantile_us(0.50),
            r.quantile_us(0.99),
            r.errors,
            r.us_per_call(r.cpu.this_process()),
            r.cpu.machine_busy * 100.0
        );
    }
    let echo_p99: HashMap<usize, f64> = echo.iter().map(|(c, r)| (*c, r.quantile_us(0.99) as f64)).collect();
    println!();
    println!("## Services behind the mesh client balancer");
    println!();
    println!(
        "| service | instances | callers | calls/s | vs fewest instances | p50 µs | p99 µs | p99 / echo p99 | errors \
         | service CPU µs/call (all instances) | load generator CPU µs/call | Redis CPU µs/call | machine busy \
         | calls served per instance |"
    );
    println!(
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"
    );
    let fewest = args.instances.iter().copied().min().unwrap_or(1);
    for row in &rows {
        let r = &row.report;
        let callers = row.callers;
        let base = rows
            .iter()
            .find(|b| b.service == row.service && b.instances == fewest && b.callers == callers)
            .map_or(f64::NAN, |b| r.throughput() / b.report.throughput());
        println!(
            "| {} | {} | {callers} | {:.0} | {base:.2} | {} | {} | {:.2} | {} | {:.0} | {:.0} | {:.0} | {:.0} % | {} | {} |",
            row.service,
            row.instances,
            r.throughput(),
            r.quantile_us(0.50),
            r.quantile_us(0.99),
            r.quantile_us(0.99) as f64 / echo_p99.get(&callers).copied().unwrap_or(f64::NAN).max(1.0),
            r.errors,
            r.us_per_call(row.service_cpu),
            r.us_per_call(r.cpu.this_process()),
            r.us_per_call(r.cpu.named("redis-server")),
            r.cpu.machine_busy * 100.0,
            shares(row),
            row.cache_hits.map_or("–".to_owned(), |h| format!("{:.1} %", h * 100.0)),
        );
    }
    let errors: Vec<String> = echo
        .iter()
        .map(|(_, r)| r)
        .chain(rows.iter().map(|r| &r.report))
        .filter_map(|r| {
            r.first_error.as_ref().map(|e| format!("- {}: {} errors, first: {e}", r.name, r.errors))
        })
        .collect();
    if !errors.is_empty() {
        println!();
        println!("{}", errors.join("\n"));
    }
    println!();
    println!(
        "Reading it: every instance, the load generator and the six Redis nodes share this machine's {} \
         cores, so more instances cannot add CPU: the table shows how evenly the p2c/PeakEWMA balancer \
         spreads the calls (calls served per instance; warm-up calls included) and what spreading costs \
         (calls/s vs fewest instances, CPU per call), not linear scaling. p99 / echo p99 separates the \
         services' queueing from what gRPC alone does at the same number of callers. A rate-limit error \
         `decided by fail-open` is a Check whose Redis round trip missed the service's deadline \
         (MESH_RATELIMIT_REDIS_TIMEOUT_MS): on a saturated machine more processes make more of them.",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!();
    println!("wall time: {:.0} s", started.elapsed().as_secs_f64());
    Ok(())
}

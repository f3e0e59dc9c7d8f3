//! mesh-ratelimit side by side with its peer, Kuadrant's limitador-server,
//! in one run: both behind the Envoy RLS API (`ShouldRateLimit`), both on
//! the same single-node Redis Cluster (all 16384 slots on one node,
//! `cluster-announce-ip 127.0.0.1`, started by this program on a free port),
//! both driven by the same load generator (this process: N callers over
//! `--connections` HTTP/2 connections, closed loop) with the same fixed
//! window of 10^9 hits a minute per `user_id`, so nothing is ever refused.
//! Two key shapes: one hot key, and `--keys` (10,000) keys.
//!
//! The targets alternate (`--rounds` of mesh then limitador per shape), so
//! the machine's drift falls on both alike; each row adds its rounds up.
//! Per decision it reports throughput, latency quantiles, the CPU time of
//! each server process, of Redis and of the load generator (`/proc`), the
//! Redis commands it ran (`INFO commandstats`, commands inside scripts
//! included) and the server's peak RSS. A mesh call counts only if Redis
//! decided it (`x-mesh-ratelimit-decided-by: redis`, not its failure mode);
//! limitador answers an error when Redis fails.
//!
//! limitador is built outside this repository (its code is never committed
//! here): fetch `github.com/Kuadrant/limitador` into a scratch directory,
//! install Debian's `libclang-dev` and `protobuf-compiler`, then
//! `cargo build --release --locked -p limitador-server` there. Results and
//! the commit measured: `libs/bench/results/peer.md`.
//!
//! ```text
//! cargo build --release -p mesh-ratelimit -p mesh-bench
//! target/release/peer --limitador /path/to/limitador/target/release/limitador-server
//! ```

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use anyhow::{Context as _, bail};
use clap::Parser;
use hdrhistogram::Histogram;
use mesh_bench::{ChildService, Load, PeakRss, Report, channels, run};
use mesh_proto::{
    envoy::extensions::common::ratelimit::v3::{RateLimitDescriptor, rate_limit_descriptor::Entry},
    envoy_rls::{
        RateLimitRequest, rate_limit_response::Code, rate_limit_service_client::RateLimitServiceClient,
    },
};

/// mesh's rules: a fixed window per `user_id` that never refuses.
const MESH_RULES: &str = r#"
domain: bench
descriptors:
  - key: user_id
    rate_limit: { unit: minute, requests_per_unit: 1000000000, algorithm: fixed_window }
"#;

/// limitador's limits: the same window (namespace = the RLS domain).
const LIMITADOR_LIMITS: &str = r#"
- namespace: bench
  max_value: 1000000000
  seconds: 60
  conditions: []
  variables:
    - descriptors[0]['user_id']
"#;

#[derive(Debug, Parser)]
#[command(about = "mesh-ratelimit vs limitador-server through the Envoy RLS API on one Redis Cluster node")]
struct Args {
    /// The limitador-server binary (built outside the repository, see the docs).
    #[arg(long, env = "LIMITADOR_BIN")]
    limitador: PathBuf,
    /// The mesh-ratelimit binary.
    #[arg(long, default_value = "target/release/mesh-ratelimit")]
    binary: PathBuf,
    /// Concurrent callers.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// HTTP/2 connections the callers share (per target).
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Measured seconds per round and target.
    #[arg(long, default_value_t = 5)]
    duration: u64,
    /// Unmeasured warm-up seconds before each round.
    #[arg(long, default_value_t = 1)]
    warmup: u64,
    /// Alternating rounds per key shape.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Distinct `user_id`s of the many-keys shape.
    #[arg(long, default_value_t = 10_000)]
    keys: u64,
}

/// One Redis node owning every slot of its cluster, killed on drop.
struct RedisNode {
    child: std::process::Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Drop for RedisNode {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn redis_cli(port: u16, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("redis-cli").arg("-p").arg(port.to_string()).args(args).output()?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

async fn single_node_cluster() -> anyhow::Result<RedisNode> {
    let dir = tempfile::tempdir()?;
    let port = mesh_testkit::free_addr().port();
    let child = Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--dir"])
        .arg(dir.path())
        .args(["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"])
        .args(["--cluster-announce-ip", "127.0.0.1", "--save", "", "--appendonly", "no"])
        .stdout(Stdio::null())
        .spawn()
        .context("starting redis-server (deploy/local/infra.sh installs it)")?;
    let node = RedisNode { child, port, _dir: dir };
    mesh_testkit::eventually(Duration::from_secs(10), "redis-server answers PING", || async {
        redis_cli(port, &["PING"]).ok().filter(|o| o.contains("PONG"))
    })
    .await;
    redis_cli(port, &["CLUSTER", "ADDSLOTSRANGE", "0", "16383"])?;
    mesh_testkit::eventually(Duration::from_secs(20), "cluster_state:ok", || async {
        redis_cli(port, &["CLUSTER", "INFO"]).ok().filter(|o| o.contains("cluster_state:ok"))
    })
    .await;
    Ok(node)
}

/// `INFO commandstats` as command → calls.
fn command_calls(port: u16) -> anyhow::Result<BTreeMap<String, u64>> {
    let text = redis_cli(port, &["INFO", "commandstats"])?;
    Ok(text
        .lines()
        .filter_map(|l| {
            let (name, rest) = l.strip_prefix("cmdstat_")?.split_once(':')?;
            let calls = rest.strip_prefix("calls=")?.split(',').next()?.parse().ok()?;
            Some((name.to_owned(), calls))
        })
        .collect())
}

/// A server under test.
struct Target {
    name: &'static str,
    addr: std::net::SocketAddr,
    pid: u32,
    /// Whether answers carry mesh's `decided-by` header (mesh) or not (limitador).
    mesh: bool,
}

fn request(user: u64) -> RateLimitRequest {
    RateLimitRequest {
        domain: "bench".into(),
        descriptors: vec![RateLimitDescriptor {
            entries: vec![Entry { key: "user_id".into(), value: format!("u{user}") }],
            ..RateLimitDescriptor::default()
        }],
        hits_addend: 1,
    }
}

/// One answer: allowed, and for mesh decided by Redis; else why not.
fn verdict(
    mesh: bool,
    answer: Result<tonic::Response<mesh_proto::envoy_rls::RateLimitResponse>, tonic::Status>,
) -> Result<(), String> {
    let resp = answer.map_err(|s| format!("{:?}: {}", s.code(), s.message()))?;
    if resp.get_ref().overall_code() != Code::Ok {
        return Err(format!("{:?}", resp.get_ref().overall_code()));
    }
    if mesh { mesh_bench::redis_decided(resp.metadata()) } else { Ok(()) }
}

async fn start_limitador(
    path: &Path,
    redis_port: u16,
    limits: &Path,
) -> anyhow::Result<(std::process::Child, std::net::SocketAddr)> {
    let (rls, http) = (mesh_testkit::free_addr().port(), mesh_testkit::free_addr().port());
    let child = Command::new(path)
        .args(["-b", "127.0.0.1", "-p", &rls.to_string(), "-B", "127.0.0.1", "-P", &http.to_string()])
        .arg(limits)
        .args(["redis", &format!("redis://127.0.0.1:{redis_port}")])
        .env_clear()
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {}", path.display()))?;
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], rls));
    // Ready once it answers a decision.
    mesh_testkit::eventually(Duration::from_secs(30), "limitador-server answers ShouldRateLimit", || async {
        let ch =
            tonic::transport::Endpoint::from_shared(format!("http://{addr}")).ok()?.connect().await.ok()?;
        let answer = RateLimitServiceClient::new(ch).should_rate_limit(request(0)).await;
        verdict(false, answer).ok()
    })
    .await;
    Ok((child, addr))
}

/// A target's rounds added up.
struct Sum {
    ok: u64,
    errors: u64,
    first_error: Option<String>,
    seconds: f64,
    hist: Histogram<u64>,
    server: f64,
    redis: f64,
    load_generator: f64,
    busy: f64,
    /// Redis commands per call, summed over the rounds.
    commands: BTreeMap<String, f64>,
    rounds: usize,
    peak_rss: u64,
}

impl Sum {
    fn new() -> Self {
        Self {
            ok: 0,
            errors: 0,
            first_error: None,
            seconds: 0.0,
            hist: mesh_bench::histogram(),
            server: 0.0,
            redis: 0.0,
            load_generator: 0.0,
            busy: 0.0,
            commands: BTreeMap::new(),
            rounds: 0,
            peak_rss: 0,
        }
    }

    fn add(&mut self, r: &Report, t: &Target, redis_pid: u32, commands: &BTreeMap<String, f64>, rss: u64) {
        self.ok += r.ok;
        self.errors += r.errors;
        if self.first_error.is_none() {
            self.first_error.clone_from(&r.first_error);
        }
        self.seconds += r.elapsed.as_secs_f64();
        self.hist.add(&r.latency_us).expect("same bounds");
        self.server += r.cpu.seconds(|p| p.pid == t.pid);
        self.redis += r.cpu.seconds(|p| p.pid == redis_pid);
        self.load_generator += r.cpu.this_process();
        self.busy += r.cpu.machine_busy * r.elapsed.as_secs_f64();
        for (k, v) in commands {
            *self.commands.entry(k.clone()).or_default() += v;
        }
        self.rounds += 1;
        self.peak_rss = self.peak_rss.max(rss);
    }

    fn per_call(&self, seconds: f64) -> f64 {
        seconds * 1e6 / self.ok.max(1) as f64
    }

    fn throughput(&self) -> f64 {
        self.ok as f64 / self.seconds.max(1e-9)
    }

    /// Redis commands per decision, busiest first: `evalsha 1.00, get 1.00`.
    fn commands_per_call(&self) -> String {
        let rounds = self.rounds.max(1) as f64;
        let mut v: Vec<(&String, f64)> =
            self.commands.iter().map(|(k, n)| (k, n / rounds)).filter(|(_, n)| *n >= 0.01).collect();
        v.sort_by(|a, b| b.1.total_cmp(&a.1));
        v.iter().map(|(k, n)| format!("{k} {n:.2}")).collect::<Vec<_>>().join(", ")
    }
}

/// One round on `t`: calls rotate over `keys` users.
/// Returns the report and every call issued, warm-up included.
async fn measure(args: &Args, load: Load, t: &Target, keys: u64) -> (Report, u64) {
    let chans = channels(t.addr, args.connections).await;
    let counter = Arc::new(AtomicU64::new(0));
    let issued = counter.clone();
    let mesh = t.mesh;
    let report = run(t.name, load, move |worker| {
        let mut client = RateLimitServiceClient::new(chans[worker % chans.len()].clone());
        let n = counter.fetch_add(1, Ordering::Relaxed);
        async move { verdict(mesh, client.should_rate_limit(request(n % keys)).await) }
    })
    .await;
    (report, issued.load(Ordering::Relaxed))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.rounds == 0 || args.keys == 0 {
        bail!("--rounds and --keys must be at least 1");
    }
    let load = Load {
        concurrency: args.concurrency,
        duration: Duration::from_secs(args.duration),
        warmup: Duration::from_secs(args.warmup),
    };
    let redis = single_node_cluster().await?;
    let redis_pid = redis.child.id();
    // Two directories: mesh reads every file of its rules directory.
    let (rules, peer_files) = (tempfile::tempdir()?, tempfile::tempdir()?);
    std::fs::write(rules.path().join("bench.yaml"), MESH_RULES)?;
    let limits = peer_files.path().join("limits.yaml");
    std::fs::write(&limits, LIMITADOR_LIMITS)?;

    let mut cmd = Command::new(&args.binary);
    cmd.env_clear()
        .env("MESH_REDIS_URLS", format!("127.0.0.1:{}", redis.port))
        .env("MESH_RATELIMIT_RULES", rules.path())
        .env("RUST_LOG", "warn");
    let mesh = ChildService::start(cmd).await?;
    let (mut limitador, limitador_addr) = start_limitador(&args.limitador, redis.port, &limits).await?;
    let version = Command::new(&args.limitador)
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).lines().next().unwrap_or_default().trim().to_owned())?;
    let targets = [
        Target { name: "mesh-ratelimit", addr: mesh.addr, pid: mesh.child.id(), mesh: true },
        Target { name: "limitador-server", addr: limitador_addr, pid: limitador.id(), mesh: false },
    ];

    let shapes = [(1, "hot key".to_owned()), (args.keys, format!("{} keys", args.keys))];
    let mut sums: Vec<[Sum; 2]> = Vec::new();
    for (keys, _) in &shapes {
        let mut pair = [Sum::new(), Sum::new()];
        for _ in 0..args.rounds {
            for (i, t) in targets.iter().enumerate() {
                let before = command_calls(redis.port)?;
                let peak = PeakRss::start(t.pid);
                let (r, calls) = measure(&args, load, t, *keys).await;
                let rss = peak.stop().await;
                let after = command_calls(redis.port)?;
                // Every call issued (warm-up included) had ended when `run`
                // returned: the commands between the two readings are theirs.
                let mut commands = BTreeMap::new();
                for (k, v) in &after {
                    let n = v - before.get(k).copied().unwrap_or(0);
                    commands.insert(k.clone(), n as f64 / calls.max(1) as f64);
                }
                pair[i].add(&r, t, redis_pid, &commands, rss);
            }
        }
        sums.push(pair);
    }
    let _ = limitador.kill();
    let _ = limitador.wait();

    println!(
        "Envoy RLS `ShouldRateLimit`, one descriptor, fixed window, {} callers over {} HTTP/2 connections, \
         {} alternating rounds of {} s per target and shape; one Redis Cluster node owning every slot. \
         Peer: {version}.",
        args.concurrency, args.connections, args.rounds, args.duration
    );
    println!();
    println!(
        "| shape | server | decisions/s | p50 µs | p99 µs | p99.9 µs | errors | server CPU µs | Redis CPU µs | load generator µs | machine busy | peak RSS MiB |"
    );
    println!("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    for ((_, shape), pair) in shapes.iter().zip(&sums) {
        for (t, s) in targets.iter().zip(pair) {
            println!(
                "| {shape} | {} | {:.0} | {} | {} | {} | {} | {:.1} | {:.1} | {:.1} | {:.0} % | {:.1} |",
                t.name,
                s.throughput(),
                s.hist.value_at_quantile(0.5),
                s.hist.value_at_quantile(0.99),
                s.hist.value_at_quantile(0.999),
                s.errors,
                s.per_call(s.server),
                s.per_call(s.redis),
                s.per_call(s.load_generator),
                s.busy / s.seconds.max(1e-9) * 100.0,
                s.peak_rss as f64 / 1024.0,
            );
        }
    }
    println!();
    println!(
        "| shape | throughput mesh / limitador | p99 mesh / limitador | server CPU mesh / limitador | Redis CPU mesh / limitador |"
    );
    println!("| --- | ---: | ---: | ---: | ---: |");
    for ((_, shape), [m, l]) in shapes.iter().zip(&sums) {
        println!(
            "| {shape} | {:.2} | {:.2} | {:.2} | {:.2} |",
            m.throughput() / l.throughput().max(1e-9),
            m.hist.value_at_quantile(0.99) as f64 / l.hist.value_at_quantile(0.99).max(1) as f64,
            m.per_call(m.server) / l.per_call(l.server).max(1e-9),
            m.per_call(m.redis) / l.per_call(l.redis).max(1e-9),
        );
    }
    println!();
    println!("Redis commands per decision (`INFO commandstats`, commands a script runs included):");
    println!();
    for ((_, shape), pair) in shapes.iter().zip(&sums) {
        for (t, s) in targets.iter().zip(pair) {
            println!("- {shape}, {}: {}", t.name, s.commands_per_call());
        }
    }
    for ((_, shape), pair) in shapes.iter().zip(&sums) {
        for (t, s) in targets.iter().zip(pair) {
            if let Some(e) = &s.first_error {
                println!("- {shape}, {}: {} errors, first: {e}", t.name, s.errors);
            }
        }
    }
    drop(mesh);
    drop(redis);
    Ok(())
}

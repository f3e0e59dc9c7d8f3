//! Benchmark of the rate-limit service's Check at N concurrent callers,
//! against two baselines measured in the same run:
//!
//! - the plain tonic echo server (`mesh_bench::spawn_plain_echo`): the cost
//!   of gRPC alone on this machine, in this process and in a process of its
//!   own (`mesh_bench::EchoProcess`), whose CPU per call is a gRPC server's
//!   floor to compare the service's with;
//! - `redis-benchmark` running the service's own check script (`EVALSHA`) on
//!   one cluster node at the same concurrency: the cost of Redis alone.
//!
//! The service runs as the real release binary (`target/release/mesh-ratelimit`,
//! build it first) against the local Redis Cluster, with its own key prefix;
//! its RSS is sampled under load. Every key the run writes has a TTL.
//!
//! ```text
//! cargo build --release -p mesh-ratelimit -p mesh-bench
//! target/release/ratelimit --concurrency 64 --duration 10
//! ```

use std::{
    path::PathBuf,
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use anyhow::{Context as _, bail};
use clap::Parser;
use mesh_bench::{
    ChildService, EchoProcess, Load, PeakRss, Report, TABLE_HEADER, channels, redis_benchmark_row, rss_kib,
    run, run_echo, spawn_plain_echo,
};
use mesh_proto::ratelimit::rate_limit_service_client::RateLimitServiceClient;

const CHECK_LUA: &str = include_str!("../../../../services/ratelimit/src/lua/check.lua");

#[derive(Debug, Parser)]
#[command(about = "Check throughput and latency vs plain tonic echo and redis-benchmark EVALSHA")]
struct Args {
    /// Concurrent callers.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Measured seconds per target.
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Unmeasured warm-up seconds per target.
    #[arg(long, default_value_t = 2)]
    warmup: u64,
    /// HTTP/2 connections the callers share (per target).
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Distinct users the descriptors rotate over.
    #[arg(long, default_value_t = 10_000)]
    users: u64,
    /// The service binary.
    #[arg(long, default_value = "target/release/mesh-ratelimit")]
    binary: PathBuf,
    /// Redis Cluster seed nodes (comma-separated host:port).
    #[arg(long, default_value = "127.0.0.1:7000,127.0.0.1:7001,127.0.0.1:7002")]
    redis: String,
    /// `MESH_RATELIMIT_REDIS_TIMEOUT_MS` for the service (default: the service's).
    #[arg(long)]
    redis_timeout_ms: Option<u64>,
    /// `MESH_REDIS_POOL_SIZE` for the service (default: the service's).
    #[arg(long)]
    redis_pool: Option<usize>,
    /// `TOKIO_WORKER_THREADS` for the service only (default: one per core).
    #[arg(long)]
    service_workers: Option<usize>,
    /// The rules' algorithm: fixed_window (the peers' and the issue's
    /// comparison), sliding_window (the service's default) or token_bucket.
    #[arg(long, default_value = "fixed_window")]
    algorithm: String,
    /// Extra `KEY=VALUE` environment for the service (repeatable), e.g.
    /// `OTEL_TRACES_SAMPLER=always_off`.
    #[arg(long = "service-env", value_parser = key_value)]
    service_env: Vec<(String, String)>,
    /// Also measure the service's CPU per Check (1 descriptor) as shipped,
    /// with tracing sampled at 1 % (`parentbased_traceidratio` 0.01) and
    /// with the OpenTelemetry layer off (`OTEL_SDK_DISABLED=true`): three
    /// processes, five alternating rounds of a third of `--duration` each.
    #[arg(long)]
    tracing: bool,
    /// The node redis-benchmark runs the script on.
    #[arg(long, default_value_t = 7000)]
    redis_bench_port: u16,
    /// Serve the plain echo server, print its address, and do nothing else
    /// (how the out-of-process baseline runs).
    #[arg(long, hide = true)]
    serve_echo: bool,
}

/// The service binary as a child process, with its rules file.
struct Service {
    child: ChildService,
    _rules: tempfile::TempDir,
}

fn key_value(s: &str) -> Result<(String, String), String> {
    let (k, v) = s.split_once('=').ok_or_else(|| format!("expected KEY=VALUE, got {s:?}"))?;
    Ok((k.to_owned(), v.to_owned()))
}

async fn start_service(args: &Args, prefix: &str, env: &[(&str, &str)]) -> anyhow::Result<Service> {
    let rules = mesh_bench::check_rules_dir(&args.algorithm)?;
    let mut cmd = Command::new(&args.binary);
    cmd.env_clear();
    if let Some(ms) = args.redis_timeout_ms {
        cmd.env("MESH_RATELIMIT_REDIS_TIMEOUT_MS", ms.to_string());
    }
    if let Some(n) = args.redis_pool {
        cmd.env("MESH_REDIS_POOL_SIZE", n.to_string());
    }
    if let Some(n) = args.service_workers {
        cmd.env("TOKIO_WORKER_THREADS", n.to_string());
    }
    cmd.env("MESH_REDIS_URLS", &args.redis)
        .env("MESH_REDIS_KEY_PREFIX", prefix)
        .env("MESH_RATELIMIT_RULES", rules.path())
        .env("RUST_LOG", "warn");
    cmd.envs(args.service_env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    cmd.envs(env.iter().copied());
    Ok(Service { child: ChildService::start(cmd).await?, _rules: rules })
}

/// Runs Check with `descriptors(n)` descriptors per call; returns the report and peak RSS.
async fn bench_check(
    name: &str,
    load: Load,
    service: &Service,
    connections: usize,
    users: u64,
    two_descriptors: bool,
) -> (Report, u64) {
    let chans = channels(service.child.addr, connections).await;
    let counter = Arc::new(AtomicU64::new(0));
    let peak = PeakRss::start(service.child.child.id());
    let report = run(name, load, move |worker| {
        let mut client = RateLimitServiceClient::new(chans[worker % chans.len()].clone());
        let n = counter.fetch_add(1, Ordering::Relaxed);
        async move {
            mesh_bench::decided_by_redis(
                client.check(mesh_bench::check_request(n, users, two_descriptors)).await,
            )
        }
    })
    .await;
    (report, peak.stop().await)
}

/// Where the CPU went per successful call: the load generator (this process;
/// for echo also the echo server), the service, every Redis node (masters
/// running the script, replicas applying its effects), everything else.
fn cpu_row(r: &Report, service_pid: u32) -> String {
    let service = r.cpu.seconds(|p| p.pid == service_pid);
    r.cpu_row(&[
        ("load generator", r.cpu.this_process()),
        ("service", service),
        ("Redis", r.cpu.named("redis-server")),
    ])
}

/// redis-benchmark running the service's check script on one node (keys in
/// one hash slot that node owns, rotating over `users` counters).
fn bench_redis(args: &Args, prefix: &str, requests: u64) -> anyhow::Result<(f64, String)> {
    let port = args.redis_bench_port.to_string();
    let sha = Command::new("redis-cli").args(["-p", &port, "SCRIPT", "LOAD", CHECK_LUA]).output()?;
    let sha = String::from_utf8(sha.stdout)?.trim().to_owned();
    if sha.len() != 40 {
        bail!("SCRIPT LOAD on {port} answered {sha:?}");
    }
    // A hash tag this node owns: a key elsewhere answers MOVED.
    let tag = (0..64)
        .map(|i| format!("bench{i}"))
        .find(|tag| {
            Command::new("redis-cli")
                .args(["-p", &port, "EXISTS", &format!("{{{tag}}}")])
                .output()
                .is_ok_and(|o| o.status.success() && !String::from_utf8_lossy(&o.stdout).contains("MOVED"))
        })
        .context("no hash tag found on the node")?;
    let key = format!("{prefix}rb:{{{tag}}}:__rand_int__");
    // check.lua's arguments (see its header) for one descriptor as the
    // service sends them: no call id (one slot group, no give-back record),
    // the server's clock, the rules' algorithm, 100,000,000 per minute (burst
    // the same, for a token bucket), 1 hit.
    let algorithm = match args.algorithm.as_str() {
        "fixed_window" => "1",
        "sliding_window" => "2",
        "token_bucket" => "3",
        other => bail!("unknown --algorithm {other:?}"),
    };
    let script_args = ["", "60000", "", algorithm, "100000000", "60000", "100000000", "1", "0"];
    // Once by hand first: the answer must be a decision that counted the hit
    // (applied, then 7 integers), or redis-benchmark would time a script
    // that does nothing (an earlier argument layout did exactly that).
    let probe = Command::new("redis-cli")
        .args(["-p", &port, "EVALSHA", &sha, "1", &key.replace("__rand_int__", "probe")])
        .args(script_args)
        .output()?;
    let probe = String::from_utf8_lossy(&probe.stdout).into_owned();
    let lines: Vec<&str> = probe.lines().collect();
    if lines.len() != 8 || lines[0] != "1" || lines[2] != "99999999" {
        bail!("check.lua did not count a hit with the benchmark's arguments: {probe:?}");
    }
    let out = Command::new("redis-benchmark")
        .args(["-p", &port, "-c", &args.concurrency.to_string(), "-n", &requests.to_string()])
        .args(["-r", &args.users.to_string(), "-q", "--csv"])
        .args(["EVALSHA", &sha, "1", &key])
        .args(script_args)
        .output()
        .context("running redis-benchmark")?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let row = text.lines().last().context("no redis-benchmark output")?;
    redis_benchmark_row(row)
}

/// Service CPU per Check (µs) as shipped, sampled at 1 % and without the
/// OpenTelemetry layer: five rounds, each measuring the three in turn.
async fn tracing_rounds(args: &Args, prefix: &str, load: Load) -> anyhow::Result<Vec<[f64; 3]>> {
    let settings: [&[(&str, &str)]; 3] = [
        &[],
        &[("OTEL_TRACES_SAMPLER", "parentbased_traceidratio"), ("OTEL_TRACES_SAMPLER_ARG", "0.01")],
        &[("OTEL_SDK_DISABLED", "true")],
    ];
    let mut services = Vec::new();
    for env in settings {
        services.push(start_service(args, prefix, env).await?);
    }
    let slice = Load {
        duration: Duration::from_secs((args.duration / 3).max(2)),
        warmup: Duration::from_secs(1),
        ..load
    };
    let mut rounds = Vec::new();
    for _ in 0..5 {
        let mut round = [0.0; 3];
        for (i, service) in services.iter().enumerate() {
            let (r, _) =
                bench_check("tracing round", slice, service, args.connections, args.users, false).await;
            let pid = service.child.child.id();
            round[i] = r.us_per_call(r.cpu.seconds(|p| p.pid == pid));
        }
        rounds.push(round);
    }
    Ok(rounds)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.serve_echo {
        mesh_bench::serve_echo().await;
    }
    let load = Load {
        concurrency: args.concurrency,
        duration: Duration::from_secs(args.duration),
        warmup: Duration::from_secs(args.warmup),
    };
    let prefix = format!("bench{}:", std::process::id());

    let echo_addr = spawn_plain_echo().await;
    let payload = b"ratelimit-sized payload: domain, two entries".to_vec();
    let echo = run_echo("plain tonic echo", load, echo_addr, args.connections, payload.clone()).await;
    // The same echo server as a process of its own, as the service runs:
    // its CPU per call is a gRPC server's floor on this machine.
    let echo_process = EchoProcess::start()?;
    let echo_pid = echo_process.pid();
    let echo_out =
        run_echo("plain tonic echo (own process)", load, echo_process.addr, args.connections, payload).await;
    drop(echo_process);

    let service = start_service(&args, &prefix, &[]).await?;
    let (one, rss_one) =
        bench_check("Check, 1 descriptor", load, &service, args.connections, args.users, false).await;
    let (two, rss_two) =
        bench_check("Check, 2 descriptors (2 slots)", load, &service, args.connections, args.users, true)
            .await;
    let service_pid = service.child.child.id();
    let idle_rss = rss_kib(service_pid).unwrap_or(0);
    drop(service);

    // Tracing: three service processes (as shipped, sampled at 1 %, no
    // OpenTelemetry layer) measured in alternating rounds, so the machine's
    // drift (shared cores, steal time) falls on all three alike.
    let tracing_rounds = if args.tracing { tracing_rounds(&args, &prefix, load).await? } else { Vec::new() };

    let requests = (one.throughput() * args.duration as f64).max(100_000.0) as u64;
    let (redis_rps, redis_detail) = bench_redis(&args, &prefix, requests)?;

    println!("{TABLE_HEADER}");
    for r in [&echo, &echo_out, &one, &two] {
        println!("{r}");
    }
    println!();
    println!(
        "redis-benchmark EVALSHA (check script, -c {}): {redis_rps:.0} calls/s, {redis_detail}",
        args.concurrency
    );
    println!();
    println!("| ratio | value |\n| --- | ---: |");
    println!("| Check (1 descriptor) / plain echo | {:.2} |", one.throughput() / echo.throughput());
    println!("| Check (2 descriptors) / plain echo | {:.2} |", two.throughput() / echo.throughput());
    println!("| Check (1 descriptor) / redis-benchmark EVALSHA | {:.2} |", one.throughput() / redis_rps);
    println!(
        "| Check p99 / echo p99 | {:.2} |",
        one.quantile_us(0.99) as f64 / echo.quantile_us(0.99).max(1) as f64
    );
    println!();
    println!("CPU per call in the measured windows (µs of CPU time, all processes on the machine):");
    println!();
    println!(
        "| target | machine busy | load generator | service (echo: its own process) | Redis (all nodes) | other | total |"
    );
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: |");
    for (r, pid) in [(&echo, service_pid), (&echo_out, echo_pid), (&one, service_pid), (&two, service_pid)] {
        println!("{}", cpu_row(r, pid));
    }
    let server_cpu = |r: &Report, pid: u32| r.us_per_call(r.cpu.seconds(|p| p.pid == pid));
    println!();
    println!(
        "Service CPU per Check (1 descriptor) {:.0} µs = {:.2}× the echo server's CPU per call in its own \
         process ({:.0} µs).",
        server_cpu(&one, service_pid),
        server_cpu(&one, service_pid) / server_cpu(&echo_out, echo_pid).max(0.001),
        server_cpu(&echo_out, echo_pid)
    );
    if !tracing_rounds.is_empty() {
        println!();
        println!("Service CPU per Check (1 descriptor), µs, by tracing setting, in alternating rounds:");
        println!();
        println!(
            "| round | as shipped (all sampled) | sampled 1 % | OpenTelemetry off | 1 % / off | shipped / off |"
        );
        println!("| ---: | ---: | ---: | ---: | ---: | ---: |");
        for (i, [shipped, sampled, off]) in tracing_rounds.iter().enumerate() {
            println!(
                "| {} | {shipped:.1} | {sampled:.1} | {off:.1} | {:.2} | {:.2} |",
                i + 1,
                sampled / off,
                shipped / off
            );
        }
        let median = |f: &dyn Fn(&[f64; 3]) -> f64| {
            let mut v: Vec<f64> = tracing_rounds.iter().map(f).collect();
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        println!();
        println!(
            "Median of the rounds: sampled 1 % costs {:.2}× no OpenTelemetry layer, all sampled {:.2}×.",
            median(&|r| r[1] / r[2]),
            median(&|r| r[0] / r[2])
        );
    }
    println!();
    let me = std::process::id();
    for r in [&echo, &echo_out, &one, &two] {
        let other = r.cpu.busiest(|p| {
            p.pid != me && p.pid != service_pid && p.pid != echo_pid && p.comm != "redis-server"
        });
        println!("- other processes during {}: {other}", r.name);
    }
    // A Check needs at least what an echo call needs (client and server
    // gRPC, both in this process for echo) plus Redis's side of the script:
    // with the machine saturated either way, that bounds the ratio.
    let echo_cost = echo.us_per_call(echo.cpu.this_process());
    let redis_cost = one.us_per_call(one.cpu.named("redis-server"));
    println!();
    println!(
        "Ceiling on this machine: a Check costs at least an echo call ({echo_cost:.0} µs) plus Redis's \
         side ({redis_cost:.0} µs), so Check / echo ≤ {:.2} even if the service added nothing to a plain \
         gRPC server.",
        echo_cost / (echo_cost + redis_cost)
    );
    println!();
    println!(
        "service RSS: peak {rss_one} KiB (1 descriptor), {rss_two} KiB (2 descriptors), {idle_rss} KiB after"
    );
    for r in [&echo, &echo_out, &one, &two] {
        if let Some(e) = &r.first_error {
            println!("{}: {} errors, first: {e}", r.name, r.errors);
        }
    }
    Ok(())
}

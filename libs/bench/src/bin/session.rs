//! Benchmark of the session service's ValidateSession, and of the same
//! check as Envoy's external authorization (`envoy.service.auth.v3.Authorization/Check`
//! with a CheckRequest shaped as Envoy's `ext_authz` filter sends it, the
//! same tokens), at N concurrent callers, against two baselines measured in
//! the same run:
//!
//! - the plain tonic echo server (`mesh_bench::spawn_plain_echo`): the cost
//!   of gRPC alone on this machine, in the benchmark's process as every
//!   mesh benchmark runs it, and in a process of its own (this program,
//!   `--serve-echo`), as the service runs: on two cores the process boundary
//!   alone costs throughput and tail latency;
//! - `redis-benchmark --cluster` GET on the same Redis Cluster at the same
//!   concurrency: the cost of one Redis round trip alone.
//!
//! The service runs as the real release binary (`target/release/mesh-session`,
//! build it first) against the local Redis Cluster with its own key prefix,
//! twice: with its validation cache (the default) and without it (every
//! validation one `EVALSHA`), each time through ValidateSession and through
//! ext_authz Check; the CPU time of every process in each measured window
//! gives the service's CPU µs per call for both paths. Sessions are created
//! first (users × 10, the per-user cap), validated in rotation, and revoked
//! at the end; the outboxes of their audit events expire a minute later.
//!
//! ```text
//! cargo build --release -p mesh-session -p mesh-bench --bin mesh-session --bin session
//! target/release/session --concurrency 64 --duration 10
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
use futures::{StreamExt as _, stream};
use mesh_bench::{
    ChildService, EchoProcess, Load, PeakRss, Report, TABLE_HEADER, channels, redis_benchmark_row, rss_kib,
    run, run_echo, spawn_plain_echo,
};
use mesh_proto::{
    envoy_authz::{
        AttributeContext, CheckRequest,
        attribute_context::{HttpRequest, Peer, Request as AttrRequest},
        authorization_client::AuthorizationClient,
        check_response::HttpResponse,
    },
    session::{
        ClientInfo, CreateSessionRequest, RevokeUserSessionsRequest, ValidateSessionRequest,
        session_service_client::SessionServiceClient,
    },
};

#[derive(Debug, Parser)]
#[command(
    about = "ValidateSession and ext_authz Check throughput, latency and CPU vs plain tonic echo and redis-benchmark GET"
)]
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
    /// Users; each gets 10 sessions, validated in rotation.
    #[arg(long, default_value_t = 1000)]
    users: usize,
    /// The service binary.
    #[arg(long, default_value = "target/release/mesh-session")]
    binary: PathBuf,
    /// Redis Cluster seed nodes (comma-separated host:port).
    #[arg(long, default_value = "127.0.0.1:7000,127.0.0.1:7001,127.0.0.1:7002")]
    redis: String,
    /// A node redis-benchmark starts from (it discovers the cluster).
    #[arg(long, default_value_t = 7000)]
    redis_bench_port: u16,
    /// `MESH_REDIS_POOL_SIZE` for the service (default: the service's).
    #[arg(long)]
    redis_pool: Option<usize>,
    /// Serve the plain echo server, print its address, and do nothing else
    /// (how the out-of-process baseline runs).
    #[arg(long, hide = true)]
    serve_echo: bool,
}

/// The service binary as a child process, killed on drop.
type Service = ChildService;

async fn start_service(args: &Args, prefix: &str, cache: bool) -> anyhow::Result<Service> {
    let mut cmd = Command::new(&args.binary);
    cmd.env_clear();
    if let Some(n) = args.redis_pool {
        cmd.env("MESH_REDIS_POOL_SIZE", n.to_string());
    }
    if !cache {
        cmd.env("MESH_SESSION_CACHE_MAX_BYTES", "0");
    }
    cmd.env("MESH_REDIS_URLS", &args.redis)
        .env("MESH_REDIS_KEY_PREFIX", prefix)
        .env("MESH_SESSION_AUDIT_HASH_KEY", "benchmark-only-audit-hash-key")
        // Nobody drains these outboxes: let them go a minute after the run.
        .env("MESH_SESSION_OUTBOX_TTL_MS", "60000")
        .env("RUST_LOG", "warn");
    let service = ChildService::start(cmd).await?;
    if cache {
        for _ in 0..300 {
            if service.metric("mesh_session_cache_enabled", &[]).await == 1.0 {
                return Ok(service);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bail!("the session cache never turned on");
    }
    Ok(service)
}

/// Creates 10 sessions for each user; returns the tokens.
async fn create_sessions(service: &Service, users: usize, concurrency: usize) -> anyhow::Result<Vec<String>> {
    let client = SessionServiceClient::new(mesh_testkit::channel(service.addr).await);
    let results: Vec<_> = stream::iter(0..users * 10)
        .map(|n| {
            let mut c = client.clone();
            async move {
                c.create_session(CreateSessionRequest {
                    user_id: format!("bench-user-{}", n % users),
                    attributes: [("role".to_owned(), "member".to_owned())].into(),
                    idle_timeout: None,
                    absolute_timeout: None,
                    client: Some(ClientInfo { ip: "10.0.0.1".into(), user_agent: "mesh-bench".into() }),
                })
                .await
                .map(|r| r.into_inner().token)
            }
        })
        .buffer_unordered(concurrency)
        .collect()
        .await;
    results.into_iter().collect::<Result<Vec<_>, _>>().context("creating sessions")
}

async fn revoke_all(service: &Service, users: usize) {
    let client = SessionServiceClient::new(mesh_testkit::channel(service.addr).await);
    stream::iter(0..users)
        .for_each_concurrent(32, |n| {
            let mut c = client.clone();
            async move {
                let _ = c
                    .revoke_user_sessions(RevokeUserSessionsRequest {
                        user_id: format!("bench-user-{n}"),
                        ..Default::default()
                    })
                    .await;
            }
        })
        .await;
}

/// ValidateSession over `tokens` in rotation; the report and peak RSS.
async fn bench_validate(
    name: &str,
    load: Load,
    service: &Service,
    connections: usize,
    tokens: Arc<Vec<String>>,
    touch: bool,
) -> (Report, u64) {
    let chans = channels(service.addr, connections).await;
    let counter = Arc::new(AtomicU64::new(0));
    let peak = PeakRss::start(service.child.id());
    let report = run(name, load, move |worker| {
        let mut client = SessionServiceClient::new(chans[worker % chans.len()].clone());
        let n = counter.fetch_add(1, Ordering::Relaxed) as usize;
        let token = tokens[n % tokens.len()].clone();
        async move {
            client
                .validate_session(ValidateSessionRequest { token, touch })
                .await
                .map(|_| ())
                .map_err(|s| format!("{:?}: {}", s.code(), s.message()))
        }
    })
    .await;
    (report, peak.stop().await)
}

/// A CheckRequest as Envoy's `ext_authz` filter (gRPC, v3) sends it for
/// `GET /api/chat?page=2` with deploy/envoy/envoy.yaml's `allowed_headers`
/// (only `authorization` and `cookie` reach the service, plus the
/// pseudo-headers Envoy always sends), the peer addresses, and no context
/// extensions (the route's default `touch`).
fn check_request(token: &str) -> CheckRequest {
    let headers = [
        (":authority", "shop.example"),
        (":method", "GET"),
        (":path", "/api/chat?page=2"),
        (":scheme", "https"),
        ("authorization", &format!("Bearer {token}")),
        ("x-forwarded-proto", "https"),
        ("x-request-id", "0f6a5b2e-4c1d-4e8a-9b7f-3d2c1a0e9f8b"),
    ];
    let socket = |ip: &str, port: u32| mesh_proto::envoy::config::core::v3::Address {
        address: Some(mesh_proto::envoy::config::core::v3::address::Address::SocketAddress(
            mesh_proto::envoy::config::core::v3::SocketAddress {
                address: ip.to_owned(),
                port_specifier: Some(
                    mesh_proto::envoy::config::core::v3::socket_address::PortSpecifier::PortValue(port),
                ),
                ..Default::default()
            },
        )),
    };
    CheckRequest {
        attributes: Some(AttributeContext {
            source: Some(Peer { address: Some(socket("203.0.113.7", 51234)), ..Peer::default() }),
            destination: Some(Peer { address: Some(socket("10.0.0.5", 8080)), ..Peer::default() }),
            request: Some(AttrRequest {
                time: Some(prost_types::Timestamp { seconds: 1_764_500_000, nanos: 0 }),
                http: Some(HttpRequest {
                    id: "1234567890123456789".into(),
                    method: "GET".into(),
                    headers: headers.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect(),
                    path: "/api/chat?page=2".into(),
                    host: "shop.example".into(),
                    scheme: "https".into(),
                    protocol: "HTTP/1.1".into(),
                    size: -1,
                    ..HttpRequest::default()
                }),
            }),
            ..AttributeContext::default()
        }),
    }
}

/// ext_authz Check over `tokens` in rotation (each an allow, else an error);
/// the report and peak RSS.
async fn bench_check(
    name: &str,
    load: Load,
    service: &Service,
    connections: usize,
    tokens: Arc<Vec<String>>,
) -> (Report, u64) {
    let chans = channels(service.addr, connections).await;
    // Built ahead, as Envoy builds one per request outside the service.
    let requests: Arc<Vec<CheckRequest>> = Arc::new(tokens.iter().map(|t| check_request(t)).collect());
    let counter = Arc::new(AtomicU64::new(0));
    let peak = PeakRss::start(service.child.id());
    let report = run(name, load, move |worker| {
        let mut client = AuthorizationClient::new(chans[worker % chans.len()].clone());
        let n = counter.fetch_add(1, Ordering::Relaxed) as usize;
        let req = requests[n % requests.len()].clone();
        async move {
            let r =
                client.check(req).await.map_err(|s| format!("{:?}: {}", s.code(), s.message()))?.into_inner();
            match (r.status.map(|s| s.code), r.http_response) {
                (Some(0), Some(HttpResponse::OkResponse(_))) => Ok(()),
                (code, resp) => Err(format!("not an allow: status {code:?}, {resp:?}")),
            }
        }
    })
    .await;
    (report, peak.stop().await)
}

/// Where the CPU went per successful call: the load generator (this process;
/// for echo also the echo server), the service, every Redis node, the rest.
fn cpu_row(r: &Report, service_pid: Option<u32>) -> String {
    let service = service_pid.map_or(0.0, |pid| r.cpu.seconds(|p| p.pid == pid));
    r.cpu_row(&[
        ("load generator", r.cpu.this_process()),
        ("service", service),
        ("Redis", r.cpu.named("redis-server")),
    ])
}

/// About a ValidateSession request's size (a 59-character token).
fn echo_payload() -> Vec<u8> {
    vec![b'x'; 64]
}

/// redis-benchmark GET across the cluster at the same concurrency.
fn bench_redis(args: &Args, requests: u64) -> anyhow::Result<(f64, String)> {
    let out = Command::new("redis-benchmark")
        .args(["--cluster", "-p", &args.redis_bench_port.to_string()])
        .args(["-c", &args.concurrency.to_string(), "-n", &requests.to_string()])
        .args(["-r", "10000", "-t", "get", "-q", "--csv"])
        .output()
        .context("running redis-benchmark")?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let row = text.lines().rfind(|l| l.starts_with("\"GET")).context("no redis-benchmark output")?;
    redis_benchmark_row(row)
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
    let echo =
        run_echo("plain tonic echo (in process)", load, echo_addr, args.connections, echo_payload()).await;
    let echo_process = EchoProcess::start()?;
    let echo_out =
        run_echo("plain tonic echo (own process)", load, echo_process.addr, args.connections, echo_payload())
            .await;
    let echo_pid = echo_process.pid();
    drop(echo_process);

    let cached = start_service(&args, &prefix, true).await?;
    let tokens = Arc::new(create_sessions(&cached, args.users, args.concurrency).await?);
    let (hit, rss_hit) =
        bench_validate("ValidateSession (cache)", load, &cached, args.connections, tokens.clone(), false)
            .await;
    let (touch, rss_touch) = bench_validate(
        "ValidateSession touch=true (cache)",
        load,
        &cached,
        args.connections,
        tokens.clone(),
        true,
    )
    .await;
    let (authz_hit, rss_authz_hit) =
        bench_check("ext_authz Check (cache)", load, &cached, args.connections, tokens.clone()).await;
    let from_cache = cached.metric("mesh_session_validations_total", &["source=\"cache\""]).await;
    let from_redis = cached.metric("mesh_session_validations_total", &["source=\"redis\""]).await;

    let uncached = start_service(&args, &prefix, false).await?;
    let (miss, rss_miss) = bench_validate(
        "ValidateSession (no cache: one EVALSHA)",
        load,
        &uncached,
        args.connections,
        tokens.clone(),
        false,
    )
    .await;
    let (authz_miss, rss_authz_miss) = bench_check(
        "ext_authz Check (no cache: one EVALSHA)",
        load,
        &uncached,
        args.connections,
        tokens.clone(),
    )
    .await;
    let (cached_pid, uncached_pid) = (cached.child.id(), uncached.child.id());
    let idle_rss = rss_kib(cached.child.id()).unwrap_or(0);
    revoke_all(&cached, args.users).await;
    drop(uncached);
    drop(cached);

    let requests = (hit.throughput() * args.duration as f64).max(200_000.0) as u64;
    let (redis_rps, redis_detail) = bench_redis(&args, requests)?;

    println!("{TABLE_HEADER}");
    for r in [&echo, &echo_out, &hit, &touch, &authz_hit, &miss, &authz_miss] {
        println!("{r}");
    }
    println!();
    println!(
        "redis-benchmark --cluster GET (-c {}, -r 10000): {redis_rps:.0} calls/s, {redis_detail}",
        args.concurrency
    );
    println!();
    println!("| ratio | value |\n| --- | ---: |");
    let tp = |r: &Report| r.throughput();
    let p99 = |r: &Report| r.quantile_us(0.99) as f64;
    for (label, r) in [("(cache)", &hit), ("touch=true (cache)", &touch), ("(no cache)", &miss)] {
        println!("| ValidateSession {label} / echo in process, throughput | {:.2} |", tp(r) / tp(&echo));
        println!("| ValidateSession {label} / echo own process, throughput | {:.2} |", tp(r) / tp(&echo_out));
        println!("| ValidateSession {label} / redis-benchmark GET, throughput | {:.2} |", tp(r) / redis_rps);
        println!(
            "| ValidateSession {label} p99 / echo in process p99 | {:.2} |",
            p99(r) / p99(&echo).max(1.0)
        );
        println!(
            "| ValidateSession {label} p99 / echo own process p99 | {:.2} |",
            p99(r) / p99(&echo_out).max(1.0)
        );
    }
    for (label, authz, validate) in [("(cache)", &authz_hit, &hit), ("(no cache)", &authz_miss, &miss)] {
        println!(
            "| ext_authz Check {label} / ValidateSession {label}, throughput | {:.2} |",
            tp(authz) / tp(validate)
        );
        println!(
            "| ext_authz Check {label} p99 / ValidateSession {label} p99 | {:.2} |",
            p99(authz) / p99(validate).max(1.0)
        );
    }
    println!();
    println!("CPU per call in the measured windows (µs of CPU time, all processes on the machine):");
    println!();
    println!(
        "| target | machine busy | load generator | service (echo: its own process) | Redis (all nodes) | other | total |"
    );
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: |");
    for (r, pid) in [
        (&echo, None),
        (&echo_out, Some(echo_pid)),
        (&hit, Some(cached_pid)),
        (&touch, Some(cached_pid)),
        (&authz_hit, Some(cached_pid)),
        (&miss, Some(uncached_pid)),
        (&authz_miss, Some(uncached_pid)),
    ] {
        println!("{}", cpu_row(r, pid));
    }
    println!();
    println!(
        "sessions: {}; cached instance answered {from_cache:.0} validations from its cache, {from_redis:.0} from Redis",
        tokens.len()
    );
    println!(
        "service RSS: peak {rss_hit} KiB (cache), {rss_touch} KiB (touch), {rss_authz_hit} KiB (ext_authz, cache), \
         {rss_miss} KiB (no cache), {rss_authz_miss} KiB (ext_authz, no cache), {idle_rss} KiB after"
    );
    for r in [&echo, &echo_out, &hit, &touch, &authz_hit, &miss, &authz_miss] {
        if let Some(e) = &r.first_error {
            println!("{}: {} errors, first: {e}", r.name, r.errors);
        }
    }
    Ok(())
}

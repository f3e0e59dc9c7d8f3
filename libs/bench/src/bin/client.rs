//! Overhead of the mesh client stack (trace propagation, deadline, retry,
//! p2c/PeakEWMA balancer, circuit breaker, attempt timeout) against a bare
//! tonic channel, calling the same plain echo server in the same run.
//!
//! 1. **End to end**: closed-loop callers against the in-process echo server,
//!    one HTTP/2 connection per client, alternating bare and stack rounds at
//!    each concurrency so that drift on a shared machine hits both alike;
//!    the ratios are per round, summarised by their median. Run on Tokio's
//!    multi-threaded runtime (what services use) and on a current-thread
//!    runtime, where client and server share one thread: no cross-thread
//!    wake-ups, so the difference is the stack's CPU and little else. The
//!    baseline server is tonic alone; a last setup repeats the comparison
//!    against the echo service on the mesh runtime, which is what the stack
//!    calls in production (its server layer builds spans too).
//! 2. **CPU per layer**: each layer alone, then the whole stack, over a fake
//!    endpoint that answers at once (no network), in nanoseconds per call.
//! 3. With `--e2e-layer-secs N`: each layer alone over a real connection, one
//!    caller, against the bare channel in alternation (what only a real
//!    HTTP/2 exchange costs: headers on the wire, response bodies, trailers).
//!
//! Telemetry is set up as a service has it (tracing subscriber with the
//! OpenTelemetry layer, no exporter), so client spans are really built.
//!
//! ```sh
//! cargo run --release -p mesh-bench --bin client                          # 1 and 2
//! cargo run --release -p mesh-bench --bin client -- --setups "" --layer-calls 0 --e2e-layer-secs 5   # 3
//! ```

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use clap::Parser;
use http::{Request, Response};
use mesh_bench::{Load, Report, TABLE_HEADER, run, spawn_plain_echo};
use mesh_client::{Channel, ClientMetrics};
use mesh_runtime::{Telemetry, TelemetryConfig};
use mesh_testkit::echo::{EchoRequest, EchoServiceClient};
use mesh_tower::{
    AttemptTimeoutLayer, Balance, BalanceConfig, BoxError, BreakerConfig, CircuitBreakerLayer,
    DeadlineConfig, DeadlineLayer, EndpointAddr, RetryConfig, RetryLayer, RetryPolicy, TraceLayer,
};
use tonic::body::Body;
use tower::{Layer, Service, ServiceExt};

const ECHO: &str = "/mesh.testkit.echo.v1.EchoService/Echo";

#[derive(Debug, Parser)]
struct Args {
    /// Concurrent callers, comma-separated levels.
    #[arg(long, default_value = "1,64", value_delimiter = ',')]
    concurrency: Vec<usize>,
    /// Measured seconds per target and round.
    #[arg(long, default_value_t = 4)]
    duration_secs: u64,
    /// Warm-up seconds before each measurement.
    #[arg(long, default_value_t = 1)]
    warmup_secs: u64,
    /// Alternating bare/stack rounds per level.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Payload bytes per call.
    #[arg(long, default_value_t = 64)]
    payload: usize,
    /// Calls per layer in the CPU-per-layer section (0: skip it).
    #[arg(long, default_value_t = 200_000)]
    layer_calls: u32,
    /// End to end, each layer alone over a real connection (current-thread
    /// runtime, plain echo server, one caller): seconds per row (0: skip it).
    #[arg(long, default_value_t = 0)]
    e2e_layer_secs: u64,
    /// End-to-end setups, `runtime/server`: runtime `multi` or `current`,
    /// server `plain` (tonic alone, the baseline the goal refers to) or
    /// `mesh` (the echo service on the mesh runtime, as services run).
    #[arg(long, default_value = "multi/plain,current/plain,multi/mesh", value_delimiter = ',')]
    setups: Vec<String>,
}

async fn measure<T>(name: &str, load: Load, client: EchoServiceClient<T>, payload: usize) -> Report
where
    T: tonic::client::GrpcService<Body> + Clone + Send + Sync + 'static,
    T::Future: Send,
    T::Error: Into<tonic::codegen::StdError>,
    T::ResponseBody: tonic::codegen::Body<Data = tonic::codegen::Bytes> + Send + 'static,
    <T::ResponseBody as tonic::codegen::Body>::Error: Into<tonic::codegen::StdError> + Send,
{
    let req = EchoRequest { payload: vec![7; payload], delay_ms: 0 };
    run(name, load, move |_| {
        let (mut client, req) = (client.clone(), req.clone());
        async move { client.echo(req).await.map(drop) }
    })
    .await
}

fn stack(addr: SocketAddr, metrics: &ClientMetrics) -> EchoServiceClient<Channel> {
    EchoServiceClient::new(stack_channel(addr, metrics))
}

fn stack_channel(addr: SocketAddr, metrics: &ClientMetrics) -> Channel {
    Channel::builder("echo", addr.to_string().parse().expect("ip:port"))
        .metrics(metrics)
        .idempotent([ECHO])
        .build()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 }
}

/// The echo service on the mesh runtime (server span, request id, metrics,
/// health, reflection), on 127.0.0.1:0.
async fn spawn_mesh_echo() -> anyhow::Result<SocketAddr> {
    let mut server = mesh_runtime::Server::bind(mesh_runtime::ServerConfig::for_tests()).await?;
    server
        .add_service(mesh_testkit::echo::server())
        .add_descriptor_set(mesh_testkit::echo::FILE_DESCRIPTOR_SET);
    let addr = server.local_addr();
    tokio::spawn(server.serve(std::future::pending()));
    Ok(addr)
}

async fn end_to_end(args: &Args, metrics: &ClientMetrics, runtime: &str, server: &str) -> anyhow::Result<()> {
    let addr = match server {
        "plain" => spawn_plain_echo().await,
        "mesh" => spawn_mesh_echo().await?,
        other => anyhow::bail!("unknown server {other:?}: plain or mesh"),
    };
    let bare = EchoServiceClient::new(mesh_testkit::channel(addr).await);
    let stacked = stack(addr, metrics);

    println!("## End to end, {runtime} runtime, {server} echo server\n\n{TABLE_HEADER}");
    let mut summary = Vec::new();
    for &concurrency in &args.concurrency {
        let load = Load {
            concurrency,
            duration: Duration::from_secs(args.duration_secs),
            warmup: Duration::from_secs(args.warmup_secs),
        };
        let (mut tput, mut p50, mut p99) = (Vec::new(), Vec::new(), Vec::new());
        for round in 1..=args.rounds {
            let b =
                measure(&format!("bare tonic, c={concurrency}, #{round}"), load, bare.clone(), args.payload)
                    .await;
            let s = measure(
                &format!("mesh stack, c={concurrency}, #{round}"),
                load,
                stacked.clone(),
                args.payload,
            )
            .await;
            println!("{b}\n{s}");
            for r in [&b, &s] {
                if let Some(e) = &r.first_error {
                    eprintln!("{}: {} errors, first: {e}", r.name, r.errors);
                }
            }
            tput.push(s.throughput() / b.throughput());
            p50.push(s.quantile_us(0.50) as f64 - b.quantile_us(0.50) as f64);
            p99.push(s.quantile_us(0.99) as f64 - b.quantile_us(0.99) as f64);
        }
        summary.push((concurrency, median(tput), median(p50), median(p99)));
    }
    println!(
        "\n| runtime | server | concurrency | stack/bare calls/s (median) | added p50 µs (median) | added p99 µs (median) |"
    );
    println!("| --- | --- | ---: | ---: | ---: | ---: |");
    for (c, t, p50, p99) in summary {
        println!("| {runtime} | {server} | {c} | {t:.3} | {p50:.0} | {p99:.0} |");
    }
    println!();
    Ok(())
}

fn request() -> Request<Body> {
    let body = http_body_util::Full::new(bytes::Bytes::from_static(b"\0\0\0\0\x05hello"));
    let mut req = Request::new(Body::new(body));
    *req.uri_mut() = ECHO.parse().expect("path");
    req
}

/// Nanoseconds per call of `svc` (after a warm-up), on this task.
async fn per_call<S, B>(calls: u32, mut svc: S) -> f64
where
    S: Service<Request<Body>, Response = Response<B>>,
    S::Error: std::fmt::Debug,
{
    for _ in 0..calls / 10 {
        drop(svc.ready().await.expect("ready").call(request()).await.expect("answer"));
    }
    let start = Instant::now();
    for _ in 0..calls {
        drop(svc.ready().await.expect("ready").call(request()).await.expect("answer"));
    }
    start.elapsed().as_nanos() as f64 / f64::from(calls)
}

async fn per_layer(calls: u32, metrics: &ClientMetrics) {
    // An endpoint that answers OK at once (trailers-only), so only the layers cost.
    let endpoint = tower::service_fn(|_req: Request<Body>| async {
        let mut resp = Response::new(Body::empty());
        resp.headers_mut().insert("grpc-status", http::HeaderValue::from_static("0"));
        Ok::<_, BoxError>(resp)
    });
    let m = metrics.clone();
    let breaker = BreakerConfig::default();
    let make = {
        let (endpoint, m, breaker) = (endpoint, m.clone(), breaker.clone());
        move |ep: &EndpointAddr| {
            CircuitBreakerLayer::new(&breaker, "echo", ep.to_string(), m.clone())
                .layer(AttemptTimeoutLayer::new(None).layer(endpoint))
        }
    };
    let balance = Balance::new("echo", BalanceConfig::default(), m.clone(), make);
    balance.set_endpoints([EndpointAddr { addr: ([127, 0, 0, 1], 1).into(), host: "127.0.0.1".into() }]);
    let retry = RetryLayer::new(RetryConfig::default(), RetryPolicy::idempotent([ECHO]), m.clone());
    let deadline = DeadlineLayer::new(DeadlineConfig::default(), m.clone());
    let trace = TraceLayer::new(m.clone());

    let base = per_call(calls, endpoint).await;
    let rows = [
        ("trace", per_call(calls, trace.layer(endpoint)).await),
        ("deadline", per_call(calls, deadline.layer(endpoint)).await),
        ("retry", per_call(calls, retry.layer(endpoint)).await),
        ("attempt timeout", per_call(calls, AttemptTimeoutLayer::new(None).layer(endpoint)).await),
        (
            "circuit breaker",
            per_call(calls, CircuitBreakerLayer::new(&breaker, "e", "e", m.clone()).layer(endpoint)).await,
        ),
        ("balance (+ breaker, attempt timeout)", per_call(calls, balance.clone()).await),
        ("whole stack", per_call(calls, trace.layer(deadline.layer(retry.layer(balance.clone())))).await),
    ];
    println!("\n## CPU per layer (no network, {calls} calls each)\n");
    println!("| layer | ns per call, layer only |\n| --- | ---: |");
    println!("| (the fake endpoint itself) | {base:.0} |");
    for (name, ns) in rows {
        println!("| {name} | {:.0} |", ns - base);
    }
}

/// Each layer alone over a real connection to the plain echo server, one
/// caller, alternating with the bare channel: where the end-to-end cost of
/// the stack comes from (the CPU-per-layer table misses what only a real
/// HTTP/2 exchange exercises: response bodies, trailers, extra headers).
async fn e2e_layers(args: &Args, metrics: &ClientMetrics) -> anyhow::Result<()> {
    let addr = spawn_plain_echo().await;
    let bare = mesh_testkit::channel(addr).await;
    let m = metrics.clone();
    let load = Load {
        concurrency: 1,
        duration: Duration::from_secs(args.e2e_layer_secs),
        warmup: Duration::from_secs(args.warmup_secs),
    };
    let breaker = BreakerConfig::default();
    let make = {
        let (bare, m, breaker) = (bare.clone(), m.clone(), breaker.clone());
        move |ep: &EndpointAddr| {
            CircuitBreakerLayer::new(&breaker, "echo", ep.to_string(), m.clone())
                .layer(AttemptTimeoutLayer::new(None).layer(bare.clone()))
        }
    };
    let balance = Balance::new("echo", BalanceConfig::default(), m.clone(), make);
    balance.set_endpoints([EndpointAddr { addr, host: "127.0.0.1".into() }]);
    let retry = RetryLayer::new(RetryConfig::default(), RetryPolicy::idempotent([ECHO]), m.clone());
    let deadline = DeadlineLayer::new(DeadlineConfig::default(), m.clone());
    let trace = TraceLayer::new(m.clone());

    println!("## End to end, one layer at a time (current runtime, 1 caller, plain echo server)\n");
    println!(
        "| layer | calls/s | bare calls/s | ratio | added p50 µs |\n| --- | ---: | ---: | ---: | ---: |"
    );
    macro_rules! row {
        ($name:expr, $svc:expr) => {{
            let b = measure("bare", load, EchoServiceClient::new(bare.clone()), args.payload).await;
            let s = measure($name, load, EchoServiceClient::new($svc), args.payload).await;
            println!(
                "| {} | {:.0} | {:.0} | {:.3} | {} |",
                $name,
                s.throughput(),
                b.throughput(),
                s.throughput() / b.throughput(),
                s.quantile_us(0.5) as i64 - b.quantile_us(0.5) as i64
            );
        }};
    }
    row!("trace", trace.layer(bare.clone()));
    // Two references: what the trace layer's headers cost without its span,
    // and what a bare `tracing` span (bridged to OpenTelemetry) costs without
    // its headers.
    row!(
        "(reference) a random traceparent + x-request-id, no span",
        tower::ServiceBuilder::new()
            .map_request(|mut r: Request<Body>| {
                let n: u128 = rand::random();
                let tp = format!("00-{n:032x}-{:016x}-01", n as u64);
                r.headers_mut().insert("traceparent", http::HeaderValue::from_str(&tp).unwrap());
                let mut v = http::HeaderValue::from_str(&format!("{:032x}", rand::random::<u128>())).unwrap();
                v.set_sensitive(true);
                r.headers_mut().insert("x-request-id", v);
                r
            })
            .service(bare.clone())
    );
    row!(
        "(reference) an info span with 3 fields, no headers",
        tower::ServiceBuilder::new()
            .map_future(|f| {
                let span = tracing::info_span!("grpc.client", otel.kind = "client", rpc.system = "grpc");
                tracing::Instrument::instrument(f, span)
            })
            .service(bare.clone())
    );
    row!("deadline", deadline.layer(bare.clone()));
    row!("retry", retry.layer(bare.clone()));
    row!("balance (+ breaker, attempt timeout)", balance.clone());
    row!("whole stack over the same connection", trace.layer(deadline.layer(retry.layer(balance.clone()))));
    row!("mesh_client::Channel (own connection)", stack_channel(addr, metrics));
    println!();
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let telemetry = Telemetry::init(&TelemetryConfig {
        service_name: "mesh-bench-client".into(),
        otlp_endpoint: None,
        log_filter: "info".into(),
        log_to_stdout: false,
        json_logs: false,
        ..TelemetryConfig::default()
    });
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = ClientMetrics::register(&mut registry);
    for setup in args.setups.iter().filter(|s| !s.is_empty()) {
        let (flavor, server) = setup.split_once('/').unwrap_or((setup, "plain"));
        let rt = match flavor {
            "multi" => tokio::runtime::Builder::new_multi_thread().enable_all().build()?,
            "current" => tokio::runtime::Builder::new_current_thread().enable_all().build()?,
            other => anyhow::bail!("unknown runtime {other:?}: multi or current"),
        };
        rt.block_on(end_to_end(&args, &metrics, flavor, server))?;
    }
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    if args.e2e_layer_secs > 0 {
        rt.block_on(e2e_layers(&args, &metrics))?;
    }
    if args.layer_calls > 0 {
        rt.block_on(per_layer(args.layer_calls, &metrics));
    }
    rt.block_on(telemetry.shutdown());
    Ok(())
}

//! `mesh-bench`: one load driver for any unary RPC of mesh's API, Envoy's RLS
//! API included (every service in `mesh_proto::FILE_DESCRIPTOR_SET`), against
//! any running server.
//!
//! The request is given as protobuf JSON (`--request`); `{key}` in it is
//! replaced by the call's key, `n mod --keys` (so `"u{key}"` spreads the
//! calls over `--keys` users). Every variant is encoded once before the run
//! and sent as pre-encoded bytes, so the driver's own CPU per call is the
//! same whatever the message. The answers are read as bytes; the first one
//! is decoded and printed, to show the call did what was meant (string
//! fields named like `token`, `secret` or `password` redacted).
//!
//! - Closed loop (`--concurrency N`): N callers back to back; or open loop
//!   (`--rate R`): R calls/s at fixed intervals whatever the answers do,
//!   latency counted from when each call was due (no coordinated omission),
//!   at most `--max-in-flight` at once (calls beyond are counted as
//!   `dropped`, never sent: the load generator, not the server, fell behind).
//!   Tokio's timer has a 1 ms resolution: at more than 1,000 calls/s the
//!   calls due within a millisecond go out together, and a latency includes
//!   up to about 1 ms of the timer's lateness. A server's CPU per call is
//!   higher at a low rate than at saturation (nothing to batch per wake-up).
//! - Warm-up, then a measured window: calls/s, p50/p90/p99/p99.9 latency
//!   (HdrHistogram, µs), errors by gRPC status code, the CPU time per call of
//!   every process on the machine (`/proc`), the peak RSS of the processes
//!   named by `--watch`.
//! - `--baseline`: the same shape against the plain tonic echo server in a
//!   process of its own (closed loop), with a payload of the request's size:
//!   what gRPC alone costs a server per call here.
//! - Output: Markdown on stdout; `--json <file>` writes the whole report as
//!   JSON (and `MESH_BENCH_JSON` gets its CPU row like every benchmark's).
//!
//! ```text
//! target/release/mesh-bench --target 127.0.0.1:50052 \
//!   --method envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit \
//!   --request '{"domain":"bench","descriptors":[{"entries":[{"key":"user_id","value":"u{key}"}]}]}' \
//!   --keys 10000 --concurrency 64 --duration 10 --watch mesh-ratelimit --baseline --json run.json
//! ```

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use bytes::{Buf as _, BufMut as _, Bytes};
use clap::Parser;
use mesh_bench::{EchoProcess, Load, PeakRss, Report, Tally, cpu, run_echo};
use prost_reflect::{DescriptorPool, DynamicMessage, MessageDescriptor};
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};

#[derive(Debug, Parser)]
#[command(
    name = "mesh-bench",
    about = "Load for any mesh RPC or Envoy RLS: closed loop or fixed rate, CPU per call, JSON out"
)]
struct Args {
    /// The server, host:port (loopback only in this repository's runs).
    #[arg(long, required_unless_present = "serve_echo")]
    target: Option<SocketAddr>,
    /// `package.Service/Method`, e.g. `mesh.ratelimit.v1.RateLimitService/Check`.
    #[arg(long, required_unless_present = "serve_echo")]
    method: Option<String>,
    /// The request as protobuf JSON; `{key}` becomes the call's key.
    #[arg(long, default_value = "{}")]
    request: String,
    /// Distinct keys `{key}` takes (0 to keys-1, round robin over calls).
    #[arg(long, default_value_t = 1)]
    keys: u64,
    /// Request metadata, `name=value` (repeatable), e.g. `authorization=Bearer …`.
    #[arg(long = "metadata", value_parser = key_value)]
    metadata: Vec<(String, String)>,
    /// Closed loop: callers issuing calls back to back.
    #[arg(long, default_value_t = 64, conflicts_with = "rate")]
    concurrency: usize,
    /// Open loop: calls per second at fixed intervals.
    #[arg(long)]
    rate: Option<f64>,
    /// Open loop: most calls in flight at once.
    #[arg(long, default_value_t = 10_000)]
    max_in_flight: usize,
    /// HTTP/2 connections the calls share.
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Measured seconds.
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Unmeasured warm-up seconds.
    #[arg(long, default_value_t = 2)]
    warmup: u64,
    /// Per-call deadline in ms (`grpc-timeout`); 0: none.
    #[arg(long, default_value_t = 0)]
    timeout_ms: u64,
    /// Processes (by name, as `/proc/<pid>/comm`) whose peak RSS to report.
    #[arg(long)]
    watch: Vec<String>,
    /// Also measure the plain tonic echo server (own process) with the same shape.
    #[arg(long)]
    baseline: bool,
    /// Write the report as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Serve the plain echo server (how `--baseline` runs it).
    #[arg(long, hide = true)]
    serve_echo: bool,
}

fn key_value(s: &str) -> Result<(String, String), String> {
    let (k, v) = s.split_once('=').ok_or_else(|| format!("expected NAME=VALUE, got {s:?}"))?;
    Ok((k.to_owned(), v.to_owned()))
}

/// Pre-encoded messages out, raw bytes in.
#[derive(Debug, Clone, Copy, Default)]
struct RawCodec;

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> Self::Encoder {
        *self
    }

    fn decoder(&mut self) -> Self::Decoder {
        *self
    }
}

impl Encoder for RawCodec {
    type Item = Bytes;
    type Error = tonic::Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Self::Error> {
        dst.put(item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = Bytes;
    type Error = tonic::Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Self::Error> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

/// The method to call: its path and its messages' descriptors.
struct Method {
    path: http::uri::PathAndQuery,
    input: MessageDescriptor,
    output: MessageDescriptor,
}

/// Every file of `mesh_proto::FILE_DESCRIPTOR_SET`, plus `status.proto`
/// (`google.rpc.Status`, which Envoy's ext_authz API imports), which the set
/// leaves to tonic-types (libs/proto/build.rs): declared here as that file
/// declares it.
fn descriptor_pool() -> anyhow::Result<DescriptorPool> {
    use prost_types::{
        DescriptorProto, FieldDescriptorProto, FileDescriptorProto, FileDescriptorSet,
        field_descriptor_proto::{Label, Type},
    };
    let mut set: FileDescriptorSet = prost::Message::decode(mesh_proto::FILE_DESCRIPTOR_SET)?;
    if !set.file.iter().any(|f| f.name() == "status.proto") {
        let field = |name: &str, number: i32, label: Label, kind: Type, type_name: Option<&str>| {
            FieldDescriptorProto {
                name: Some(name.into()),
                number: Some(number),
                label: Some(label as i32),
                r#type: Some(kind as i32),
                type_name: type_name.map(Into::into),
                json_name: Some(name.into()),
                ..FieldDescriptorProto::default()
            }
        };
        let status = FileDescriptorProto {
            name: Some("status.proto".into()),
            package: Some("google.rpc".into()),
            dependency: vec!["google/protobuf/any.proto".into()],
            message_type: vec![DescriptorProto {
                name: Some("Status".into()),
                field: vec![
                    field("code", 1, Label::Optional, Type::Int32, None),
                    field("message", 2, Label::Optional, Type::String, None),
                    field("details", 3, Label::Repeated, Type::Message, Some(".google.protobuf.Any")),
                ],
                ..DescriptorProto::default()
            }],
            syntax: Some("proto3".into()),
            ..FileDescriptorProto::default()
        };
        set.file.insert(0, status);
    }
    Ok(DescriptorPool::from_file_descriptor_set(set)?)
}

fn resolve(name: &str) -> anyhow::Result<Method> {
    let pool = descriptor_pool()?;
    let (service, method) = name.split_once('/').context("--method must be package.Service/Method")?;
    let service = pool.get_service_by_name(service).with_context(|| {
        let known: Vec<String> = pool.services().map(|s| s.full_name().to_owned()).collect();
        format!("no service {service}; known: {}", known.join(", "))
    })?;
    let m = service
        .methods()
        .find(|m| m.name() == method)
        .with_context(|| format!("{} has no method {method}", service.full_name()))?;
    if m.is_client_streaming() || m.is_server_streaming() {
        bail!("{name} streams; mesh-bench drives unary methods");
    }
    Ok(Method {
        path: format!("/{}/{}", service.full_name(), m.name()).parse()?,
        input: m.input(),
        output: m.output(),
    })
}

/// The request for every key, encoded.
fn encode_requests(method: &Method, template: &str, keys: u64) -> anyhow::Result<Vec<Bytes>> {
    if keys == 0 || keys > 1_000_000 {
        bail!("--keys must be 1 to 1,000,000");
    }
    let keyed = template.contains("{key}");
    (0..if keyed { keys } else { 1 })
        .map(|k| {
            let text = template.replace("{key}", &k.to_string());
            let mut de = serde_json::Deserializer::from_str(&text);
            let msg = DynamicMessage::deserialize(method.input.clone(), &mut de)
                .with_context(|| format!("--request is not a {} in JSON", method.input.full_name()))?;
            de.end()?;
            Ok(Bytes::from(prost::Message::encode_to_vec(&msg)))
        })
        .collect()
}

/// What one run measured.
struct Measured {
    report: Report,
    /// Open loop: calls not sent, `--max-in-flight` being reached.
    dropped: u64,
    /// The first successful answer.
    sample: Option<Bytes>,
}

/// A failed call's name in the counts: its gRPC status code (`Unavailable`).
fn code_name(s: &tonic::Status) -> String {
    format!("{:?}", s.code())
}

struct Caller {
    channels: Vec<tonic::transport::Channel>,
    path: http::uri::PathAndQuery,
    requests: Arc<Vec<Bytes>>,
    metadata: Arc<
        Vec<(
            tonic::metadata::MetadataKey<tonic::metadata::Ascii>,
            tonic::metadata::MetadataValue<tonic::metadata::Ascii>,
        )>,
    >,
    timeout: Option<Duration>,
    counter: Arc<AtomicU64>,
}

impl Caller {
    async fn call(&self, worker: usize) -> Result<Bytes, tonic::Status> {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let body = self.requests[(n % self.requests.len() as u64) as usize].clone();
        let mut request = tonic::Request::new(body);
        for (k, v) in self.metadata.iter() {
            request.metadata_mut().insert(k.clone(), v.clone());
        }
        if let Some(t) = self.timeout {
            request.set_timeout(t);
        }
        let mut grpc = tonic::client::Grpc::new(self.channels[worker % self.channels.len()].clone());
        grpc.ready().await.map_err(|e| tonic::Status::unavailable(e.to_string()))?;
        grpc.unary(request, self.path.clone(), RawCodec).await.map(tonic::Response::into_inner)
    }
}

async fn closed_loop(caller: Arc<Caller>, load: Load) -> Measured {
    let sample = Arc::new(std::sync::OnceLock::new());
    let first = sample.clone();
    let report = mesh_bench::run("mesh-bench", load, move |worker| {
        let (caller, first) = (caller.clone(), first.clone());
        async move {
            let body = caller.call(worker).await.map_err(|s| code_name(&s))?;
            let _ = first.set(body);
            Ok::<(), String>(())
        }
    })
    .await;
    Measured { report, dropped: 0, sample: sample.get().cloned() }
}

async fn open_loop(caller: Arc<Caller>, rate: f64, max_in_flight: usize, load: Load) -> Measured {
    let interval = Duration::from_secs_f64(1.0 / rate);
    let in_flight = Arc::new(tokio::sync::Semaphore::new(max_in_flight));
    // Each measured call's answer and when it was due; one collector tallies
    // them (a histogram per call would cost more than the call).
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(Result<Bytes, tonic::Status>, Instant)>();
    let collector = tokio::spawn(async move {
        let (mut tally, mut sample) = (Tally::default(), None);
        while let Some((r, due)) = rx.recv().await {
            let r = r.map(|body| {
                sample.get_or_insert(body);
            });
            tally.record(r.map_err(|s| code_name(&s)), due);
        }
        (tally, sample)
    });
    let first = Instant::now();
    let measure_from = first + load.warmup;
    let end = measure_from + load.duration;
    let (mut dropped, mut due, mut n) = (0u64, first, 0usize);
    let mut before = None;
    while due < end {
        tokio::time::sleep_until(due.into()).await;
        if before.is_none() && due >= measure_from {
            before = Some((cpu::Snapshot::take(), Instant::now()));
        }
        let measured = due >= measure_from;
        match in_flight.clone().try_acquire_owned() {
            Ok(permit) => {
                let (caller, tx) = (caller.clone(), tx.clone());
                let worker = n;
                tokio::spawn(async move {
                    let r = caller.call(worker).await;
                    drop(permit);
                    if measured {
                        let _ = tx.send((r, due));
                    }
                });
            }
            Err(_) if measured => dropped += 1,
            Err(_) => {}
        }
        n += 1;
        due += interval;
    }
    let (snapshot, started) = before.unwrap_or_else(|| (cpu::Snapshot::take(), Instant::now()));
    let elapsed = started.elapsed();
    let cpu = cpu::Usage::between(&snapshot, &cpu::Snapshot::take(), elapsed);
    drop(tx);
    // The calls still in flight finish (and are counted) before the collector ends.
    let (tally, sample) = collector.await.expect("collector panicked");
    let mut report = Report::new("mesh-bench", elapsed, cpu);
    report.add(tally);
    Measured { report, dropped, sample }
}

/// The processes named `comm` now.
fn pids_named(comm: &str) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == comm))
        .collect()
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.serve_echo {
        mesh_bench::serve_echo().await;
    }
    let (Some(target), Some(method_name)) = (args.target, args.method.as_deref()) else {
        bail!("--target and --method are required");
    };
    if !target.ip().is_loopback() {
        eprintln!("note: {target} is not a loopback address");
    }
    let method = resolve(method_name)?;
    let requests = encode_requests(&method, &args.request, args.keys)?;
    let metadata = args
        .metadata
        .iter()
        .map(|(k, v)| Ok((k.parse()?, v.parse()?)))
        .collect::<anyhow::Result<Vec<_>>>()
        .context("--metadata: not a valid ASCII header name or value")?;
    let load = Load {
        concurrency: args.concurrency,
        duration: Duration::from_secs(args.duration),
        warmup: Duration::from_secs(args.warmup),
    };
    let request_size = requests[0].len();
    let caller = Arc::new(Caller {
        channels: mesh_bench::channels(target, args.connections.max(1)).await,
        path: method.path.clone(),
        requests: Arc::new(requests),
        metadata: Arc::new(metadata),
        timeout: (args.timeout_ms > 0).then(|| Duration::from_millis(args.timeout_ms)),
        counter: Arc::new(AtomicU64::new(0)),
    });
    let watched: Vec<(String, u32)> =
        args.watch.iter().flat_map(|c| pids_named(c).into_iter().map(move |p| (c.clone(), p))).collect();
    for c in &args.watch {
        if !watched.iter().any(|(w, _)| w == c) {
            bail!("--watch {c}: no process of that name");
        }
    }
    let peaks: Vec<PeakRss> = watched.iter().map(|(_, pid)| PeakRss::start(*pid)).collect();
    let m = match args.rate {
        Some(rate) if rate > 0.0 => open_loop(caller, rate, args.max_in_flight.max(1), load).await,
        Some(rate) => bail!("--rate must be positive, got {rate}"),
        None => closed_loop(caller, load).await,
    };
    let mut rss = Vec::new();
    for ((comm, pid), peak) in watched.iter().zip(peaks) {
        rss.push((comm.clone(), *pid, peak.stop().await));
    }
    let baseline = if args.baseline {
        let echo = EchoProcess::start()?;
        let pid = echo.pid();
        let r = run_echo(
            "plain tonic echo (own process)",
            load,
            echo.addr,
            args.connections,
            vec![b'x'; request_size],
        )
        .await;
        Some((r.throughput(), r.quantile_us(0.99), r.us_per_call(r.cpu.seconds(|p| p.pid == pid))))
    } else {
        None
    };

    let secs = m.report.elapsed.as_secs_f64().max(1e-9);
    let q = |v: f64| m.report.latency_us.value_at_quantile(v);
    let shape = match args.rate {
        Some(r) => format!("open loop at {r} calls/s (at most {} in flight)", args.max_in_flight),
        None => format!("closed loop, {} callers", args.concurrency),
    };
    let sample = m.sample.as_ref().map(|b| match DynamicMessage::decode(method.output.clone(), b.clone()) {
        Ok(msg) => serde_json::to_value(&msg).map(|v| redact(v).to_string()).unwrap_or_default(),
        Err(e) => format!("(not a {}: {e})", method.output.full_name()),
    });
    let mut procs: Vec<&cpu::ProcUse> =
        m.report.cpu.procs.iter().filter(|p| p.seconds / secs > 0.01).collect();
    procs.sort_by(|a, b| b.seconds.total_cmp(&a.seconds));
    let per_call = |s: f64| s * 1e6 / m.report.ok.max(1) as f64;

    println!(
        "`{method_name}` on {target}, {shape}, {} HTTP/2 connections, {} key(s), request {request_size} bytes; warm-up {} s, measured {:.1} s.",
        args.connections,
        caller_keys(&args),
        args.warmup,
        secs
    );
    println!();
    println!(
        "| calls/s | p50 µs | p90 µs | p99 µs | p99.9 µs | ok | errors | dropped (generator behind) | machine busy |"
    );
    println!("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    let errors: u64 = m.report.errors_by.values().sum();
    println!(
        "| {:.0} | {} | {} | {} | {} | {} | {errors} | {} | {:.0} % |",
        m.report.ok as f64 / secs,
        q(0.5),
        q(0.9),
        q(0.99),
        q(0.999),
        m.report.ok,
        m.dropped,
        m.report.cpu.machine_busy * 100.0
    );
    if !m.report.errors_by.is_empty() {
        println!();
        println!(
            "Errors by status: {}",
            m.report.errors_by.iter().map(|(c, n)| format!("{c} {n}")).collect::<Vec<_>>().join(", ")
        );
        if let Some(e) = &m.report.error_latency_us {
            println!(
                "Failed calls took p50 {} µs, p99 {} µs, max {} µs (for shed calls: how fast overload is refused).",
                e.value_at_quantile(0.5),
                e.value_at_quantile(0.99),
                e.max()
            );
        }
    }
    println!();
    println!("CPU per successful call, by process (those above 1 % of a core):");
    println!();
    println!("| process | pid | µs per call | % of a core |");
    println!("| --- | ---: | ---: | ---: |");
    for p in &procs {
        let who = if p.pid == std::process::id() {
            "mesh-bench (load generator)".to_owned()
        } else {
            p.comm.clone()
        };
        println!("| {who} | {} | {:.1} | {:.0} |", p.pid, per_call(p.seconds), p.seconds / secs * 100.0);
    }
    println!("| **all** | | {:.1} | |", per_call(m.report.cpu.total()));
    if !rss.is_empty() {
        println!();
        println!(
            "Peak RSS: {}",
            rss.iter()
                .map(|(c, p, k)| format!("{c} ({p}) {:.1} MiB", *k as f64 / 1024.0))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    if let Some((tput, p99, server_us)) = baseline {
        println!();
        println!(
            "Baseline, the plain tonic echo server in its own process with a {request_size}-byte payload, {} callers: {tput:.0} calls/s, p99 {p99} µs, server CPU {server_us:.1} µs per call.",
            args.concurrency
        );
        for (comm, pid, _) in &rss {
            let s = m.report.cpu.seconds(|p| p.pid == *pid);
            println!(
                "- {comm} ({pid}): {:.1} µs per call = {:.2}× the echo server's",
                per_call(s),
                per_call(s) / server_us.max(1e-9)
            );
        }
    }
    if let Some(s) = &sample {
        println!();
        println!("First answer: `{s}`");
    }

    let report = serde_json::json!({
        "target": format!("{method_name} on {target}"),
        "shape": shape,
        "keys": caller_keys(&args),
        "request_bytes": request_size,
        "measured_seconds": secs,
        "calls_per_second": m.report.ok as f64 / secs,
        "ok": m.report.ok,
        "errors": m.report.errors_by,
        "error_latency_us": m.report.error_latency_us.as_ref().map(|e| serde_json::json!({"p50": e.value_at_quantile(0.5), "p99": e.value_at_quantile(0.99), "max": e.max()})),
        "dropped": m.dropped,
        "latency_us": { "p50": q(0.5), "p90": q(0.9), "p99": q(0.99), "p99.9": q(0.999), "max": m.report.latency_us.max() },
        "machine_busy": m.report.cpu.machine_busy,
        "cpu_us_per_call": procs.iter().map(|p| serde_json::json!({"comm": p.comm, "pid": p.pid, "us": per_call(p.seconds)})).collect::<Vec<_>>(),
        "cpu_us_per_call_total": per_call(m.report.cpu.total()),
        "peak_rss_kib": rss.iter().map(|(c, p, k)| serde_json::json!({"comm": c, "pid": p, "kib": k})).collect::<Vec<_>>(),
        "baseline_echo": baseline.map(|(t, p, s)| serde_json::json!({"calls_per_second": t, "p99_us": p, "server_cpu_us_per_call": s})),
        "first_answer": sample,
    });
    mesh_bench::record(&report);
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)? + "\n")
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// `v` with the value of every field whose name says it holds a secret
/// (`token`, `secret`, `password`, any case) replaced by `"<redacted>"`: the
/// first answer is printed and may be pasted into results.
fn redact(v: serde_json::Value) -> serde_json::Value {
    use serde_json::Value;
    match v {
        Value::Object(map) => Value::Object(
            map.into_iter()
                .map(|(k, v)| {
                    let lower = k.to_ascii_lowercase();
                    let secret = ["token", "secret", "password"].iter().any(|s| lower.contains(s));
                    let v = if secret && v.is_string() { Value::from("<redacted>") } else { redact(v) };
                    (k, v)
                })
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.into_iter().map(redact).collect()),
        other => other,
    }
}

fn caller_keys(args: &Args) -> u64 {
    if args.request.contains("{key}") { args.keys } else { 1 }
}

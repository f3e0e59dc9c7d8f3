//! Shared core of mesh's benchmark programs (`src/bin/*`): a closed-loop load
//! generator with N concurrent callers, latency histograms, the process RSS,
//! and the plain tonic echo server every benchmark compares against in the
//! same run. Results and the commands that made them live in `results/`.
//!
//! Benchmarks report ratios measured in one run (ours vs echo, vs
//! redis-benchmark, vs pgbench): absolute numbers drift on shared machines.

use std::{
    collections::BTreeMap,
    fmt,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use hdrhistogram::Histogram;

pub mod cpu;
pub mod pg;

/// How a load run is shaped.
#[derive(Debug, Clone, Copy)]
pub struct Load {
    /// Concurrent callers, each issuing calls back to back.
    pub concurrency: usize,
    /// Measured duration.
    pub duration: Duration,
    /// Unmeasured warm-up before it.
    pub warmup: Duration,
}

/// What a load run measured.
#[derive(Debug, Clone)]
pub struct Report {
    /// Label for the table.
    pub name: String,
    /// Successful calls in the measured window.
    pub ok: u64,
    /// Failed calls in the measured window.
    pub errors: u64,
    /// The first error seen, if any.
    pub first_error: Option<String>,
    /// Failed calls by their error's text (`mesh-bench`'s: the gRPC status
    /// code's name).
    pub errors_by: BTreeMap<String, u64>,
    /// Measured wall time.
    pub elapsed: Duration,
    /// Latency of successful calls, in microseconds.
    pub latency_us: Histogram<u64>,
    /// Latency of failed calls, in microseconds (`None`: none failed).
    pub error_latency_us: Option<Histogram<u64>>,
    /// CPU time of every process on the machine during the measured window.
    pub cpu: cpu::Usage,
}

/// A latency histogram of 1 µs to 60 s, 3 significant figures.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("bounds")
}

/// One caller's (or one collector's) counts in a measured window, added to
/// a [`Report`] with [`Report::add`].
#[derive(Debug)]
pub struct Tally {
    ok: u64,
    errors_by: BTreeMap<String, u64>,
    first_error: Option<String>,
    latency_us: Histogram<u64>,
    error_latency_us: Option<Histogram<u64>>,
}

impl Default for Tally {
    fn default() -> Self {
        Self {
            ok: 0,
            errors_by: BTreeMap::new(),
            first_error: None,
            latency_us: histogram(),
            error_latency_us: None,
        }
    }
}

impl Tally {
    /// Counts one call that started (or was due) at `started` and ended now.
    pub fn record<E: fmt::Display>(&mut self, result: Result<(), E>, started: Instant) {
        let us = started.elapsed().as_micros().max(1) as u64;
        match result {
            Ok(()) => {
                self.ok += 1;
                let _ = self.latency_us.record(us);
            }
            Err(e) => {
                let e = e.to_string();
                self.first_error.get_or_insert_with(|| e.clone());
                *self.errors_by.entry(e).or_default() += 1;
                let _ = self.error_latency_us.get_or_insert_with(histogram).record(us);
            }
        }
    }
}

impl Report {
    /// An empty report of a window `elapsed` long with its CPU use.
    pub fn new(name: &str, elapsed: Duration, cpu: cpu::Usage) -> Self {
        Self {
            name: name.to_owned(),
            ok: 0,
            errors: 0,
            first_error: None,
            errors_by: BTreeMap::new(),
            elapsed,
            latency_us: histogram(),
            error_latency_us: None,
            cpu,
        }
    }

    /// Adds one tally's calls.
    pub fn add(&mut self, t: Tally) {
        self.ok += t.ok;
        for (e, n) in t.errors_by {
            self.errors += n;
            *self.errors_by.entry(e).or_default() += n;
        }
        if self.first_error.is_none() {
            self.first_error = t.first_error;
        }
        self.latency_us.add(&t.latency_us).expect("same bounds");
        if let Some(h) = t.error_latency_us {
            self.error_latency_us.get_or_insert_with(histogram).add(&h).expect("same bounds");
        }
    }

    /// Successful calls per second.
    pub fn throughput(&self) -> f64 {
        self.ok as f64 / self.elapsed.as_secs_f64()
    }

    /// A latency quantile in microseconds.
    pub fn quantile_us(&self, q: f64) -> u64 {
        self.latency_us.value_at_quantile(q)
    }

    /// CPU microseconds per successful call from `seconds` of CPU time
    /// measured over the window (e.g. `report.cpu.named("redis-server")`).
    pub fn us_per_call(&self, seconds: f64) -> f64 {
        seconds * 1e6 / self.ok.max(1) as f64
    }

    /// A Markdown row of where the CPU went per call: name, how busy the
    /// machine was, the µs per call of each of `groups` (a label and the CPU
    /// seconds of a set of processes, the sets disjoint), everything else,
    /// and the total. The row also goes to [`record`] (JSON lines).
    pub fn cpu_row(&self, groups: &[(&str, f64)]) -> String {
        let total = self.cpu.total();
        let other = total - groups.iter().map(|(_, s)| s).sum::<f64>();
        let mut row = format!("| {} | {:.0} % |", self.name, self.cpu.machine_busy * 100.0);
        for seconds in groups.iter().map(|(_, s)| s).chain([&other, &total]) {
            row.push_str(&format!(" {:.0} |", self.us_per_call(*seconds)));
        }
        let cpu: serde_json::Map<String, serde_json::Value> = groups
            .iter()
            .map(|(label, s)| (*label, *s))
            .chain([("other", other), ("total", total)])
            .map(|(label, s)| (label.to_owned(), self.us_per_call(s).into()))
            .collect();
        record(&serde_json::json!({
            "target": self.name,
            "calls_per_second": self.throughput(),
            "ok": self.ok,
            "errors": self.errors,
            "latency_us": {
                "p50": self.quantile_us(0.50),
                "p90": self.quantile_us(0.90),
                "p99": self.quantile_us(0.99),
                "p99.9": self.quantile_us(0.999),
            },
            "machine_busy": self.cpu.machine_busy,
            "cpu_us_per_call": cpu,
        }));
        row
    }
}

/// The environment variable naming the JSON-lines file [`record`] appends to.
pub const JSON_ENV: &str = "MESH_BENCH_JSON";

/// Appends `value`, with `"program"` (this benchmark's file name) added, as
/// one line to the file `MESH_BENCH_JSON` names; nothing when it is unset.
/// `libs/bench/scripts/benchmarks.sh` collects every program's rows this way
/// and `target/release/capacity` reads them. A write error is printed to
/// stderr, never fatal (the Markdown output is the benchmark's result).
pub fn record(value: &serde_json::Value) {
    use std::io::Write as _;
    let Some(path) = std::env::var_os(JSON_ENV) else { return };
    let mut value = value.clone();
    if let Some(map) = value.as_object_mut() {
        let program = std::env::args()
            .next()
            .and_then(|a| std::path::Path::new(&a).file_name().map(|f| f.to_string_lossy().into_owned()))
            .unwrap_or_default();
        map.insert("program".to_owned(), program.into());
    }
    let line = format!("{value}\n");
    let written = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .and_then(|mut f| f.write_all(line.as_bytes()));
    if let Err(e) = written {
        eprintln!("cannot append to {JSON_ENV}={}: {e}", path.to_string_lossy());
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "| {} | {:.0} | {} | {} | {} | {} | {} |",
            self.name,
            self.throughput(),
            self.quantile_us(0.50),
            self.quantile_us(0.90),
            self.quantile_us(0.99),
            self.quantile_us(0.999),
            self.errors,
        )
    }
}

/// The Markdown header matching [`Report`]'s `Display`.
pub const TABLE_HEADER: &str = "| target | calls/s | p50 µs | p90 µs | p99 µs | p99.9 µs | errors |\n| --- | ---: | ---: | ---: | ---: | ---: | ---: |";

/// Runs `call(worker_index)` from `load.concurrency` tasks back to back for
/// warm-up + duration; measures only the duration.
pub async fn run<F, Fut, E>(name: &str, load: Load, call: F) -> Report
where
    F: Fn(usize) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<(), E>> + Send,
    E: fmt::Display,
{
    let measuring = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::with_capacity(load.concurrency);
    for worker in 0..load.concurrency {
        let call = call.clone();
        let (measuring, stop) = (measuring.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut tally = Tally::default();
            while !stop.load(Ordering::Relaxed) {
                let start = Instant::now();
                let result = call(worker).await;
                if measuring.load(Ordering::Relaxed) {
                    tally.record(result, start);
                }
            }
            tally
        }));
    }
    tokio::time::sleep(load.warmup).await;
    let cpu_before = cpu::Snapshot::take();
    measuring.store(true, Ordering::Relaxed);
    let started = Instant::now();
    tokio::time::sleep(load.duration).await;
    measuring.store(false, Ordering::Relaxed);
    let elapsed = started.elapsed();
    let cpu = cpu::Usage::between(&cpu_before, &cpu::Snapshot::take(), elapsed);
    stop.store(true, Ordering::Relaxed);

    let mut report = Report::new(name, elapsed, cpu);
    for t in tasks {
        report.add(t.await.expect("worker panicked"));
    }
    report
}

pub use mesh_testkit::rss_kib;

/// A service binary started by a benchmark, killed (and reaped) on drop.
#[derive(Debug)]
pub struct ChildService {
    /// The process.
    pub child: std::process::Child,
    /// Its gRPC address.
    pub addr: SocketAddr,
    /// Its metrics address.
    pub metrics: SocketAddr,
}

impl ChildService {
    /// Starts `cmd` with `MESH_LISTEN_ADDR` / `MESH_METRICS_ADDR` on fresh
    /// loopback ports and quiet stdio, and waits (up to 30 s) until its
    /// `readiness` is SERVING.
    pub async fn start(mut cmd: std::process::Command) -> anyhow::Result<Self> {
        use anyhow::Context as _;
        let (addr, metrics) = (mesh_testkit::free_addr(), mesh_testkit::free_addr());
        let child = cmd
            .env("MESH_LISTEN_ADDR", addr.to_string())
            .env("MESH_METRICS_ADDR", metrics.to_string())
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .spawn()
            .with_context(|| {
                format!("starting {} (build it with --release first)", cmd.get_program().to_string_lossy())
            })?;
        let service = Self { child, addr, metrics };
        let ch = mesh_testkit::channel(addr).await;
        mesh_testkit::wait_for_health(
            &ch,
            "readiness",
            tonic_health::pb::health_check_response::ServingStatus::Serving,
            Duration::from_secs(30),
        )
        .await?;
        Ok(service)
    }

    /// A sample of its metrics (0 when absent or unreachable).
    pub async fn metric(&self, name: &str, labels: &[&str]) -> f64 {
        let text = mesh_testkit::scrape_metrics(self.metrics).await.unwrap_or_default();
        mesh_testkit::grpc::metric_value(&text, name, labels).unwrap_or(0.0)
    }
}

impl Drop for ChildService {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Calls/s and a `p50 … ms, p99 … ms` summary from one row of
/// `redis-benchmark --csv` output: `"test","rps","avg_latency_ms",
/// "min_latency_ms","p50_latency_ms","p95_latency_ms","p99_latency_ms","max_latency_ms"`.
pub fn redis_benchmark_row(row: &str) -> anyhow::Result<(f64, String)> {
    use anyhow::Context as _;
    let fields: Vec<&str> = row.split(',').map(|f| f.trim_matches('"')).collect();
    let rps: f64 =
        fields.get(1).and_then(|f| f.parse().ok()).with_context(|| format!("cannot parse {row:?}"))?;
    let detail =
        format!("p50 {} ms, p99 {} ms", fields.get(4).unwrap_or(&"?"), fields.get(6).unwrap_or(&"?"));
    Ok((rps, detail))
}

/// Samples a process's RSS every 200 ms until [`PeakRss::stop`], which
/// returns the highest value seen (KiB).
#[derive(Debug)]
pub struct PeakRss {
    sampling: std::sync::Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<u64>,
}

impl PeakRss {
    /// Starts sampling `pid`.
    pub fn start(pid: u32) -> Self {
        use std::sync::atomic::{AtomicBool, Ordering};
        let sampling = std::sync::Arc::new(AtomicBool::new(true));
        let task = tokio::spawn({
            let sampling = sampling.clone();
            async move {
                let mut peak = 0;
                while sampling.load(Ordering::Relaxed) {
                    peak = peak.max(rss_kib(pid).unwrap_or(0));
                    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                }
                peak
            }
        });
        Self { sampling, task }
    }

    /// Stops sampling; the peak in KiB (0 if the process could not be read).
    pub async fn stop(self) -> u64 {
        self.sampling.store(false, std::sync::atomic::Ordering::Relaxed);
        self.task.await.unwrap_or(0)
    }
}

/// Starts the plain tonic echo server (no mesh runtime, no layers) on
/// 127.0.0.1:0 in this process: the baseline of every comparison.
pub async fn spawn_plain_echo() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let incoming = tokio_stream_listener(listener);
        let _ = tonic::transport::Server::builder()
            .add_service(mesh_testkit::echo::server())
            .serve_with_incoming(incoming)
            .await;
    });
    addr
}

fn tokio_stream_listener(
    listener: tokio::net::TcpListener,
) -> impl futures::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    futures::stream::unfold(listener, |l| async move {
        let r = l.accept().await.map(|(s, _)| {
            let _ = s.set_nodelay(true);
            s
        });
        Some((r, l))
    })
}

/// The calling program in `--serve-echo` mode, as a process of its own: the
/// plain tonic echo server where a service runs, across a process boundary
/// from the load generator, so that its CPU time per call is known apart
/// (the "server CPU per echo call" the services are compared with). The
/// program must answer `--serve-echo` with [`serve_echo`]. Killed on drop.
#[derive(Debug)]
pub struct EchoProcess {
    child: std::process::Child,
    /// Its gRPC address.
    pub addr: SocketAddr,
}

impl EchoProcess {
    /// Starts it and reads the address it prints.
    pub fn start() -> anyhow::Result<Self> {
        use std::io::BufRead as _;

        use anyhow::Context as _;
        let mut child = std::process::Command::new(std::env::current_exe()?)
            .arg("--serve-echo")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .context("starting the echo process")?;
        let mut line = String::new();
        let stdout = child.stdout.take().context("no stdout")?;
        std::io::BufReader::new(stdout).read_line(&mut line)?;
        let addr = line.trim().parse().with_context(|| format!("echo process said {line:?}"))?;
        Ok(Self { child, addr })
    }

    /// Its process id (for [`cpu::Usage::seconds`]).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for EchoProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The body of `--serve-echo`: serves the plain echo, prints its address
/// on one line of stdout, and never returns.
pub async fn serve_echo() -> ! {
    println!("{}", spawn_plain_echo().await);
    futures::future::pending().await
}

/// Runs the echo baseline: `load` against the echo server at `addr` over
/// `connections` HTTP/2 connections, each call carrying `payload` bytes
/// (sized like the request it is compared with).
pub async fn run_echo(
    name: &str,
    load: Load,
    addr: SocketAddr,
    connections: usize,
    payload: Vec<u8>,
) -> Report {
    use mesh_testkit::echo::{EchoRequest, EchoServiceClient};
    let chans = channels(addr, connections).await;
    run(name, load, move |worker| {
        let mut client = EchoServiceClient::new(chans[worker % chans.len()].clone());
        let payload = payload.clone();
        async move { client.echo(EchoRequest { payload, delay_ms: 0 }).await.map(|_| ()) }
    })
    .await
}

/// Channels to `addr`, one per `n` (HTTP/2 connections are the unit of
/// parallelism on the server side; callers share them round-robin).
pub async fn channels(addr: SocketAddr, n: usize) -> Vec<tonic::transport::Channel> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(mesh_testkit::channel(addr).await);
    }
    out
}

/// The rules file of the rate-limit benchmarks (domain `bench`), the limits
/// [`check_request`]'s descriptors meet: 10^8 a minute per `route=chat,
/// user_id`, 10^9 a minute per `endpoint`, so nothing is refused;
/// `{algorithm}` is replaced by [`check_rules_dir`].
const CHECK_RULES: &str = r#"
domain: bench
descriptors:
  - key: route
    value: chat
    descriptors:
      - key: user_id
        rate_limit: { unit: minute, requests_per_unit: 100000000, name: chat_per_user, algorithm: {algorithm} }
  - key: endpoint
    rate_limit: { unit: minute, requests_per_unit: 1000000000, name: endpoint_global, algorithm: {algorithm} }
"#;

/// A directory for `MESH_RATELIMIT_RULES` holding the rate-limit benchmarks'
/// rules ([`CHECK_RULES`]) with `algorithm` (`fixed_window`, `sliding_window`,
/// `token_bucket`); removed when dropped.
pub fn check_rules_dir(algorithm: &str) -> std::io::Result<tempfile::TempDir> {
    let dir = tempfile::tempdir()?;
    std::fs::write(dir.path().join("bench.yaml"), CHECK_RULES.replace("{algorithm}", algorithm))?;
    Ok(dir)
}

/// The Check of the rate-limit benchmarks' caller `n`, domain `bench`:
/// `[route=chat, user_id=u<n mod users>]`, plus `[endpoint=/v1/e<n mod 16>]`
/// (another hash slot) when `two_descriptors`.
pub fn check_request(n: u64, users: u64, two_descriptors: bool) -> mesh_proto::ratelimit::CheckRequest {
    use mesh_proto::ratelimit::{CheckRequest, Descriptor, Entry};
    let entry = |key: &str, value: String| Entry { key: key.into(), value };
    let mut descriptors = vec![Descriptor {
        entries: vec![entry("route", "chat".into()), entry("user_id", format!("u{}", n % users))],
        hits_addend: None,
    }];
    if two_descriptors {
        descriptors.push(Descriptor {
            entries: vec![entry("endpoint", format!("/v1/e{}", n % 16))],
            hits_addend: None,
        });
    }
    CheckRequest { domain: "bench".into(), descriptors, hits_addend: 0 }
}

/// A Check answer counts only if allowed and decided by Redis
/// (`x-mesh-ratelimit-decided-by: redis`); else why not.
pub fn decided_by_redis(
    answer: Result<tonic::Response<mesh_proto::ratelimit::CheckResponse>, tonic::Status>,
) -> Result<(), String> {
    let resp = answer.map_err(|s| format!("{:?}: {}", s.code(), s.message()))?;
    if resp.get_ref().overall_code() != mesh_proto::ratelimit::Code::Ok {
        return Err("over limit".to_owned());
    }
    redis_decided(resp.metadata())
}

/// Whether mesh-ratelimit's answer says Redis decided it
/// (`x-mesh-ratelimit-decided-by: redis`), for its own API and Envoy's alike;
/// else who did.
pub fn redis_decided(metadata: &tonic::metadata::MetadataMap) -> Result<(), String> {
    match metadata.get(mesh_ratelimit::DECIDED_BY).and_then(|v| v.to_str().ok()) {
        Some("redis") => Ok(()),
        other => Err(format!("decided by {other:?}, not redis")),
    }
}

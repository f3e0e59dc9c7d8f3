//! The local trace path end to end, as real processes: `mesh-trace sink`,
//! a service exporting to it, one call, then `mesh-trace --last` prints the
//! call's server span with its Redis child. And the local stack's scripts
//! that start, restart and describe it (`local_stack`).

mod local_stack;

use std::{
    io::BufRead as _,
    path::Path,
    process::{Child, Command, Stdio},
    time::Duration,
};

use mesh_proto::ratelimit::{
    CheckRequest, Descriptor, Entry, rate_limit_service_client::RateLimitServiceClient,
};
use mesh_testkit::{Infra, bin::service_binary, free_addr, redis_prefix};

const MESH_TRACE: &str = env!("CARGO_BIN_EXE_mesh-trace");

/// A sink on a free port; killed when dropped.
struct Sink {
    child: Child,
    endpoint: String,
}

impl Drop for Sink {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_sink(file: &Path) -> Sink {
    let mut child = Command::new(MESH_TRACE)
        .args(["sink", "--listen", "127.0.0.1:0", "--file"])
        .arg(file)
        .stdout(Stdio::piped())
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    // "listening on 127.0.0.1:PORT writing FILE"
    let addr = line.strip_prefix("listening on ").and_then(|l| l.split_whitespace().next()).expect(&line);
    Sink { child, endpoint: format!("http://{addr}") }
}

/// A service process; killed if the test ends without stopping it.
struct Service(Child);

impl Service {
    /// SIGTERM, then waits for the exit (the service flushes its spans).
    async fn stop(&mut self) {
        let _ = Command::new("kill").arg(self.0.id().to_string()).status();
        mesh_testkit::eventually(Duration::from_secs(20), "the service exited", || {
            let exited = self.0.try_wait().unwrap().is_some();
            async move { exited.then_some(()) }
        })
        .await;
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn mesh_trace(file: &Path, args: &[&str]) -> (bool, String) {
    let out = Command::new(MESH_TRACE).args(args).env("MESH_TRACE_FILE", file).output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

/// mesh-ratelimit on a free port with rules for domain `trace`, `env`
/// added, stdout to `<dir>/ratelimit.log`; one Check of domain `trace`
/// (which goes to Redis) made once it serves.
async fn start_ratelimit(dir: &Path, env: &[(&str, &str)]) -> (Service, std::path::PathBuf) {
    let rules = dir.join("rules.yaml");
    std::fs::write(
        &rules,
        "domain: trace\ndescriptors:\n  - key: user\n    rate_limit: { unit: minute, requests_per_unit: 100 }\n",
    )
    .unwrap();
    let addr = free_addr();
    let infra = Infra::shared();
    let log = dir.join("ratelimit.log");
    let service = Service(
        Command::new(service_binary("mesh-ratelimit").unwrap())
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap())
            .env("MESH_LISTEN_ADDR", addr.to_string())
            .env("MESH_METRICS_ADDR", free_addr().to_string())
            .env("MESH_REDIS_URLS", infra.redis_urls().join(","))
            .env("MESH_REDIS_KEY_PREFIX", redis_prefix())
            .env("MESH_RATELIMIT_RULES", &rules)
            .env("OTEL_BSP_SCHEDULE_DELAY", "100")
            .envs(env.iter().copied())
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(Stdio::null())
            .stdin(Stdio::null())
            .spawn()
            .unwrap(),
    );
    mesh_testkit::conformance::assert_serving(
        addr,
        &["mesh.ratelimit.v1.RateLimitService"],
        Duration::from_secs(30),
    )
    .await
    .unwrap();
    let mut client = RateLimitServiceClient::new(mesh_testkit::channel(addr).await);
    let descriptor =
        Descriptor { entries: vec![Entry { key: "user".into(), value: "u-1".into() }], hits_addend: None };
    client
        .check(CheckRequest { domain: "trace".into(), descriptors: vec![descriptor], hits_addend: 0 })
        .await
        .unwrap();
    (service, log)
}

#[tokio::test]
async fn the_console_exporter_prints_each_span_in_the_services_log() {
    let dir = tempfile::tempdir().unwrap();
    let (mut service, log) = start_ratelimit(dir.path(), &[("OTEL_TRACES_EXPORTER", "console")]).await;
    service.stop().await;
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(logged.contains("traces=printed to stdout (console)"), "{logged}");
    let server = logged
        .lines()
        .find(|l| l.starts_with("span \"mesh.ratelimit.v1.RateLimitService/Check\""))
        .unwrap_or_else(|| panic!("{logged}"));
    assert!(server.contains("kind=Server") && server.contains("duration_ms="), "{server}");
    let trace_id = server.split("trace_id=").nth(1).unwrap().split(' ').next().unwrap();
    let redis = logged
        .lines()
        .find(|l| l.starts_with("span \"EVALSHA ratelimit_check\""))
        .unwrap_or_else(|| panic!("{logged}"));
    assert!(redis.contains(&format!("trace_id={trace_id}")), "one trace: {redis}");
}

#[tokio::test]
async fn a_call_to_a_service_exporting_to_the_sink_prints_as_a_tree_with_its_redis_span() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("traces.jsonl");
    let sink = start_sink(&file);
    let (ok, out) = mesh_trace(&file, &["--last"]);
    assert!(!ok && out.contains("holds no spans yet"), "{out}");

    let (mut service, log) =
        start_ratelimit(dir.path(), &[("OTEL_EXPORTER_OTLP_ENDPOINT", &sink.endpoint)]).await;

    // The batch exporter sends within ~100 ms; a health check may also be
    // traced, so wait for the trace that has the Check in it.
    let tree =
        mesh_testkit::eventually(Duration::from_secs(20), "the Check's trace in the sink's file", || {
            let file = file.clone();
            async move {
                let (ok, out) = mesh_trace(&file, &["--list"]);
                let id = out
                    .lines()
                    .find(|l| ok && l.contains("RateLimitService/Check"))?
                    .split_whitespace()
                    .next()?
                    .to_owned();
                let (ok, tree) = mesh_trace(&file, &[&id]);
                (ok && tree.contains("EVALSHA ratelimit_check")).then_some(tree)
            }
        })
        .await;
    service.stop().await;
    // The service said at start where its spans go.
    let logged = std::fs::read_to_string(&log).unwrap();
    let said = logged.lines().find(|l| l.contains("telemetry ready")).unwrap_or_else(|| panic!("{logged}"));
    assert!(
        said.contains(&format!("traces=otlp/grpc to {}, sampler parentbased_always_on", sink.endpoint)),
        "{said}"
    );

    println!("{tree}");
    let lines: Vec<&str> = tree.lines().collect();
    assert!(lines[0].starts_with("trace ") && lines[0].contains(" spans "), "{tree}");
    let server = lines
        .iter()
        .position(|l| l.contains("RateLimitService/Check") && l.contains("[mesh-ratelimit server]"))
        .unwrap_or_else(|| panic!("no server span:\n{tree}"));
    let redis = lines
        .iter()
        .position(|l| l.contains("EVALSHA ratelimit_check") && l.contains("[mesh-ratelimit client]"))
        .unwrap_or_else(|| panic!("no redis span:\n{tree}"));
    assert!(redis > server, "{tree}");
    // The Redis span is drawn below the server span, one level deeper.
    let depth = |l: &str| l.find(|c: char| c.is_alphanumeric()).unwrap();
    assert!(depth(lines[redis]) > depth(lines[server]), "{tree}");
    assert!(lines[redis].contains("─ "), "{tree}");
    for l in [lines[server], lines[redis]] {
        assert!(l.contains(" ms  +"), "a duration and an offset: {l}");
    }

    // --last finds the newest trace; an unknown id is exit 1 with a reason.
    let (ok, _) = mesh_trace(&file, &["--last"]);
    assert!(ok);
    let (ok, out) = mesh_trace(&file, &["--wait", "0.3", &"0".repeat(32)]);
    assert!(!ok && out.contains("no span of trace"), "{out}");
}

#[test]
fn an_unknown_traces_exporter_or_sampler_stops_the_service_at_start_with_the_reason() {
    let binary = service_binary("mesh-ratelimit").unwrap();
    for (key, value, reason) in [
        (
            "OTEL_TRACES_EXPORTER",
            "jaeger",
            "OTEL_TRACES_EXPORTER: expected otlp, console or none, got \"jaeger\"",
        ),
        ("OTEL_TRACES_SAMPLER", "sometimes", "OTEL_TRACES_SAMPLER: expected always_on"),
    ] {
        let out = Command::new(&binary)
            .env_clear()
            .env("MESH_LISTEN_ADDR", free_addr().to_string())
            .env("MESH_REDIS_URLS", "127.0.0.1:1")
            .env(key, value)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{stderr}");
        assert!(stderr.contains(reason), "{stderr}");
    }
}

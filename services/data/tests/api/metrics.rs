//! Every service's `/metrics`, scraped as Prometheus does: strict
//! OpenMetrics by default, the classic text format when the scraper asks for
//! it (`Accept: text/plain; version=0.0.4`) and clean under `promtool check
//! metrics`, and, on a fresh service, every family its README names.
//!
//! The four services run here (the data service's test binary already runs
//! the whole mesh).

use std::{
    collections::BTreeSet,
    io::Write as _,
    net::SocketAddr,
    path::PathBuf,
    process::{Command, Stdio},
};

use mesh_testkit::{Infra, TestDb, repo_root};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::helpers::{Mesh, OPEN_RULES, spawn_app};

const PROMETHEUS_ACCEPT: &str = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
const CLASSIC_ACCEPT: &str = "text/plain; version=0.0.4";

/// GETs `/metrics` with `accept` (none: no header); the content type and body.
async fn scrape(addr: SocketAddr, accept: Option<&str>) -> (String, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let accept = accept.map(|a| format!("Accept: {a}\r\n")).unwrap_or_default();
    s.write_all(format!("GET /metrics HTTP/1.0\r\nHost: {addr}\r\n{accept}\r\n").as_bytes()).await.unwrap();
    let mut buf = String::new();
    s.read_to_string(&mut buf).await.unwrap();
    let (head, body) = buf.split_once("\r\n\r\n").expect("an http body");
    assert!(head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200"), "{head}");
    let content_type = head
        .lines()
        .find_map(|l| l.split_once(':').filter(|(k, _)| k.eq_ignore_ascii_case("content-type")))
        .map(|(_, v)| v.trim().to_owned())
        .expect("a content type");
    (content_type, body.to_owned())
}

/// Runs `program args` with `input` on stdin; its exit status and output.
fn run(program: &PathBuf, args: &[&str], input: &str) -> (bool, String) {
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{}: {e}", program.display()));
    child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

/// The tools (`promtool`, the venv's Python with prometheus-client),
/// installed by `deploy/local/tools.sh` when missing.
fn tools() -> (PathBuf, PathBuf) {
    let python = repo_root().join(".local/tools/venv/bin/python");
    let has = |p: &str, a: &[&str]| Command::new(p).args(a).output().is_ok_and(|o| o.status.success());
    if !has("promtool", &["--version"])
        || !has(python.to_str().unwrap(), &["-c", "import prometheus_client.openmetrics.parser"])
    {
        let out = Command::new("bash").arg(repo_root().join("deploy/local/tools.sh")).output().unwrap();
        assert!(out.status.success(), "tools.sh failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    (PathBuf::from("promtool"), python)
}

/// Fails unless `text` parses as OpenMetrics under prometheus-client's strict
/// parser (Python), which refuses a missing `# EOF`, a counter sample
/// without `_total`, a bad name or label, and more.
fn assert_strict_openmetrics(python: &PathBuf, service: &str, text: &str) {
    let script = "import sys\nfrom prometheus_client.openmetrics.parser import text_string_to_metric_families\nfams = list(text_string_to_metric_families(sys.stdin.read()))\nprint(len(fams))";
    let (ok, out) = run(python, &["-c", script], text);
    assert!(ok, "{service}: OpenMetrics rendering refused by the strict parser: {out}\n{text}");
}

/// Family names the README's `## Metrics` section names (backticked, with
/// labels stripped; `*` patterns left out).
fn readme_families(service: &str) -> BTreeSet<String> {
    let readme = std::fs::read_to_string(repo_root().join(format!("services/{service}/README.md"))).unwrap();
    let section = readme
        .split("\n## ")
        .find(|s| s.starts_with("Metrics"))
        .unwrap_or_else(|| panic!("services/{service}/README.md has no ## Metrics section"));
    section
        .split('`')
        .skip(1)
        .step_by(2)
        .map(|t| t.split('{').next().unwrap_or(t))
        .filter(|t| {
            ["mesh_", "grpc_server_", "grpc_client_", "db_client_", "process_"]
                .iter()
                .any(|p| t.starts_with(p))
                && !t.contains('*')
                && t.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        })
        .map(str::to_owned)
        .collect()
}

/// Families with at least one sample in a classic rendering.
fn classic_families(text: &str) -> BTreeSet<String> {
    let typed: Vec<&str> =
        text.lines().filter_map(|l| l.strip_prefix("# TYPE ")?.split(' ').next()).collect();
    let samples: BTreeSet<&str> =
        text.lines().filter(|l| !l.starts_with('#')).filter_map(|l| l.split(['{', ' ']).next()).collect();
    typed
        .into_iter()
        .filter(|f| {
            ["", "_bucket", "_count", "_sum"].iter().any(|s| samples.contains(format!("{f}{s}").as_str()))
        })
        .map(str::to_owned)
        .collect()
}

#[tokio::test]
async fn every_service_serves_strict_openmetrics_by_default_and_promtool_clean_classic_text_on_request() {
    let _t = mesh_testkit::init_telemetry();
    let (promtool, python) = tools();
    let mesh = Mesh::start(OPEN_RULES).await;
    let db = TestDb::new(Infra::shared()).await.unwrap();
    let data = spawn_app(mesh.config(&db)).await;
    let services = [
        ("session", mesh.session.metrics_addr),
        ("ratelimit", mesh.ratelimit.metrics_addr),
        ("audit", mesh.audit.metrics_addr),
        ("data", data.metrics_addr),
    ];
    for (service, addr) in services {
        for accept in [None, Some("*/*"), Some(PROMETHEUS_ACCEPT)] {
            let (content_type, body) = scrape(addr, accept).await;
            assert!(
                content_type.starts_with("application/openmetrics-text; version=1.0.0"),
                "{service} with Accept {accept:?}: {content_type}"
            );
            assert!(body.ends_with("# EOF\n"), "{service}: no # EOF");
            assert_strict_openmetrics(&python, service, &body);
        }

        let (content_type, classic) = scrape(addr, Some(CLASSIC_ACCEPT)).await;
        assert_eq!(content_type, "text/plain; version=0.0.4; charset=utf-8", "{service}");
        assert!(
            !classic.contains("# EOF") && !classic.contains("# UNIT"),
            "{service}: OpenMetrics-only lines"
        );
        let (ok, lint) = run(&promtool, &["check", "metrics"], &classic);
        assert!(
            ok && lint.trim().is_empty(),
            "{service}: promtool check metrics:\n{lint}\n--- rendering:\n{classic}"
        );
        for required in [
            "process_cpu_seconds_total",
            "process_resident_memory_bytes",
            "process_open_fds",
            "mesh_build_info",
            "grpc_server_started_total",
        ] {
            assert!(classic_families(&classic).contains(required), "{service}: no {required}");
        }
        assert!(
            classic.lines().any(|l| l.starts_with("grpc_server_handled_total{grpc_type=\"unary\"")),
            "{service}: grpc_server_handled_total has no grpc_type"
        );
        for line in classic.lines().filter(|l| l.starts_with("# TYPE ")) {
            assert!(!line.contains("_total_total"), "{service}: {line}");
        }
    }
    data.stop().await.unwrap();
}

#[tokio::test]
async fn a_fresh_service_exposes_every_family_its_readme_names() {
    let _t = mesh_testkit::init_telemetry();
    let mesh = Mesh::start(OPEN_RULES).await;
    let db = TestDb::new(Infra::shared()).await.unwrap();
    let data = spawn_app(mesh.config(&db)).await;
    let mut missing = Vec::new();
    for (service, addr) in [
        ("session", mesh.session.metrics_addr),
        ("ratelimit", mesh.ratelimit.metrics_addr),
        ("audit", mesh.audit.metrics_addr),
        ("data", data.metrics_addr),
    ] {
        let documented = readme_families(service);
        assert!(documented.len() >= 5, "{service}: README names only {documented:?}");
        let (_, classic) = scrape(addr, Some(CLASSIC_ACCEPT)).await;
        let exposed = classic_families(&classic);
        missing.extend(documented.difference(&exposed).map(|f| format!("{service}: {f}")));
    }
    assert!(missing.is_empty(), "documented but absent from a fresh /metrics:\n{}", missing.join("\n"));
    data.stop().await.unwrap();
}

const MONITORING: &str = "deploy/k8s/base/monitoring";

/// The PrometheusRule's `spec` (a plain Prometheus rules file): the lines
/// under `spec:`, two spaces less indented.
fn rules_file(prometheus_rule: &str) -> String {
    let (_, spec) = prometheus_rule.split_once("\nspec:\n").expect("a PrometheusRule with a spec");
    spec.lines().map(|l| l.strip_prefix("  ").unwrap_or(l)).collect::<Vec<_>>().join("\n") + "\n"
}

#[test]
fn alert_rules_pass_promtool_unit_tests() {
    let (promtool, _) = tools();
    let dir = tempfile::tempdir().unwrap();
    let rule = std::fs::read_to_string(repo_root().join(MONITORING).join("prometheusrule.yaml")).unwrap();
    std::fs::write(dir.path().join("rules.yaml"), rules_file(&rule)).unwrap();
    std::fs::copy(repo_root().join(MONITORING).join("rules_test.yaml"), dir.path().join("rules_test.yaml"))
        .unwrap();
    for args in [["check", "rules", "rules.yaml"], ["test", "rules", "rules_test.yaml"]] {
        let out = Command::new(&promtool).args(args).current_dir(dir.path()).output().unwrap();
        let text =
            format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "promtool {}:\n{text}", args.join(" "));
    }
}

/// Metric names in PromQL text: identifiers of the mesh's families.
fn promql_metrics(text: &str) -> BTreeSet<String> {
    text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|t| {
            ["mesh_", "grpc_server_", "grpc_client_", "db_client_", "process_"]
                .iter()
                .any(|p| t.starts_with(p))
        })
        .map(|t| t.strip_suffix("_bucket").unwrap_or(t).to_owned())
        .collect()
}

#[tokio::test]
async fn alerts_and_dashboard_name_only_metrics_the_services_expose() {
    let _t = mesh_testkit::init_telemetry();
    let mesh = Mesh::start(OPEN_RULES).await;
    let db = TestDb::new(Infra::shared()).await.unwrap();
    let data = spawn_app(mesh.config(&db)).await;
    let (mut exposed, mut labels) = (BTreeSet::new(), BTreeSet::new());
    for addr in
        [mesh.session.metrics_addr, mesh.ratelimit.metrics_addr, mesh.audit.metrics_addr, data.metrics_addr]
    {
        let text = scrape(addr, Some(CLASSIC_ACCEPT)).await.1;
        exposed.extend(classic_families(&text));
        // Label names (PromQL names them too, in `by (...)` and selectors).
        for (_, set) in text.lines().filter(|l| !l.starts_with('#')).filter_map(|l| l.split_once('{')) {
            labels.extend(set.split(',').filter_map(|kv| kv.split_once('=')).map(|(k, _)| k.to_owned()));
        }
    }
    for file in ["prometheusrule.yaml", "mesh-dashboard.json"] {
        let text = std::fs::read_to_string(repo_root().join(MONITORING).join(file)).unwrap();
        let named: BTreeSet<String> = promql_metrics(&text).difference(&labels).cloned().collect();
        assert!(named.len() >= 8, "{file}: {named:?}");
        let unknown: Vec<_> = named.difference(&exposed).collect();
        assert!(unknown.is_empty(), "{file} names metrics no service exposes: {unknown:?}");
    }
    data.stop().await.unwrap();
}

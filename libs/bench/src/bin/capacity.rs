//! The capacity model, computed from one benchmark run: cores of mesh,
//! Redis and PostgreSQL for 100, 10,000 and 1,000,000 concurrent users at
//! the seed rules' per-user rates, from the CPU per call the other
//! benchmark programs measured and wrote as JSON lines (`MESH_BENCH_JSON`,
//! `mesh_bench::record`). `libs/bench/scripts/benchmarks.sh` runs it last
//! and puts its output in `BENCHMARKS.md`.
//!
//! Inputs (program / target / CPU groups, µs per call):
//! - `session` / `ext_authz Check (cache)`: service, Redis;
//! - `ratelimit` / `Check, 2 descriptors (2 slots)`: service, Redis;
//! - `data` / `Get, N callers` (N > 1): data, session, ratelimit, audit,
//!   Redis, PostgreSQL (queries, WAL, upkeep).
//!
//! The per-user rate is what the seed rules allow a user on the chat and
//! search routes (`deploy/k8s/base/ratelimit-rules/rules.yaml`, read at run
//! time): a user at both limits, the worst case the limits let through.
//!
//! ```text
//! MESH_BENCH_JSON=target/benchmarks/results.jsonl target/release/ratelimit …   # and session, data
//! target/release/capacity --input target/benchmarks/results.jsonl
//! ```

use std::path::PathBuf;

use anyhow::{Context as _, bail};
use clap::Parser;
use serde_json::Value;

#[derive(Debug, Parser)]
#[command(about = "Cores of mesh, Redis and PostgreSQL per number of users, from a run's CPU per call")]
struct Args {
    /// The JSON lines the benchmark programs wrote (`MESH_BENCH_JSON`).
    #[arg(long, default_value = "target/benchmarks/results.jsonl")]
    input: PathBuf,
    /// The seed rules the per-user rates come from.
    #[arg(long, default_value = "deploy/k8s/base/ratelimit-rules/rules.yaml")]
    rules: PathBuf,
}

/// The seed's per-minute limit of the rule named `name` (`{ unit: minute,
/// requests_per_unit: N, name: <name> }` on one line, as the seed writes it).
fn per_minute(rules: &str, name: &str) -> anyhow::Result<f64> {
    let line = rules
        .lines()
        .find(|l| l.contains(&format!("name: {name} ")) || l.contains(&format!("name: {name},")))
        .with_context(|| format!("no rule named {name} in the seed rules"))?;
    if !line.contains("unit: minute") {
        bail!("rule {name} is not per minute: {line:?}");
    }
    let n = line
        .split("requests_per_unit:")
        .nth(1)
        .and_then(|r| r.split([',', '}']).next())
        .and_then(|n| n.trim().parse::<f64>().ok())
        .with_context(|| format!("no requests_per_unit in {line:?}"))?;
    Ok(n)
}

/// The last row of `program` whose target `matches`.
fn row<'a>(rows: &'a [Value], program: &str, matches: impl Fn(&str) -> bool) -> anyhow::Result<&'a Value> {
    rows.iter()
        .rev()
        .find(|r| r["program"] == program && r["target"].as_str().is_some_and(&matches))
        .with_context(|| format!("no matching row of {program} in the input (did it run?)"))
}

fn cpu(r: &Value, group: &str) -> anyhow::Result<f64> {
    r["cpu_us_per_call"][group]
        .as_f64()
        .with_context(|| format!("row {} has no CPU group {group:?}", r["target"]))
}

fn cores(rps: f64, us: f64) -> f64 {
    rps * us / 1e6
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let text = std::fs::read_to_string(&args.input).with_context(|| {
        format!("reading {} (run the benchmarks with MESH_BENCH_JSON)", args.input.display())
    })?;
    let rows: Vec<Value> =
        text.lines().filter(|l| !l.trim().is_empty()).map(serde_json::from_str).collect::<Result<_, _>>()?;
    let seed =
        std::fs::read_to_string(&args.rules).with_context(|| format!("reading {}", args.rules.display()))?;
    let (chat, search) = (per_minute(&seed, "chat_per_user")?, per_minute(&seed, "search_per_user")?);
    let per_user = (chat + search) / 60.0;

    let authz = row(&rows, "session", |t| t == "ext_authz Check (cache)")?;
    let rl = row(&rows, "ratelimit", |t| t == "Check, 2 descriptors (2 slots)")?;
    let get = row(&rows, "data", |t| {
        t.strip_prefix("Get, ").and_then(|t| t.strip_suffix(" callers")).is_some_and(|n| n != "1")
    })?;
    let edge_mesh = cpu(authz, "service")? + cpu(rl, "service")?;
    let edge_redis = cpu(authz, "Redis")? + cpu(rl, "Redis")?;
    let get_mesh =
        ["data", "session", "ratelimit", "audit"].iter().map(|g| cpu(get, g)).sum::<anyhow::Result<f64>>()?;
    let get_redis = cpu(get, "Redis")?;
    let get_pg = ["PostgreSQL queries", "PostgreSQL WAL", "PostgreSQL upkeep"]
        .iter()
        .map(|g| cpu(get, g))
        .sum::<anyhow::Result<f64>>()?;

    println!(
        "Computed by [`libs/bench/src/bin/capacity.rs`](libs/bench/src/bin/capacity.rs) from the CPU per \
         call measured above, in this run. CPU per call on a machine whose two cores are shared by the load \
         generator, the services and the datastores (with steal time) is an upper bound: a dedicated core does \
         the same work in less."
    );
    println!();
    println!(
        "**Load.** The seed rules (`{}`) allow a user {chat} chat and {search} search calls a minute: a user at \
         both limits sends {per_user:.2} requests/s, and the model assumes every concurrent user does (more is \
         refused at the edge for the cost of the same checks).",
        args.rules.display()
    );
    println!();
    println!(
        "**Per request at the edge** (Envoy in front of the application, `deploy/envoy`): one ext_authz Check \
         to session (validation cache) and one rate-limit call with 2 descriptors on 2 slots (the user's route \
         limit and a global one). **Per request through the data service** (the mesh's main path, a Get: \
         session, rate-limit, a replica read, audit):"
    );
    println!();
    println!(
        "| per request | mesh services µs | Redis µs (all nodes) | PostgreSQL µs (primary + replica) | measured as |"
    );
    println!("| --- | ---: | ---: | ---: | --- |");
    println!(
        "| ext_authz Check (cache) | {:.0} | {:.0} | 0 | session / `{}` |",
        cpu(authz, "service")?,
        cpu(authz, "Redis")?,
        authz["target"].as_str().unwrap_or_default()
    );
    println!(
        "| rate-limit, 2 descriptors | {:.0} | {:.0} | 0 | ratelimit / `{}` |",
        cpu(rl, "service")?,
        cpu(rl, "Redis")?,
        rl["target"].as_str().unwrap_or_default()
    );
    println!("| **edge total** | **{edge_mesh:.0}** | **{edge_redis:.0}** | 0 | |");
    println!(
        "| data Get (data {:.0}, session {:.0}, ratelimit {:.0}, audit {:.0}) | {get_mesh:.0} | {get_redis:.0} | {get_pg:.0} | data / `{}` |",
        cpu(get, "data")?,
        cpu(get, "session")?,
        cpu(get, "ratelimit")?,
        cpu(get, "audit")?,
        get["target"].as_str().unwrap_or_default()
    );
    println!();
    println!(
        "Cores needed = requests/s × CPU per request (before headroom and a second instance of everything for availability):"
    );
    println!();
    println!(
        "| concurrent users | requests/s | edge only: mesh / Redis cores | every request a data Get: mesh / Redis / PostgreSQL cores |"
    );
    println!("| ---: | ---: | ---: | ---: |");
    for users in [100.0, 10_000.0, 1_000_000.0] {
        let rps = users * per_user;
        println!(
            "| {} | {} | {} / {} | {} / {} / {} |",
            thousands(users),
            thousands(rps.round()),
            fmt_cores(cores(rps, edge_mesh)),
            fmt_cores(cores(rps, edge_redis)),
            fmt_cores(cores(rps, get_mesh)),
            fmt_cores(cores(rps, get_redis)),
            fmt_cores(cores(rps, get_pg)),
        );
    }
    println!();
    println!(
        "Reading it: at 100 users everything idles (two instances of each service for availability are the \
         cost). Mesh cores are instances behind the client balancer (`scaling` above). A Redis master runs its \
         scripts on one core, so Redis cores are masters (each with a replica), and PostgreSQL beyond one \
         primary's few cores must be sharded or read from more replicas. CPU only: network (≈ 1–2 KB per call on the wire at the \
         edge), memory (a session ≈ 1 KB in Redis) and connection counts (every instance holds a pool to every \
         master) are not in it."
    );
    Ok(())
}

/// Cores to two significant-ish figures: `0.04`, `3.8`, `375`.
fn fmt_cores(c: f64) -> String {
    if c < 1.0 {
        format!("{c:.2}")
    } else if c < 100.0 {
        format!("{c:.1}")
    } else {
        thousands(c.round())
    }
}

/// `1234567` → `1,234,567`.
fn thousands(v: f64) -> String {
    let digits = format!("{v:.0}");
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

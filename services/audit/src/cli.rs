//! The command line: no subcommand serves; `verify`, `export` and
//! `retention` work offline against a database URL (or, for `verify
//! --file`, an export).
//!
//! Exit codes: 0 done (or the chain is intact), 1 the chain is broken or
//! an event is invalid (a row or line that does not decode, named by its
//! sequence in `first_bad_sequence` and `problem`) or, with
//! `--checkpoints`, a checkpoint is bad or the database no longer matches
//! one (named in `checkpoint`), 2 usage or connection errors. Database URLs
//! may carry passwords and are never printed; keys are never printed.

use std::{
    io::{BufRead as _, Write as _},
    path::PathBuf,
    process::ExitCode,
    str::FromStr,
};

use chrono::{DateTime, Datelike as _, Months, NaiveDate, TimeZone as _, Utc};
use clap::{Args, Parser, Subcommand, ValueEnum};
use secrecy::{ExposeSecret as _, SecretString};
use serde_json::json;
use sqlx::{
    PgPool,
    postgres::{PgConnectOptions, PgPoolOptions},
};

use crate::{
    chain::{GENESIS, Hash, Outcome},
    checkpoint::{self, Finding, SignerKey, VerifierKey},
    config::AuditConfig,
    domain::{Filter, SequenceRange, parse_range},
    error::Error,
    export::{self, Chunk},
    store, verify,
};

/// `mesh-audit`: the audit-log service and its offline tools.
#[derive(Debug, Parser)]
#[command(name = "mesh-audit", version, about)]
pub struct Cli {
    /// Without a command the service runs, configured from the environment.
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// An offline tool.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Recompute the hash chain over a range and name the first bad sequence.
    Verify(VerifyArgs),
    /// Write a range of events as JSON lines to stdout, in chain order.
    Export(ExportArgs),
    /// Drop whole monthly partitions older than a cutoff, checkpointing the
    /// chain at each dropped boundary (needs the schema owner's login).
    Retention(RetentionArgs),
    /// Make an Ed25519 key pair for signing checkpoints (signed-note key format).
    Keygen(KeygenArgs),
    /// Run the service's migrations as MESH_DATABASE_WRITE_URL's login (the
    /// schema owner), print the versions applied, exit: 0 done, 64 a bad
    /// setting, 1 a failure. Configured from the environment like the
    /// service; servers with MESH_DATABASE_MIGRATE=verify need it first.
    Migrate,
}

/// `keygen`.
#[derive(Debug, Args)]
pub struct KeygenArgs {
    /// The key's name, which is also every checkpoint's origin line (e.g. mesh.example.com/audit).
    #[arg(long)]
    pub name: String,
    /// Where to write the private key (created with mode 0600; never overwritten).
    #[arg(long)]
    pub private_key: PathBuf,
    /// Where to write the public key (never overwritten).
    #[arg(long)]
    pub public_key: PathBuf,
}

/// Where the events are.
#[derive(Debug, Args)]
pub struct DbArgs {
    /// PostgreSQL URL (primary or replica; never printed).
    #[arg(long, env = "MESH_DATABASE_WRITE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
    /// The audit schema.
    #[arg(long, env = "MESH_DATABASE_SCHEMA", default_value = "audit")]
    pub schema: String,
}

/// `verify`.
#[derive(Debug, Args)]
pub struct VerifyArgs {
    #[command(flatten)]
    pub db: DbArgs,
    /// First sequence (default: the oldest retained).
    #[arg(long)]
    pub from: Option<u64>,
    /// Last sequence (default: the head).
    #[arg(long)]
    pub to: Option<u64>,
    /// Verify an unfiltered export (JSON lines) instead of the database.
    #[arg(long, conflicts_with_all = ["from", "to", "checkpoints"])]
    pub file: Option<PathBuf>,
    /// Also check the database against every signed checkpoint in this
    /// directory: each signature, that the event at each checkpoint's size
    /// still has its hash (re-chaining), and that the chain reaches the
    /// newest checkpoint (truncation). Verifies the whole retained chain.
    #[arg(long, requires = "public_key", conflicts_with_all = ["from", "to"])]
    pub checkpoints: Option<PathBuf>,
    /// The checkpoint verifier key (the public key file `mesh-audit keygen` wrote).
    #[arg(long, requires = "checkpoints")]
    pub public_key: Option<PathBuf>,
}

/// An outcome on the command line.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum OutcomeArg {
    /// SUCCESS
    Success,
    /// FAILURE
    Failure,
    /// DENIED
    Denied,
}

/// `export`.
#[derive(Debug, Args)]
pub struct ExportArgs {
    #[command(flatten)]
    pub db: DbArgs,
    /// First sequence (default: the oldest retained).
    #[arg(long)]
    pub from: Option<u64>,
    /// Last sequence (default: the head).
    #[arg(long)]
    pub to: Option<u64>,
    /// Only this actor id.
    #[arg(long)]
    pub actor_id: Option<String>,
    /// Only this action.
    #[arg(long)]
    pub action: Option<String>,
    /// Only this resource type.
    #[arg(long)]
    pub resource_type: Option<String>,
    /// Only this resource id.
    #[arg(long)]
    pub resource_id: Option<String>,
    /// Only this outcome.
    #[arg(long, value_enum)]
    pub outcome: Option<OutcomeArg>,
    /// Only events that occurred at or after this time (RFC 3339 or YYYY-MM-DD).
    #[arg(long, value_parser = parse_time)]
    pub since: Option<DateTime<Utc>>,
    /// Only events that occurred before this time (RFC 3339 or YYYY-MM-DD).
    #[arg(long, value_parser = parse_time)]
    pub until: Option<DateTime<Utc>>,
}

/// `retention`.
#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("cutoff").required(true).args(["keep_months", "before"])))]
pub struct RetentionArgs {
    #[command(flatten)]
    pub db: DbArgs,
    /// Keep the current month and this many before it.
    #[arg(long)]
    pub keep_months: Option<u32>,
    /// Drop partitions that end at or before this time (RFC 3339 or YYYY-MM-DD).
    #[arg(long, value_parser = parse_time)]
    pub before: Option<DateTime<Utc>>,
}

fn parse_time(s: &str) -> Result<DateTime<Utc>, String> {
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Ok(t.with_timezone(&Utc));
    }
    NaiveDate::from_str(s)
        .map(|d| d.and_hms_opt(0, 0, 0).expect("midnight").and_utc())
        .map_err(|_| format!("{s:?} is neither RFC 3339 nor YYYY-MM-DD"))
}

/// Runs an offline command to completion.
pub async fn run(command: Command) -> ExitCode {
    let result = match command {
        Command::Verify(a) => run_verify(a).await,
        Command::Export(a) => run_export(a).await,
        Command::Retention(a) => run_retention(a).await,
        Command::Keygen(a) => run_keygen(&a),
        Command::Migrate => return crate::App::migrate_command().await,
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("mesh-audit: {e}");
            ExitCode::from(2)
        }
    }
}

async fn connect(db: &DbArgs) -> anyhow::Result<PgPool> {
    let url = SecretString::from(
        db.database_url
            .clone()
            .ok_or_else(|| anyhow::anyhow!("--database-url (or MESH_DATABASE_WRITE_URL) is required"))?,
    );
    let schema = &db.schema;
    let valid = schema.len() <= 63
        && schema.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
        && schema.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    anyhow::ensure!(valid, "--schema must be a plain identifier ([a-z_][a-z0-9_]*)");
    let opts = PgConnectOptions::from_str(url.expose_secret())
        .map_err(|_| anyhow::anyhow!("--database-url is not a valid postgres URL"))?
        .application_name("mesh-audit-cli")
        .options([("search_path", schema.as_str())]);
    let pool = PgPoolOptions::new().max_connections(2).connect_with(opts).await?;
    Ok(pool)
}

fn range(from: Option<u64>, to: Option<u64>) -> anyhow::Result<SequenceRange> {
    parse_range(from.unwrap_or(0), to.unwrap_or(0)).map_err(|e| anyhow::anyhow!("{}", describe(e)))
}

fn describe(e: Error) -> String {
    match e {
        Error::InvalidArgument(v) => {
            v.iter().map(|f| format!("{}: {}", f.field, f.description)).collect::<Vec<_>>().join("; ")
        }
        other => other.to_string(),
    }
}

async fn run_verify(a: VerifyArgs) -> anyhow::Result<ExitCode> {
    if let (Some(dir), Some(key)) = (&a.checkpoints, &a.public_key) {
        return verify_checkpoints(&a.db, dir, key).await;
    }
    let report = match &a.file {
        Some(path) => verify_file(path)?,
        None => {
            let pool = connect(&a.db).await?;
            verify::verify(&pool, range(a.from, a.to)?, AuditConfig::default().scan_chunk)
                .await
                .map_err(|e| anyhow::anyhow!("{}", describe(e)))?
        }
    };
    println!(
        "{}",
        json!({
            "ok": report.ok,
            "checked": report.checked,
            "from": report.from,
            "to": report.to,
            "first_bad_sequence": report.first_bad_sequence,
            "problem": report.problem,
            "head_hash": hex::encode(report.head_hash),
        })
    );
    Ok(if report.ok { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

/// `verify --checkpoints`: prints one JSON object; exit 1 names the bad
/// checkpoint (`checkpoint`) and sequence (`first_bad_sequence`).
async fn verify_checkpoints(
    db: &DbArgs,
    dir: &std::path::Path,
    key: &std::path::Path,
) -> anyhow::Result<ExitCode> {
    let key_text = std::fs::read_to_string(key)
        .map_err(|e| anyhow::anyhow!("cannot read the public key {}: {e}", key.display()))?;
    let key = VerifierKey::parse(&key_text).map_err(|e| anyhow::anyhow!("--public-key: {e}"))?;
    let published = match checkpoint::read_dir(dir, &key) {
        Ok(p) => p,
        Err(Err(e)) => anyhow::bail!("cannot read the checkpoints in {}: {e}", dir.display()),
        Err(Ok(finding)) => return Ok(print_checkpoint_outcome(None, 0, 0, None, Some(finding))),
    };
    let Some(newest) = published.last().cloned() else {
        anyhow::bail!("no checkpoints in {}", dir.display());
    };
    let pool = connect(db).await?;
    let head = store::read_head(&pool).await?;
    let size = newest.checkpoint.size;
    if head.last() < size {
        let in_recovery: bool = sqlx::query_scalar("select pg_is_in_recovery()").fetch_one(&pool).await?;
        anyhow::ensure!(
            !in_recovery,
            "this replica has replayed the chain to {} only, short of checkpoint {} (size {size}): run against the primary",
            head.last(),
            newest.file
        );
        let finding = Finding {
            checkpoint: Some(newest.file.clone()),
            sequence: Some(head.last() + 1),
            problem: format!(
                "the chain in the database ends at sequence {} but checkpoint {} was signed at size {size}: \
                 events {} to {size} were removed (and the head moved back)",
                head.last(),
                newest.file,
                head.last() + 1
            ),
        };
        return Ok(print_checkpoint_outcome(None, published.len(), 0, Some(size), Some(finding)));
    }
    let report = verify::verify(
        &pool,
        SequenceRange { from: None, to: Some(head.last()) },
        AuditConfig::default().scan_chunk,
    )
    .await
    .map_err(|e| anyhow::anyhow!("{}", describe(e)))?;
    if !report.ok {
        let finding = Finding {
            checkpoint: None,
            sequence: report.first_bad_sequence,
            problem: report.problem.clone().unwrap_or_default(),
        };
        return Ok(print_checkpoint_outcome(Some(&report), published.len(), 0, Some(size), Some(finding)));
    }
    // The chain verifies, so each stored hash is what the events hash to:
    // compare it with what was signed at each size.
    let first_retained = report.from;
    let mut skipped = 0;
    let mut last_good: Option<&checkpoint::Published> = None;
    let wanted: Vec<u64> =
        published.iter().map(|p| p.checkpoint.size).filter(|s| *s >= first_retained && *s > 0).collect();
    let mut stored = std::collections::HashMap::new();
    for chunk in wanted.chunks(1000) {
        stored.extend(store::hashes_at(&pool, chunk).await?);
    }
    for p in &published {
        let cp = &p.checkpoint;
        let finding =
            |problem: String| Finding { checkpoint: Some(p.file.clone()), sequence: Some(cp.size), problem };
        let since = last_good.map_or_else(
            || "the chain was rewritten at or before it".to_owned(),
            |g| {
                format!(
                    "the chain was rewritten after sequence {} (checkpoint {} still matches)",
                    g.checkpoint.size, g.file
                )
            },
        );
        let bad = if cp.size == 0 {
            (cp.hash != GENESIS)
                .then(|| finding("checkpoint for size 0 does not hold the genesis hash".into()))
        } else if cp.size < first_retained {
            if cp.size == size {
                Some(finding(format!(
                    "the newest checkpoint, {} (size {size}), is older than the oldest retained event, {first_retained}: \
                     nothing retained is covered by a signature",
                    p.file
                )))
            } else {
                skipped += 1;
                continue;
            }
        } else {
            match stored.get(&cp.size) {
                Some(h) if h.as_slice() == cp.hash => None,
                Some(h) => Some(finding(format!(
                    "checkpoint {} signs hash {} for size {}, but event {} in the database has hash {}: {since}",
                    p.file,
                    base64_of(&cp.hash),
                    cp.size,
                    cp.size,
                    base64_of(h)
                ))),
                None => Some(finding(format!("event {} of checkpoint {} is missing", cp.size, p.file))),
            }
        };
        if let Some(finding) = bad {
            return Ok(print_checkpoint_outcome(
                Some(&report),
                published.len(),
                skipped,
                Some(size),
                Some(finding),
            ));
        }
        last_good = Some(p);
    }
    Ok(print_checkpoint_outcome(Some(&report), published.len(), skipped, Some(size), None))
}

fn base64_of(b: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(b)
}

fn print_checkpoint_outcome(
    report: Option<&verify::Report>,
    checkpoints: usize,
    skipped: usize,
    newest: Option<u64>,
    finding: Option<Finding>,
) -> ExitCode {
    let ok = finding.is_none();
    if let Some(f) = &finding {
        eprintln!("mesh-audit: {}", f.problem);
    }
    println!(
        "{}",
        json!({
            "ok": ok,
            "checked": report.map(|r| r.checked),
            "from": report.map(|r| r.from),
            "to": report.map(|r| r.to),
            "head_hash": report.map(|r| hex::encode(r.head_hash)),
            "checkpoints": checkpoints,
            "checkpoints_before_retention": skipped,
            "newest_checkpoint": newest,
            "checkpoint": finding.as_ref().and_then(|f| f.checkpoint.clone()),
            "first_bad_sequence": finding.as_ref().and_then(|f| f.sequence),
            "problem": finding.map(|f| f.problem),
        })
    );
    if ok { ExitCode::SUCCESS } else { ExitCode::from(1) }
}

fn run_keygen(a: &KeygenArgs) -> anyhow::Result<ExitCode> {
    let key = SignerKey::generate(&a.name).map_err(|e| anyhow::anyhow!("--name: {e}"))?;
    let create = |path: &std::path::Path, mode: u32, text: String| -> anyhow::Result<()> {
        use std::os::unix::fs::OpenOptionsExt as _;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(path)
            .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", path.display()))?;
        f.write_all(format!("{text}\n").as_bytes())?;
        f.sync_all()?;
        Ok(())
    };
    create(&a.private_key, 0o600, key.encode())?;
    create(&a.public_key, 0o644, key.verifier().encode())?;
    println!("{}", json!({"name": key.name(), "public_key": key.verifier().encode()}));
    Ok(ExitCode::SUCCESS)
}

/// Checks an export: every line hashes to its `hash`, lines are consecutive
/// and each links to the one before; the first links to genesis if it is
/// sequence 1 (otherwise its `prev_hash` is the anchor to compare with a
/// trusted head hash).
fn verify_file(path: &std::path::Path) -> anyhow::Result<verify::Report> {
    let file =
        std::fs::File::open(path).map_err(|e| anyhow::anyhow!("cannot open {}: {e}", path.display()))?;
    let mut report = verify::Report {
        ok: true,
        checked: 0,
        first_bad_sequence: None,
        problem: None,
        head_hash: GENESIS,
        from: 0,
        to: 0,
    };
    let mut prev: Option<(u64, Hash)> = None;
    for (n, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let fail = |mut r: verify::Report, seq: u64, problem: String| {
            r.ok = false;
            r.first_bad_sequence = Some(seq);
            r.problem = Some(problem);
            r
        };
        let event = match export::from_json_line(&line) {
            Ok(e) => e,
            Err(why) => {
                let seq = prev.map_or(0, |p| p.0 + 1);
                return Ok(fail(report, seq, format!("line {}: {why}", n + 1)));
            }
        };
        let s = event.sequence;
        match prev {
            None => {
                report.from = s;
                if s == 1 && event.prev_hash != GENESIS {
                    return Ok(fail(report, s, "event 1 does not start from the genesis hash".into()));
                }
            }
            Some((p, _)) if s != p + 1 => {
                return Ok(fail(report, p + 1, format!("event {} is missing", p + 1)));
            }
            Some((_, h)) if event.prev_hash != h => {
                return Ok(fail(report, s, format!("event {s} does not link to event {}", s - 1)));
            }
            Some(_) => {}
        }
        if event.compute_hash() != event.hash {
            return Ok(fail(report, s, format!("event {s} does not match its hash")));
        }
        prev = Some((s, event.hash));
        report.head_hash = event.hash;
        report.to = s;
        report.checked += 1;
    }
    Ok(report)
}

async fn run_export(a: ExportArgs) -> anyhow::Result<ExitCode> {
    let pool = connect(&a.db).await?;
    let range = range(a.from, a.to)?;
    let filter = Filter {
        actor_id: a.actor_id,
        action: a.action,
        resource_type: a.resource_type,
        resource_id: a.resource_id,
        outcome: a.outcome.map(|o| match o {
            OutcomeArg::Success => Outcome::Success,
            OutcomeArg::Failure => Outcome::Failure,
            OutcomeArg::Denied => Outcome::Denied,
        }),
        since: a.since,
        until: a.until,
    };
    let head = store::read_head(&pool).await?.last();
    let to = range.to.unwrap_or(head);
    anyhow::ensure!(to <= head, "--to {to} is beyond the head, {head}");
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Result<Chunk, Error>>(4);
    tokio::spawn(export::run(
        pool,
        filter,
        range.from.unwrap_or(1),
        to,
        AuditConfig::default().scan_chunk,
        tx,
    ));
    let mut out = std::io::stdout().lock();
    while let Some(chunk) = rx.recv().await {
        let chunk = chunk.map_err(|e| anyhow::anyhow!("{}", describe(e)))?;
        out.write_all(chunk.lines.as_bytes())?;
    }
    out.flush()?;
    Ok(ExitCode::SUCCESS)
}

async fn run_retention(a: RetentionArgs) -> anyhow::Result<ExitCode> {
    let cutoff = match (a.before, a.keep_months) {
        (Some(t), _) => t,
        (None, Some(n)) => {
            let now = Utc::now();
            let month =
                Utc.with_ymd_and_hms(now.year(), now.month(), 1, 0, 0, 0).single().expect("valid date");
            month
                .checked_sub_months(Months::new(n))
                .ok_or_else(|| anyhow::anyhow!("--keep-months is too large"))?
        }
        (None, None) => unreachable!("clap requires one"),
    };
    let pool = connect(&a.db).await?;
    let dropped = store::drop_partitions_before(&pool, cutoff).await?;
    for d in &dropped {
        println!("{}", json!({"dropped": d.partition, "events": d.events, "checkpoint_sequence": d.through}));
    }
    eprintln!(
        "mesh-audit: {} partition(s) ending at or before {} dropped",
        dropped.len(),
        cutoff.to_rfc3339()
    );
    Ok(ExitCode::SUCCESS)
}

//! Configuration from the environment.
//!
//! Besides the shared server (`MESH_LISTEN_ADDR`, …) and database
//! (`MESH_DATABASE_*`) settings, the audit service reads `MESH_AUDIT_*`;
//! [`AuditConfig::vars`] lists each with its default and meaning, and
//! [`Config::help`] every variable the process reads (`mesh-audit --help`,
//! docs/CONFIGURATION.md).

use std::{
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use chrono::{DateTime, Utc};
use mesh_db::DbConfig;
use mesh_runtime::{
    ConfigError, Lookup, LookupExt, ServerConfig, TelemetryConfig,
    config::{Help, Var, VarGroup},
};

/// Default gRPC port.
pub const DEFAULT_PORT: u16 = 50053;

/// Default schema of the service's tables (`MESH_DATABASE_SCHEMA`).
pub(crate) const SCHEMA: &str = "audit";

/// `MESH_QUEUE_WAIT_MS` when unset: how long an Append past
/// `MESH_MAX_IN_FLIGHT` waits for a slot before it is shed (the runtime's
/// default is 20 ms). Measured with `mesh-bench` (libs/bench/results/audit.md,
/// "2026-12-01: the Append ladder"): at 1024 callers that come straight back
/// after a refusal, 20 ms shed 23–28k Appends in 5 s and served 9.2–11.8k/s;
/// 250 ms shed none and served 12.7–12.9k/s (about 90 % of the peak at 256
/// callers), because a shed call costs about as much CPU as an answered one.
/// A caller's shorter `grpc-timeout` still shortens the wait. As rate-limit's
/// (`mesh_ratelimit` config).
pub(crate) const QUEUE_WAIT: Duration = Duration::from_millis(250);

/// Keys read by [`Config::from_lookup`] beyond the server and database ones.
pub mod keys {
    /// Most events per group commit.
    pub const BATCH_MAX: &str = "MESH_AUDIT_BATCH_MAX";
    /// Extra wait for a batch to fill (µs).
    pub const BATCH_LINGER_US: &str = "MESH_AUDIT_BATCH_LINGER_US";
    /// Appends waiting for a batch.
    pub const QUEUE_CAPACITY: &str = "MESH_AUDIT_QUEUE_CAPACITY";
    /// Recent events kept in memory for Tail.
    pub const TAIL_BUFFER: &str = "MESH_AUDIT_TAIL_BUFFER";
    /// Events queued per Tail subscriber.
    pub const TAIL_SUBSCRIBER_BUFFER: &str = "MESH_AUDIT_TAIL_SUBSCRIBER_BUFFER";
    /// Allowed future skew of `occurred_at` (ms).
    pub const MAX_FUTURE_SKEW_MS: &str = "MESH_AUDIT_MAX_FUTURE_SKEW_MS";
    /// Most open Tail streams per instance.
    pub const TAIL_MAX_SUBSCRIBERS: &str = "MESH_AUDIT_TAIL_MAX_SUBSCRIBERS";
    /// Rows Verify and Export read per statement.
    pub const SCAN_CHUNK: &str = "MESH_AUDIT_SCAN_CHUNK";
    /// Directory signed checkpoints are written to.
    pub const CHECKPOINT_DIR: &str = "MESH_AUDIT_CHECKPOINT_DIR";
    /// File holding the checkpoint signing key.
    pub const CHECKPOINT_KEY_FILE: &str = "MESH_AUDIT_CHECKPOINT_KEY_FILE";
    /// How often a checkpoint is published (ms).
    pub const CHECKPOINT_INTERVAL_MS: &str = "MESH_AUDIT_CHECKPOINT_INTERVAL_MS";
}

/// The audit service's configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Listeners, health, drain.
    pub server: ServerConfig,
    /// PostgreSQL primary (writes, migrations) and replicas (reads).
    pub db: DbConfig,
    /// Group commit, Tail and validation settings.
    pub audit: AuditConfig,
}

/// The audit service's own settings (see the module docs).
#[derive(Debug, Clone)]
pub struct AuditConfig {
    /// Most events per group commit.
    pub batch_max: usize,
    /// Extra wait for a batch to fill after its first event.
    pub batch_linger: Duration,
    /// Appends accepted and not yet answered (waiting for a batch, being
    /// written, or waiting for the WAL flush); beyond it Append is refused.
    pub queue_capacity: usize,
    /// Recent events kept for live Tail subscribers.
    pub tail_buffer: usize,
    /// Events queued for one Tail subscriber.
    pub tail_subscriber_buffer: usize,
    /// How far in the future `occurred_at` may be.
    pub max_future_skew: Duration,
    /// Most open Tail streams per instance; beyond it Tail is refused.
    pub tail_max_subscribers: usize,
    /// Rows Verify and Export read per statement (each its own short read).
    pub scan_chunk: usize,
    /// Where signed checkpoints go (with `checkpoint_key_file`; both or neither).
    pub checkpoint_dir: Option<PathBuf>,
    /// The file holding the checkpoint signing key (`mesh-audit keygen`).
    pub checkpoint_key_file: Option<PathBuf>,
    /// How often a checkpoint of the chain head is published (when it moved).
    pub checkpoint_interval: Duration,
    /// Where `recorded_at` comes from.
    pub clock: Clock,
}

impl Default for AuditConfig {
    fn default() -> Self {
        Self {
            batch_max: 512,
            batch_linger: Duration::ZERO,
            queue_capacity: 20_000,
            tail_buffer: 8192,
            tail_subscriber_buffer: 256,
            max_future_skew: Duration::from_secs(300),
            tail_max_subscribers: 256,
            scan_chunk: 1000,
            checkpoint_dir: None,
            checkpoint_key_file: None,
            checkpoint_interval: Duration::from_secs(60),
            clock: Clock::System,
        }
    }
}

impl Config {
    /// `mesh-audit --help` (without a command): every variable the service reads.
    pub fn help() -> Help {
        Help {
            binary: "mesh-audit",
            about: "the audit-log service (mesh.audit.v1.AuditService, gRPC)",
            commands: &[],
            groups: vec![
                ServerConfig::vars(DEFAULT_PORT)
                    .with_default(mesh_runtime::config::keys::QUEUE_WAIT_MS, QUEUE_WAIT.as_millis()),
                TelemetryConfig::vars("mesh-audit"),
                DbConfig::vars(SCHEMA),
                AuditConfig::vars(),
            ],
        }
    }

    /// Reads the process environment.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(&mesh_runtime::Env)
    }

    /// Reads any [`Lookup`].
    pub fn from_lookup(l: &impl Lookup) -> Result<Self, ConfigError> {
        Ok(Self {
            server: ServerConfig::from_lookup_with(
                l,
                DEFAULT_PORT,
                mesh_runtime::Limits { queue_wait: QUEUE_WAIT, ..Default::default() },
            )?,
            db: DbConfig::from_lookup(l, SCHEMA)?,
            audit: AuditConfig::from_lookup(l)?,
        })
    }
}

impl AuditConfig {
    /// The `MESH_AUDIT_*` variables [`Self::from_lookup`] reads, for `--help`.
    pub fn vars() -> VarGroup {
        use keys::*;
        let d = Self::default();
        VarGroup::new(
            "Audit log",
            vec![
                Var::value(BATCH_MAX, d.batch_max, "most events one group commit writes (1 to 10000)"),
                Var::value(
                    BATCH_LINGER_US,
                    d.batch_linger.as_micros(),
                    "how long a batch waits for more events after its first (microseconds); batches also \
                     form on their own while the previous one commits",
                ),
                Var::value(
                    QUEUE_CAPACITY,
                    d.queue_capacity,
                    "appends accepted and not yet answered (waiting for a batch, being written or \
                     waiting for the WAL flush); beyond it Append answers UNAVAILABLE at once",
                ),
                Var::value(
                    TAIL_BUFFER,
                    d.tail_buffer,
                    "recent events kept in memory for live Tail subscribers",
                ),
                Var::value(
                    TAIL_SUBSCRIBER_BUFFER,
                    d.tail_subscriber_buffer,
                    "events queued for one Tail subscriber before it counts as slow",
                ),
                Var::millis(
                    MAX_FUTURE_SKEW_MS,
                    d.max_future_skew,
                    "how far in the future occurred_at may be (ms)",
                ),
                Var::value(
                    TAIL_MAX_SUBSCRIBERS,
                    d.tail_max_subscribers,
                    "most open Tail streams per instance; beyond it Tail answers RESOURCE_EXHAUSTED",
                ),
                Var::value(
                    SCAN_CHUNK,
                    d.scan_chunk,
                    "rows Verify and Export read per statement, each its own short read (1 to 100000)",
                ),
                Var::unset(
                    CHECKPOINT_DIR,
                    "no checkpoints",
                    "directory signed checkpoints of the chain head are written to (with \
                     MESH_AUDIT_CHECKPOINT_KEY_FILE); see mesh-audit verify --checkpoints",
                ),
                Var::unset(
                    CHECKPOINT_KEY_FILE,
                    "no checkpoints",
                    "file holding the Ed25519 checkpoint signing key (from mesh-audit keygen); never \
                     stored in PostgreSQL",
                ),
                Var::millis(
                    CHECKPOINT_INTERVAL_MS,
                    d.checkpoint_interval,
                    "how often a checkpoint is published when the chain moved (ms)",
                ),
            ],
        )
    }

    /// Reads the `MESH_AUDIT_*` settings.
    pub fn from_lookup(l: &impl Lookup) -> Result<Self, ConfigError> {
        let d = Self::default();
        let batch_max = l.parse_or(keys::BATCH_MAX, d.batch_max)?;
        if !(1..=10_000).contains(&batch_max) {
            return Err(ConfigError::new(keys::BATCH_MAX, "must be between 1 and 10000"));
        }
        let queue_capacity: usize = l.parse_or(keys::QUEUE_CAPACITY, d.queue_capacity)?;
        if queue_capacity == 0 {
            return Err(ConfigError::new(keys::QUEUE_CAPACITY, "must be at least 1"));
        }
        let tail_buffer: usize = l.parse_or(keys::TAIL_BUFFER, d.tail_buffer)?;
        if tail_buffer == 0 {
            return Err(ConfigError::new(keys::TAIL_BUFFER, "must be at least 1"));
        }
        let tail_subscriber_buffer: usize =
            l.parse_or(keys::TAIL_SUBSCRIBER_BUFFER, d.tail_subscriber_buffer)?;
        if tail_subscriber_buffer == 0 {
            return Err(ConfigError::new(keys::TAIL_SUBSCRIBER_BUFFER, "must be at least 1"));
        }
        let scan_chunk: usize = l.parse_or(keys::SCAN_CHUNK, d.scan_chunk)?;
        if !(1..=100_000).contains(&scan_chunk) {
            return Err(ConfigError::new(keys::SCAN_CHUNK, "must be between 1 and 100000"));
        }
        let checkpoint_dir = l.string(keys::CHECKPOINT_DIR).map(PathBuf::from);
        let checkpoint_key_file = l.string(keys::CHECKPOINT_KEY_FILE).map(PathBuf::from);
        match (&checkpoint_dir, &checkpoint_key_file) {
            (Some(_), None) => {
                return Err(ConfigError::new(
                    keys::CHECKPOINT_KEY_FILE,
                    "is required with MESH_AUDIT_CHECKPOINT_DIR",
                ));
            }
            (None, Some(_)) => {
                return Err(ConfigError::new(
                    keys::CHECKPOINT_DIR,
                    "is required with MESH_AUDIT_CHECKPOINT_KEY_FILE",
                ));
            }
            _ => {}
        }
        let checkpoint_interval = l.millis_or(keys::CHECKPOINT_INTERVAL_MS, d.checkpoint_interval)?;
        if checkpoint_interval.is_zero() {
            return Err(ConfigError::new(keys::CHECKPOINT_INTERVAL_MS, "must be at least 1"));
        }
        Ok(Self {
            batch_max,
            batch_linger: Duration::from_micros(
                l.parse_or(keys::BATCH_LINGER_US, d.batch_linger.as_micros() as u64)?,
            ),
            queue_capacity,
            tail_buffer,
            tail_subscriber_buffer,
            max_future_skew: l.millis_or(keys::MAX_FUTURE_SKEW_MS, d.max_future_skew)?,
            tail_max_subscribers: l.parse_or(keys::TAIL_MAX_SUBSCRIBERS, d.tail_max_subscribers)?,
            scan_chunk,
            checkpoint_dir,
            checkpoint_key_file,
            checkpoint_interval,
            clock: Clock::System,
        })
    }
}

/// Where the service reads the time it stamps as `recorded_at`.
#[derive(Debug, Clone, Default)]
pub enum Clock {
    /// The system clock.
    #[default]
    System,
    /// A clock that only moves when told (tests of monthly partitions and retention).
    Manual(ManualClock),
}

impl Clock {
    /// The current time.
    pub fn now(&self) -> DateTime<Utc> {
        match self {
            Self::System => Utc::now(),
            Self::Manual(m) => m.now(),
        }
    }
}

/// A settable clock, shared by its clones.
#[derive(Debug, Clone)]
pub struct ManualClock(Arc<Mutex<DateTime<Utc>>>);

impl ManualClock {
    /// A clock showing `at`.
    pub fn new(at: DateTime<Utc>) -> Self {
        Self(Arc::new(Mutex::new(at)))
    }

    /// The time it shows.
    pub fn now(&self) -> DateTime<Utc> {
        *self.0.lock().expect("clock lock")
    }

    /// Makes it show `at`.
    pub fn set(&self, at: DateTime<Utc>) {
        *self.0.lock().expect("clock lock") = at;
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn map(pairs: &[(&'static str, &str)]) -> HashMap<&'static str, String> {
        pairs.iter().map(|(k, v)| (*k, (*v).to_owned())).collect()
    }

    #[test]
    fn defaults_and_overrides() {
        let c = Config::from_lookup(&map(&[("MESH_DATABASE_WRITE_URL", "postgres://h/db")])).unwrap();
        assert_eq!(c.db.schema.as_deref(), Some("audit"));
        assert_eq!(c.audit.batch_max, 512);
        let c = AuditConfig::from_lookup(&map(&[(keys::BATCH_MAX, "64"), (keys::BATCH_LINGER_US, "250")]))
            .unwrap();
        assert_eq!(c.batch_max, 64);
        assert_eq!(c.batch_linger, Duration::from_micros(250));
    }

    #[test]
    fn help_lists_every_variable_the_service_reads_with_its_real_default() {
        let problems = mesh_runtime::config::check_help(
            &Config::help(),
            &[("MESH_DATABASE_WRITE_URL", "postgres://h/db")],
            |l| Ok((TelemetryConfig::from_lookup(l, "mesh-audit")?, Config::from_lookup(l)?)),
        );
        assert_eq!(problems, Vec::<String>::new());
    }

    #[test]
    fn bad_values_name_the_key() {
        for (k, v) in [
            (keys::BATCH_MAX, "0"),
            (keys::BATCH_MAX, "lots"),
            (keys::QUEUE_CAPACITY, "0"),
            (keys::TAIL_BUFFER, "0"),
            (keys::MAX_FUTURE_SKEW_MS, "5m"),
            (keys::SCAN_CHUNK, "0"),
            (keys::CHECKPOINT_INTERVAL_MS, "0"),
        ] {
            assert_eq!(AuditConfig::from_lookup(&map(&[(k, v)])).unwrap_err().key, k);
        }
        // a checkpoint directory without a key, or a key without a directory: the missing one is named
        let e = AuditConfig::from_lookup(&map(&[(keys::CHECKPOINT_DIR, "/tmp/cp")])).unwrap_err();
        assert_eq!(e.key, keys::CHECKPOINT_KEY_FILE);
        let e = AuditConfig::from_lookup(&map(&[(keys::CHECKPOINT_KEY_FILE, "/tmp/k")])).unwrap_err();
        assert_eq!(e.key, keys::CHECKPOINT_DIR);
    }
}

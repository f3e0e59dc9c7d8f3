//! Configuration from the environment.
//!
//! Besides the shared server (`MESH_LISTEN_ADDR`, …), database
//! (`MESH_DATABASE_*`, see `mesh_db::keys`) and client (`MESH_SESSION_ADDR`,
//! `MESH_RATELIMIT_ADDR`, `MESH_AUDIT_ADDR`, `MESH_CLIENT_*`) settings, the
//! data service reads `MESH_DATA_*`; [`DataConfig::vars`] lists each with its
//! default and meaning, and [`Config::help`] every variable the process
//! reads (`mesh-data --help`, docs/CONFIGURATION.md).
//!
//! `MESH_SESSION_ADDR` is required: every call is authenticated. Without
//! `MESH_RATELIMIT_ADDR` calls are not rate limited; without
//! `MESH_AUDIT_ADDR` audit events wait in the outbox for an instance that
//! has it. Both are logged at startup.

use std::time::Duration;

use mesh_client::{ClientConfig, FailureMode, config::keys as client_keys};
use mesh_db::DbConfig;
use mesh_runtime::{
    ConfigError, Lookup, LookupExt, ServerConfig, TelemetryConfig,
    config::{Help, Var, VarGroup},
};

/// Default gRPC port.
pub const DEFAULT_PORT: u16 = 50054;

/// Default schema of the service's tables (`MESH_DATABASE_SCHEMA`).
pub const SCHEMA: &str = "data";

/// Keys read by [`DataConfig::from_lookup`].
pub mod keys {
    /// Most operations per Batch.
    pub const MAX_BATCH_OPS: &str = "MESH_DATA_MAX_BATCH_OPS";
    /// Session validation timeout (ms).
    pub const SESSION_TIMEOUT_MS: &str = "MESH_DATA_SESSION_TIMEOUT_MS";
    /// Whether calls touch their session.
    pub const SESSION_TOUCH: &str = "MESH_DATA_SESSION_TOUCH";
    /// Rate-limit domain.
    pub const RATELIMIT_DOMAIN: &str = "MESH_DATA_RATELIMIT_DOMAIN";
    /// `fail_open` or `fail_closed`.
    pub const RATELIMIT_FAILURE_MODE: &str = "MESH_DATA_RATELIMIT_FAILURE_MODE";
    /// Rate-limit call timeout (ms).
    pub const RATELIMIT_TIMEOUT_MS: &str = "MESH_DATA_RATELIMIT_TIMEOUT_MS";
    /// Audit Append timeout (ms).
    pub const AUDIT_TIMEOUT_MS: &str = "MESH_DATA_AUDIT_TIMEOUT_MS";
    /// Appends in flight.
    pub const OUTBOX_CONCURRENCY: &str = "MESH_DATA_OUTBOX_CONCURRENCY";
    /// Time an event is left to its writer (ms).
    pub const OUTBOX_GRACE_MS: &str = "MESH_DATA_OUTBOX_GRACE_MS";
    /// Sweep period (ms).
    pub const OUTBOX_SWEEP_MS: &str = "MESH_DATA_OUTBOX_SWEEP_MS";
    /// Events per sweep.
    pub const OUTBOX_BATCH: &str = "MESH_DATA_OUTBOX_BATCH";
    /// A sweep's claim (ms).
    pub const OUTBOX_LEASE_MS: &str = "MESH_DATA_OUTBOX_LEASE_MS";
    /// Longest delivery backoff (ms).
    pub const OUTBOX_RETRY_MAX_MS: &str = "MESH_DATA_OUTBOX_RETRY_MAX_MS";
}

/// The data service's own settings (see the module docs).
#[derive(Debug, Clone)]
pub struct DataConfig {
    /// Most operations per Batch.
    pub max_batch_ops: usize,
    /// Longest wait for the session service.
    pub session_timeout: Duration,
    /// Whether calls slide their session's idle expiry.
    pub session_touch: bool,
    /// Rate-limit domain.
    pub ratelimit_domain: String,
    /// What happens when the rate-limit service cannot decide.
    pub ratelimit_failure_mode: FailureMode,
    /// Longest wait for the rate-limit service.
    pub ratelimit_timeout: Duration,
    /// Deadline of one audit Append.
    pub audit_timeout: Duration,
    /// Appends in flight.
    pub outbox_concurrency: usize,
    /// Time an event is left to the instance that wrote it.
    pub outbox_grace: Duration,
    /// Sweep period.
    pub outbox_sweep: Duration,
    /// Events per sweep.
    pub outbox_batch: usize,
    /// A sweep's claim on its events.
    pub outbox_lease: Duration,
    /// First delivery backoff.
    pub outbox_retry_base: Duration,
    /// Longest delivery backoff.
    pub outbox_retry_max: Duration,
}

impl Default for DataConfig {
    fn default() -> Self {
        Self {
            max_batch_ops: 500,
            session_timeout: Duration::from_secs(1),
            session_touch: true,
            ratelimit_domain: "data".to_owned(),
            ratelimit_failure_mode: FailureMode::FailOpen,
            ratelimit_timeout: Duration::from_millis(250),
            audit_timeout: Duration::from_secs(5),
            outbox_concurrency: 32,
            outbox_grace: Duration::from_secs(10),
            outbox_sweep: Duration::from_secs(1),
            outbox_batch: 100,
            outbox_lease: Duration::from_secs(60),
            outbox_retry_base: Duration::from_secs(1),
            outbox_retry_max: Duration::from_secs(60),
        }
    }
}

impl DataConfig {
    /// The `MESH_DATA_*` variables [`Self::from_lookup`] reads, for `--help`.
    pub fn vars() -> VarGroup {
        use keys::*;
        let d = Self::default();
        VarGroup::new(
            "Data",
            vec![
                Var::value(MAX_BATCH_OPS, d.max_batch_ops, "most operations in one Batch (at most 10000)"),
                Var::millis(
                    SESSION_TIMEOUT_MS,
                    d.session_timeout,
                    "longest a call waits for the session service to validate its token (ms)",
                ),
                Var::value(
                    SESSION_TOUCH,
                    d.session_touch,
                    "whether a call slides its session's idle expiry (ValidateSession touch): true or false",
                ),
                Var::value(
                    RATELIMIT_DOMAIN,
                    &d.ratelimit_domain,
                    "rate-limit domain (descriptors user_id, and user_id + collection)",
                ),
                Var::value(
                    RATELIMIT_FAILURE_MODE,
                    d.ratelimit_failure_mode.label(),
                    "fail_open: calls go on unlimited while the rate-limit service cannot decide; \
                     fail_closed: they answer UNAVAILABLE",
                ),
                Var::millis(
                    RATELIMIT_TIMEOUT_MS,
                    d.ratelimit_timeout,
                    "longest a call waits for the rate-limit service (ms)",
                ),
                Var::millis(
                    AUDIT_TIMEOUT_MS,
                    d.audit_timeout,
                    "deadline of one audit Append from the outbox (ms)",
                ),
                Var::value(
                    OUTBOX_CONCURRENCY,
                    d.outbox_concurrency,
                    "audit Appends in flight at once per instance",
                ),
                Var::millis(
                    OUTBOX_GRACE_MS,
                    d.outbox_grace,
                    "how long an event is left to the instance that wrote it before any instance's sweep \
                     takes it (ms)",
                ),
                Var::millis(
                    OUTBOX_SWEEP_MS,
                    d.outbox_sweep,
                    "how often the outbox is swept for events not delivered at once: failed, or written by \
                     an instance that died (ms)",
                ),
                Var::value(OUTBOX_BATCH, d.outbox_batch, "most events one sweep claims"),
                Var::millis(
                    OUTBOX_LEASE_MS,
                    d.outbox_lease,
                    "a sweep's claim on its events (ms), after which another sweep may take them; at least \
                     MESH_DATA_AUDIT_TIMEOUT_MS",
                ),
                Var::millis(
                    OUTBOX_RETRY_MAX_MS,
                    d.outbox_retry_max,
                    "longest backoff between failed deliveries of an event (ms; from 1 s, doubling, jittered)",
                ),
            ],
        )
    }

    /// Reads the `MESH_DATA_*` keys.
    pub fn from_lookup(l: &impl Lookup) -> Result<Self, ConfigError> {
        use keys::*;
        let d = Self::default();
        let c = Self {
            max_batch_ops: l.parse_or(MAX_BATCH_OPS, d.max_batch_ops)?,
            session_timeout: l.millis_or(SESSION_TIMEOUT_MS, d.session_timeout)?,
            session_touch: l.parse_or(SESSION_TOUCH, d.session_touch)?,
            ratelimit_domain: l.string(RATELIMIT_DOMAIN).unwrap_or(d.ratelimit_domain),
            ratelimit_failure_mode: FailureMode::from_lookup(
                l,
                RATELIMIT_FAILURE_MODE,
                d.ratelimit_failure_mode,
            )?,
            ratelimit_timeout: l.millis_or(RATELIMIT_TIMEOUT_MS, d.ratelimit_timeout)?,
            audit_timeout: l.millis_or(AUDIT_TIMEOUT_MS, d.audit_timeout)?,
            outbox_concurrency: l.parse_or(OUTBOX_CONCURRENCY, d.outbox_concurrency)?,
            outbox_grace: l.millis_or(OUTBOX_GRACE_MS, d.outbox_grace)?,
            outbox_sweep: l.millis_or(OUTBOX_SWEEP_MS, d.outbox_sweep)?,
            outbox_batch: l.parse_or(OUTBOX_BATCH, d.outbox_batch)?,
            outbox_lease: l.millis_or(OUTBOX_LEASE_MS, d.outbox_lease)?,
            outbox_retry_base: d.outbox_retry_base,
            outbox_retry_max: l.millis_or(OUTBOX_RETRY_MAX_MS, d.outbox_retry_max)?,
        };
        c.validate()?;
        Ok(c)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        use keys::*;
        for (key, v) in [
            (MAX_BATCH_OPS, self.max_batch_ops),
            (OUTBOX_CONCURRENCY, self.outbox_concurrency),
            (OUTBOX_BATCH, self.outbox_batch),
        ] {
            if v == 0 {
                return Err(ConfigError::new(key, "must be at least 1"));
            }
        }
        if self.max_batch_ops > 10_000 {
            return Err(ConfigError::new(MAX_BATCH_OPS, "must be at most 10000"));
        }
        if self.ratelimit_domain.len() > 256 {
            return Err(ConfigError::new(RATELIMIT_DOMAIN, "must be at most 256 bytes"));
        }
        for (key, v, min) in [
            (SESSION_TIMEOUT_MS, self.session_timeout, 1),
            (RATELIMIT_TIMEOUT_MS, self.ratelimit_timeout, 1),
            (AUDIT_TIMEOUT_MS, self.audit_timeout, 1),
            (OUTBOX_SWEEP_MS, self.outbox_sweep, 10),
            (OUTBOX_LEASE_MS, self.outbox_lease, 100),
        ] {
            if v < Duration::from_millis(min) {
                return Err(ConfigError::new(key, format!("must be at least {min}")));
            }
        }
        if self.outbox_lease < self.audit_timeout {
            // A claim running out while its Append is still in flight would
            // let another sweep send the same event again (harmless, wasted).
            return Err(ConfigError::new(
                OUTBOX_LEASE_MS,
                format!("must be at least {AUDIT_TIMEOUT_MS} ({})", self.audit_timeout.as_millis()),
            ));
        }
        if self.outbox_retry_max < self.outbox_retry_base {
            return Err(ConfigError::new(
                OUTBOX_RETRY_MAX_MS,
                format!("must be at least {}", self.outbox_retry_base.as_millis()),
            ));
        }
        Ok(())
    }
}

/// The data service's configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Listeners, health, drain.
    pub server: ServerConfig,
    /// PostgreSQL primary (writes, migrations) and replicas (reads).
    pub db: DbConfig,
    /// Where the session, rate-limit and audit services are, and the client stack's tuning.
    pub clients: ClientConfig,
    /// Batches, session checks, rate limits, audit delivery.
    pub data: DataConfig,
}

impl Config {
    /// `mesh-data --help`: every variable the process reads.
    pub fn help() -> Help {
        Help {
            binary: "mesh-data",
            about: "the data service, a JSON document store (mesh.data.v1.DataService, gRPC); \
                    `mesh-data migrate` runs its migrations as MESH_DATABASE_WRITE_URL's login (the schema \
                    owner) and exits",
            commands: &["migrate"],
            groups: vec![
                ServerConfig::vars(DEFAULT_PORT),
                TelemetryConfig::vars("mesh-data"),
                DbConfig::vars(SCHEMA),
                // Required: every call is authenticated by the session service.
                ClientConfig::vars([
                    None,
                    Some("calls are not rate limited (logged at start)"),
                    Some("audit events wait in the outbox for an instance that has it (logged at start)"),
                    None,
                ])
                .with_required(client_keys::SESSION_ADDR),
                DataConfig::vars(),
            ],
        }
    }

    /// Reads the process environment.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(&mesh_runtime::Env)
    }

    /// Reads any [`Lookup`].
    pub fn from_lookup(l: &impl Lookup) -> Result<Self, ConfigError> {
        let clients = ClientConfig::from_lookup(l)?;
        if clients.session.is_none() {
            return Err(ConfigError::new(
                client_keys::SESSION_ADDR,
                "is required: every data call is authenticated by the session service",
            ));
        }
        Ok(Self {
            server: ServerConfig::from_lookup(l, DEFAULT_PORT)?,
            db: DbConfig::from_lookup(l, SCHEMA)?,
            clients,
            data: DataConfig::from_lookup(l)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn map(pairs: &[(&'static str, &str)]) -> HashMap<&'static str, String> {
        let mut m: HashMap<&'static str, String> = pairs.iter().map(|(k, v)| (*k, (*v).to_owned())).collect();
        m.entry("MESH_DATABASE_WRITE_URL").or_insert_with(|| "postgres://h/db".to_owned());
        m.entry("MESH_SESSION_ADDR").or_insert_with(|| "127.0.0.1:50051".to_owned());
        m
    }

    #[test]
    fn defaults_and_overrides() {
        let c = Config::from_lookup(&map(&[])).unwrap();
        assert_eq!(c.data.max_batch_ops, 500);
        assert_eq!(c.data.ratelimit_failure_mode, FailureMode::FailOpen);
        assert_eq!(c.data.ratelimit_domain, "data");
        assert!(c.data.session_touch);
        assert_eq!(c.db.schema.as_deref(), Some("data"));
        let c = Config::from_lookup(&map(&[
            (keys::MAX_BATCH_OPS, "20"),
            (keys::RATELIMIT_FAILURE_MODE, "fail_closed"),
            (keys::SESSION_TOUCH, "false"),
            (keys::OUTBOX_SWEEP_MS, "50"),
        ]))
        .unwrap();
        assert_eq!(c.data.max_batch_ops, 20);
        assert_eq!(c.data.ratelimit_failure_mode, FailureMode::FailClosed);
        assert!(!c.data.session_touch);
        assert_eq!(c.data.outbox_sweep, Duration::from_millis(50));
    }

    #[test]
    fn help_lists_every_variable_the_process_reads_with_its_real_default() {
        let problems = mesh_runtime::config::check_help(
            &Config::help(),
            &[("MESH_DATABASE_WRITE_URL", "postgres://h/db"), ("MESH_SESSION_ADDR", "127.0.0.1:50051")],
            |l| Ok((TelemetryConfig::from_lookup(l, "mesh-data")?, Config::from_lookup(l)?)),
        );
        assert_eq!(problems, Vec::<String>::new());
    }

    #[test]
    fn bad_values_name_their_key() {
        for (key, value) in [
            (keys::MAX_BATCH_OPS, "0"),
            (keys::RATELIMIT_FAILURE_MODE, "maybe"),
            (keys::SESSION_TOUCH, "sometimes"),
            (keys::OUTBOX_SWEEP_MS, "1"),
            (keys::OUTBOX_RETRY_MAX_MS, "10"),
            (keys::OUTBOX_LEASE_MS, "1000"),
        ] {
            assert_eq!(Config::from_lookup(&map(&[(key, value)])).unwrap_err().key, key, "{value}");
        }
        let mut m = map(&[]);
        m.remove("MESH_SESSION_ADDR");
        assert_eq!(Config::from_lookup(&m).unwrap_err().key, client_keys::SESSION_ADDR);
    }
}

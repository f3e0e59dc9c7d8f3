use std::time::Duration;

use mesh_runtime::{
    ConfigError, Lookup, LookupExt,
    config::{Var, VarGroup},
};
use secrecy::SecretString;

/// Keys read by [`DbConfig::from_lookup`]; [`DbConfig::vars`] lists them
/// with their defaults and meanings (`--help`, docs/CONFIGURATION.md).
pub mod keys {
    /// URL of the primary (writes, migrations).
    pub const WRITE_URL: &str = "MESH_DATABASE_WRITE_URL";
    /// Comma-separated URLs of replicas (reads). Empty: reads go to the primary.
    pub const READ_URLS: &str = "MESH_DATABASE_READ_URLS";
    /// Schema holding the service's tables (`search_path`); each service has its own default.
    pub const SCHEMA: &str = "MESH_DATABASE_SCHEMA";
    /// `application_name` of every connection.
    pub const APPLICATION_NAME: &str = "MESH_DATABASE_APPLICATION_NAME";
    /// Connections each pool keeps open.
    pub const MIN_CONNECTIONS: &str = "MESH_DATABASE_MIN_CONNECTIONS";
    /// Most connections per pool.
    pub const MAX_CONNECTIONS: &str = "MESH_DATABASE_MAX_CONNECTIONS";
    /// How long a caller may wait for a pooled connection (ms).
    pub const ACQUIRE_TIMEOUT_MS: &str = "MESH_DATABASE_ACQUIRE_TIMEOUT_MS";
    /// Idle connections above the minimum are closed after this long (ms).
    pub const IDLE_TIMEOUT_MS: &str = "MESH_DATABASE_IDLE_TIMEOUT_MS";
    /// Connections are recycled after this long (ms).
    pub const MAX_LIFETIME_MS: &str = "MESH_DATABASE_MAX_LIFETIME_MS";
    /// Server-side statement timeout (ms).
    pub const STATEMENT_TIMEOUT_MS: &str = "MESH_DATABASE_STATEMENT_TIMEOUT_MS";
    /// A replica further behind the primary than this many WAL bytes gets no reads.
    pub const MAX_REPLICA_LAG_BYTES: &str = "MESH_DATABASE_MAX_REPLICA_LAG_BYTES";
    /// A replica whose replay is further behind than this in time gets no reads (ms).
    pub const MAX_REPLICA_DELAY_MS: &str = "MESH_DATABASE_MAX_REPLICA_DELAY_MS";
    /// Longest wait for a replica to replay a consistency token (ms).
    pub const READ_WAIT_MS: &str = "MESH_DATABASE_READ_WAIT_MS";
    /// How often the primary and replicas are polled (ms).
    pub const REPLICA_POLL_MS: &str = "MESH_DATABASE_REPLICA_POLL_MS";
    /// How long start-up waits for the primary to run migrations (ms).
    pub const MIGRATE_TIMEOUT_MS: &str = "MESH_DATABASE_MIGRATE_TIMEOUT_MS";
    /// `on_start` (migrate at start) or `verify` (check, run no DDL).
    pub const MIGRATE: &str = "MESH_DATABASE_MIGRATE";
}

/// What a service does with its migrations at start (`MESH_DATABASE_MIGRATE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MigrateMode {
    /// `on_start`: run them as the login role (which must own the schema).
    #[default]
    OnStart,
    /// `verify`: run no DDL; check that every migration of the binary is
    /// applied with the same checksum, waiting up to the migrate timeout
    /// (the owner runs `<binary> migrate` beforehand).
    Verify,
}

impl MigrateMode {
    /// The setting's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::OnStart => "on_start",
            Self::Verify => "verify",
        }
    }
}

/// Defaults of [`DbConfig::from_lookup`], shown by `--help`.
mod defaults {
    use std::time::Duration;

    pub(super) const MIN_CONNECTIONS: u32 = 20;
    pub(super) const MAX_CONNECTIONS: u32 = 50;
    pub(super) const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(30);
    pub(super) const IDLE_TIMEOUT: Duration = Duration::from_secs(10 * 60);
    pub(super) const MAX_LIFETIME: Duration = Duration::from_secs(30 * 60);
    pub(super) const STATEMENT_TIMEOUT: Duration = Duration::from_secs(10);
    pub(super) const MAX_REPLICA_LAG_BYTES: u64 = 16 * 1024 * 1024;
    pub(super) const MAX_REPLICA_DELAY: Duration = Duration::from_secs(5);
    pub(super) const READ_WAIT: Duration = Duration::from_millis(50);
    pub(super) const REPLICA_POLL: Duration = Duration::from_millis(250);
    pub(super) const MIGRATE_TIMEOUT: Duration = Duration::from_secs(60);
}

/// How to reach PostgreSQL. URLs are secrets: they may carry passwords.
#[derive(Debug, Clone)]
pub struct DbConfig {
    /// The primary.
    pub write_url: SecretString,
    /// The replicas.
    pub read_urls: Vec<SecretString>,
    /// `search_path` for every connection; created by migrations if missing.
    pub schema: Option<String>,
    /// `application_name` of every connection; `None`: the name the service passes.
    pub application_name: Option<String>,
    /// Connections each pool keeps open.
    pub min_connections: u32,
    /// Most connections per pool.
    pub max_connections: u32,
    /// Pool acquire timeout.
    pub acquire_timeout: Duration,
    /// Idle connections above the minimum are closed after this long.
    pub idle_timeout: Duration,
    /// Connections are recycled after this long.
    pub max_lifetime: Duration,
    /// `statement_timeout` for every connection.
    pub statement_timeout: Duration,
    /// Replication lag bound in WAL bytes.
    pub max_replica_lag_bytes: u64,
    /// Replication lag bound in time.
    pub max_replica_delay: Duration,
    /// Longest wait of a read for a replica to replay its consistency token.
    pub read_wait: Duration,
    /// Poll period of the primary and the replicas.
    pub replica_poll: Duration,
    /// Start-up wait for the primary (and, with [`MigrateMode::Verify`], for
    /// the migrations to be applied).
    pub migrate_timeout: Duration,
    /// Whether start-up migrates or only checks.
    pub migrate: MigrateMode,
}

impl DbConfig {
    /// Reads the database settings (see [`keys`]); `MESH_DATABASE_WRITE_URL`
    /// is required. Tables live in `default_schema` unless
    /// `MESH_DATABASE_SCHEMA` says otherwise, so services sharing a database
    /// never share tables (nor sqlx's migration history).
    pub fn from_lookup(l: &impl Lookup, default_schema: &str) -> Result<Self, ConfigError> {
        use keys::*;
        let write_url = l.secret(WRITE_URL).ok_or_else(|| ConfigError::new(WRITE_URL, "is required"))?;
        let schema = l.string(SCHEMA).unwrap_or_else(|| default_schema.to_owned());
        if !is_identifier(&schema) {
            return Err(ConfigError::new(SCHEMA, "must be a plain identifier ([a-z_][a-z0-9_]*)"));
        }
        let application_name = l.string(APPLICATION_NAME);
        if application_name.as_ref().is_some_and(|n| n.len() > 63 || !n.is_ascii()) {
            return Err(ConfigError::new(APPLICATION_NAME, "must be at most 63 ASCII characters"));
        }
        let c = Self {
            write_url,
            read_urls: l.secret_list(READ_URLS),
            schema: Some(schema),
            application_name,
            min_connections: l.parse_or(MIN_CONNECTIONS, defaults::MIN_CONNECTIONS)?,
            max_connections: l.parse_or(MAX_CONNECTIONS, defaults::MAX_CONNECTIONS)?,
            acquire_timeout: l.millis_or(ACQUIRE_TIMEOUT_MS, defaults::ACQUIRE_TIMEOUT)?,
            idle_timeout: l.millis_or(IDLE_TIMEOUT_MS, defaults::IDLE_TIMEOUT)?,
            max_lifetime: l.millis_or(MAX_LIFETIME_MS, defaults::MAX_LIFETIME)?,
            statement_timeout: l.millis_or(STATEMENT_TIMEOUT_MS, defaults::STATEMENT_TIMEOUT)?,
            max_replica_lag_bytes: l.parse_or(MAX_REPLICA_LAG_BYTES, defaults::MAX_REPLICA_LAG_BYTES)?,
            max_replica_delay: l.millis_or(MAX_REPLICA_DELAY_MS, defaults::MAX_REPLICA_DELAY)?,
            read_wait: l.millis_or(READ_WAIT_MS, defaults::READ_WAIT)?,
            replica_poll: l.millis_or(REPLICA_POLL_MS, defaults::REPLICA_POLL)?,
            migrate_timeout: l.millis_or(MIGRATE_TIMEOUT_MS, defaults::MIGRATE_TIMEOUT)?,
            migrate: match l.string(MIGRATE).as_deref() {
                None | Some("on_start") => MigrateMode::OnStart,
                Some("verify") => MigrateMode::Verify,
                Some(_) => return Err(ConfigError::new(MIGRATE, "must be on_start or verify")),
            },
        };
        if c.max_connections == 0 {
            return Err(ConfigError::new(MAX_CONNECTIONS, "must be at least 1"));
        }
        if c.min_connections > c.max_connections {
            return Err(ConfigError::new(
                MIN_CONNECTIONS,
                format!("must be at most {MAX_CONNECTIONS} ({})", c.max_connections),
            ));
        }
        for (key, v) in [(ACQUIRE_TIMEOUT_MS, c.acquire_timeout), (REPLICA_POLL_MS, c.replica_poll)] {
            if v < Duration::from_millis(10) {
                return Err(ConfigError::new(key, "must be at least 10"));
            }
        }
        Ok(c)
    }

    /// The variables [`Self::from_lookup`] reads, for `--help`;
    /// `default_schema` as there.
    pub fn vars(default_schema: &str) -> VarGroup {
        use keys::*;
        VarGroup::new(
            "PostgreSQL",
            vec![
                Var::required(
                    WRITE_URL,
                    "URL of the primary: writes and migrations (a secret: never logged)",
                ),
                Var::unset(
                    READ_URLS,
                    "reads go to the primary",
                    "comma-separated URLs of streaming replicas that serve reads (secrets: never logged)",
                ),
                Var::value(
                    SCHEMA,
                    default_schema,
                    "schema of the service's tables (search_path); created by migrations",
                ),
                Var::unset(
                    APPLICATION_NAME,
                    "the binary's name",
                    "application_name of every connection, as pg_stat_activity shows it (at most 63 ASCII characters)",
                ),
                Var::value(
                    MIN_CONNECTIONS,
                    defaults::MIN_CONNECTIONS,
                    "connections each pool (the primary's, every replica's) keeps open",
                ),
                Var::value(MAX_CONNECTIONS, defaults::MAX_CONNECTIONS, "most connections of each pool"),
                Var::millis(
                    ACQUIRE_TIMEOUT_MS,
                    defaults::ACQUIRE_TIMEOUT,
                    "longest a call waits for a pooled connection (ms; the call's own deadline may be shorter)",
                ),
                Var::millis(
                    IDLE_TIMEOUT_MS,
                    defaults::IDLE_TIMEOUT,
                    "a connection idle this long is closed, down to the minimum (ms)",
                ),
                Var::millis(
                    MAX_LIFETIME_MS,
                    defaults::MAX_LIFETIME,
                    "a connection is recycled after this long (ms)",
                ),
                Var::millis(
                    STATEMENT_TIMEOUT_MS,
                    defaults::STATEMENT_TIMEOUT,
                    "server-side statement_timeout of every connection (ms)",
                ),
                Var::value(
                    MAX_REPLICA_LAG_BYTES,
                    defaults::MAX_REPLICA_LAG_BYTES,
                    "a replica further behind the primary than this many WAL bytes gets no reads",
                ),
                Var::millis(
                    MAX_REPLICA_DELAY_MS,
                    defaults::MAX_REPLICA_DELAY,
                    "a replica whose replay is this far behind in time gets no reads (ms)",
                ),
                Var::millis(
                    READ_WAIT_MS,
                    defaults::READ_WAIT,
                    "longest a read with a consistency token waits for a replica to replay it before it \
                     goes to the primary (ms)",
                ),
                Var::millis(
                    REPLICA_POLL_MS,
                    defaults::REPLICA_POLL,
                    "how often the primary and the replicas are polled: position, lag, health (ms)",
                ),
                Var::millis(
                    MIGRATE_TIMEOUT_MS,
                    defaults::MIGRATE_TIMEOUT,
                    "how long start-up waits for the primary to run (or, with verify, to have) the \
                     migrations (ms)",
                ),
                Var::value(
                    MIGRATE,
                    MigrateMode::OnStart.as_str(),
                    "on_start: run the migrations at start (the login role must own the schema); verify: \
                     run no DDL, only check that the schema has every migration of this binary, waiting up \
                     to the migrate timeout, else exit 1 (the owner runs `<binary> migrate` first)",
                ),
            ],
        )
    }

    /// Settings for the given URLs with defaults for the rest, sized for
    /// tests and tools: no warm connections, at most 16 per pool.
    pub fn new(write_url: impl Into<String>, read_urls: impl IntoIterator<Item = impl Into<String>>) -> Self {
        Self {
            write_url: SecretString::from(write_url.into()),
            read_urls: read_urls.into_iter().map(|u| SecretString::from(u.into())).collect(),
            schema: None,
            application_name: None,
            min_connections: 0,
            max_connections: 16,
            acquire_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            max_lifetime: Duration::from_secs(30 * 60),
            statement_timeout: Duration::from_secs(10),
            max_replica_lag_bytes: 16 * 1024 * 1024,
            max_replica_delay: Duration::from_secs(5),
            read_wait: Duration::from_millis(50),
            replica_poll: Duration::from_millis(100),
            migrate_timeout: Duration::from_secs(30),
            migrate: MigrateMode::OnStart,
        }
    }
}

/// `[a-z_][a-z0-9_]*`, at most 63 bytes: safe to splice into SQL unquoted.
pub(crate) fn is_identifier(s: &str) -> bool {
    let mut b = s.bytes();
    s.len() <= 63
        && b.next().is_some_and(|c| c.is_ascii_lowercase() || c == b'_')
        && b.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'_')
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn map(pairs: &[(&'static str, &str)]) -> HashMap<&'static str, String> {
        pairs.iter().map(|(k, v)| (*k, (*v).to_owned())).collect()
    }

    #[test]
    fn write_url_is_required_and_never_echoed() {
        assert_eq!(DbConfig::from_lookup(&map(&[]), "svc").unwrap_err().key, keys::WRITE_URL);
        let l = map(&[
            (keys::WRITE_URL, "postgres://u:hunter2@h/db"),
            (keys::READ_URLS, "postgres://u:hunter2@r1/db, postgres://u:hunter2@r2/db"),
        ]);
        let c = DbConfig::from_lookup(&l, "svc").unwrap();
        assert_eq!(c.schema.as_deref(), Some("svc"));
        assert_eq!(c.read_urls.len(), 2);
        assert!(!format!("{c:?}").contains("hunter2"));
    }

    #[test]
    fn pools_default_to_twenty_warm_fifty_at_most() {
        let c = DbConfig::from_lookup(&map(&[(keys::WRITE_URL, "postgres://h/db")]), "svc").unwrap();
        assert_eq!((c.min_connections, c.max_connections), (20, 50));
        assert_eq!(c.acquire_timeout, Duration::from_secs(30));
        assert_eq!(c.max_lifetime, Duration::from_secs(30 * 60));
        assert_eq!(c.idle_timeout, Duration::from_secs(10 * 60));
        let c = DbConfig::from_lookup(
            &map(&[
                (keys::WRITE_URL, "postgres://h/db"),
                (keys::MIN_CONNECTIONS, "2"),
                (keys::MAX_CONNECTIONS, "4"),
                (keys::READ_WAIT_MS, "7"),
                (keys::MAX_REPLICA_DELAY_MS, "900"),
                (keys::APPLICATION_NAME, "data-7f9c"),
            ]),
            "svc",
        )
        .unwrap();
        assert_eq!((c.min_connections, c.max_connections), (2, 4));
        assert_eq!(
            (c.read_wait, c.max_replica_delay),
            (Duration::from_millis(7), Duration::from_millis(900))
        );
        assert_eq!(c.application_name.as_deref(), Some("data-7f9c"));
        assert_eq!(c.migrate, MigrateMode::OnStart);
        let l = map(&[(keys::WRITE_URL, "postgres://h/db"), (keys::MIGRATE, "verify")]);
        assert_eq!(DbConfig::from_lookup(&l, "svc").unwrap().migrate, MigrateMode::Verify);
    }

    #[test]
    fn help_lists_every_variable_with_its_real_default() {
        let help = mesh_runtime::config::Help {
            binary: "mesh-test",
            about: "a test",
            commands: &[],
            groups: vec![DbConfig::vars("svc")],
        };
        let problems =
            mesh_runtime::config::check_help(&help, &[(keys::WRITE_URL, "postgres://h/db")], |l| {
                DbConfig::from_lookup(l, "svc")
            });
        assert_eq!(problems, Vec::<String>::new());
    }

    #[test]
    fn bad_values_name_their_key() {
        for (key, value) in [
            (keys::SCHEMA, "x; drop table y"),
            (keys::MIN_CONNECTIONS, "60"),
            (keys::MAX_CONNECTIONS, "0"),
            (keys::ACQUIRE_TIMEOUT_MS, "1"),
            (keys::READ_WAIT_MS, "soon"),
            (keys::APPLICATION_NAME, "ünïcode"),
            (keys::MIGRATE, "on-start"),
        ] {
            let l = map(&[(keys::WRITE_URL, "postgres://h/db"), (key, value)]);
            assert_eq!(DbConfig::from_lookup(&l, "svc").unwrap_err().key, key, "{value}");
        }
        assert!(is_identifier("t_abc123"));
        assert!(!is_identifier("1abc"));
    }
}

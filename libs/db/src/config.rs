use std::time::Duration;

use mesh_runtime::{ConfigError, Lookup, LookupExt};
use secrecy::SecretString;

/// Keys read by [`DbConfig::from_lookup`].
pub mod keys {
    /// URL of the primary (writes, migrations).
    pub const WRITE_URL: &str = "MESH_DATABASE_WRITE_URL";
    /// Comma-separated URLs of replicas (reads). Empty: reads go to the primary.
    pub const READ_URLS: &str = "MESH_DATABASE_READ_URLS";
    /// Schema holding the service's tables (`search_path`); each service has its own default.
    pub const SCHEMA: &str = "MESH_DATABASE_SCHEMA";
    /// Connections per pool.
    pub const MAX_CONNECTIONS: &str = "MESH_DATABASE_MAX_CONNECTIONS";
    /// How long a caller may wait for a pooled connection (ms).
    pub const ACQUIRE_TIMEOUT_MS: &str = "MESH_DATABASE_ACQUIRE_TIMEOUT_MS";
    /// Server-side statement timeout (ms).
    pub const STATEMENT_TIMEOUT_MS: &str = "MESH_DATABASE_STATEMENT_TIMEOUT_MS";
    /// A replica further behind the primary than this many WAL bytes gets no reads.
    pub const MAX_REPLICA_LAG_BYTES: &str = "MESH_DATABASE_MAX_REPLICA_LAG_BYTES";
    /// How often replicas are polled (ms).
    pub const REPLICA_POLL_MS: &str = "MESH_DATABASE_REPLICA_POLL_MS";
    /// How long start-up waits for the primary to run migrations (ms).
    pub const MIGRATE_TIMEOUT_MS: &str = "MESH_DATABASE_MIGRATE_TIMEOUT_MS";
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
    /// Connections per pool.
    pub max_connections: u32,
    /// Pool acquire timeout.
    pub acquire_timeout: Duration,
    /// `statement_timeout` for every connection.
    pub statement_timeout: Duration,
    /// Replication lag bound in WAL bytes.
    pub max_replica_lag_bytes: u64,
    /// Replica poll period.
    pub replica_poll: Duration,
    /// Start-up wait for the primary.
    pub migrate_timeout: Duration,
}

impl DbConfig {
    /// Reads the database settings; `MESH_DATABASE_WRITE_URL` is required.
    /// Tables live in `default_schema` unless `MESH_DATABASE_SCHEMA` says
    /// otherwise, so services sharing a database never share tables (nor
    /// sqlx's migration history).
    pub fn from_lookup(l: &impl Lookup, default_schema: &str) -> Result<Self, ConfigError> {
        let write_url =
            l.secret(keys::WRITE_URL).ok_or_else(|| ConfigError::new(keys::WRITE_URL, "is required"))?;
        let schema = l.string(keys::SCHEMA).unwrap_or_else(|| default_schema.to_owned());
        if !is_identifier(&schema) {
            return Err(ConfigError::new(keys::SCHEMA, "must be a plain identifier ([a-z_][a-z0-9_]*)"));
        }
        let schema = Some(schema);
        Ok(Self {
            write_url,
            read_urls: l.secret_list(keys::READ_URLS),
            schema,
            max_connections: l.parse_or(keys::MAX_CONNECTIONS, 32)?,
            acquire_timeout: l.millis_or(keys::ACQUIRE_TIMEOUT_MS, Duration::from_secs(2))?,
            statement_timeout: l.millis_or(keys::STATEMENT_TIMEOUT_MS, Duration::from_secs(10))?,
            max_replica_lag_bytes: l.parse_or(keys::MAX_REPLICA_LAG_BYTES, 16 * 1024 * 1024)?,
            replica_poll: l.millis_or(keys::REPLICA_POLL_MS, Duration::from_millis(250))?,
            migrate_timeout: l.millis_or(keys::MIGRATE_TIMEOUT_MS, Duration::from_secs(60))?,
        })
    }

    /// Settings for the given URLs with defaults for the rest.
    pub fn new(write_url: impl Into<String>, read_urls: impl IntoIterator<Item = impl Into<String>>) -> Self {
        Self {
            write_url: SecretString::from(write_url.into()),
            read_urls: read_urls.into_iter().map(|u| SecretString::from(u.into())).collect(),
            schema: None,
            max_connections: 16,
            acquire_timeout: Duration::from_secs(2),
            statement_timeout: Duration::from_secs(10),
            max_replica_lag_bytes: 16 * 1024 * 1024,
            replica_poll: Duration::from_millis(100),
            migrate_timeout: Duration::from_secs(30),
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

    #[test]
    fn write_url_is_required_and_never_echoed() {
        let empty: HashMap<&'static str, String> = HashMap::new();
        assert_eq!(DbConfig::from_lookup(&empty, "svc").unwrap_err().key, keys::WRITE_URL);
        let l: HashMap<&'static str, String> = [
            (keys::WRITE_URL, "postgres://u:hunter2@h/db".to_owned()),
            (keys::READ_URLS, "postgres://u:hunter2@r1/db, postgres://u:hunter2@r2/db".to_owned()),
        ]
        .into();
        let c = DbConfig::from_lookup(&l, "svc").unwrap();
        assert_eq!(c.schema.as_deref(), Some("svc"));
        assert_eq!(c.read_urls.len(), 2);
        assert!(!format!("{c:?}").contains("hunter2"));
    }

    #[test]
    fn schema_must_be_an_identifier() {
        let l: HashMap<&'static str, String> =
            [(keys::WRITE_URL, "postgres://h/db".to_owned()), (keys::SCHEMA, "x; drop table y".to_owned())]
                .into();
        assert_eq!(DbConfig::from_lookup(&l, "svc").unwrap_err().key, keys::SCHEMA);
        assert!(is_identifier("t_abc123"));
        assert!(!is_identifier("1abc"));
    }
}

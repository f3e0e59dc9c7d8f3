//! The Redis Cluster connection every Redis-backed service uses: a small
//! pool of fred cluster clients (each pipelines to every node), hard
//! command timeouts so a dead node never hangs a caller, and endless
//! reconnection with backoff. `rediss://` seed URLs make every connection
//! TLS (rustls), verified against `MESH_REDIS_CA_FILE` or the system's CAs.

use std::{path::PathBuf, sync::Arc, time::Duration};

use fred::{
    clients::Pool,
    interfaces::{ClientLike, ClusterInterface},
    types::config::{
        ClusterDiscoveryPolicy, Config, ConnectionConfig, PerformanceConfig, ReconnectPolicy, ServerConfig,
        TcpConfig, TlsConfig, TlsConnector, TlsHostMapping,
    },
};
use rustls::pki_types::{CertificateDer, pem::PemObject as _};
use secrecy::{ExposeSecret, SecretString};

use crate::{
    config::{ConfigError, Lookup, LookupExt},
    health::Check,
};

/// Keys read by [`RedisConfig::from_lookup`].
pub mod keys {
    /// Comma-separated cluster seed nodes, `host:port`, `redis://[user:pass@]host:port`
    /// or, for TLS, `rediss://[user:pass@]host:port` (all entries alike).
    pub const URLS: &str = "MESH_REDIS_URLS";
    /// PEM bundle of the CAs trusted for `rediss://` (default: the system's CAs).
    pub const CA_FILE: &str = "MESH_REDIS_CA_FILE";
    /// Prefix of every key the service writes (isolates tenants and tests).
    pub const KEY_PREFIX: &str = "MESH_REDIS_KEY_PREFIX";
    /// Clients in the pool.
    pub const POOL_SIZE: &str = "MESH_REDIS_POOL_SIZE";
    /// Default timeout of one command (ms).
    pub const COMMAND_TIMEOUT_MS: &str = "MESH_REDIS_COMMAND_TIMEOUT_MS";
    /// Timeout of one connection attempt (ms).
    pub const CONNECT_TIMEOUT_MS: &str = "MESH_REDIS_CONNECT_TIMEOUT_MS";
}

/// `MESH_REDIS_KEY_PREFIX` when unset.
pub const DEFAULT_KEY_PREFIX: &str = "mesh:";

/// How to reach the Redis Cluster.
#[derive(Debug, Clone)]
pub struct RedisConfig {
    /// Seed nodes; may hold credentials, hence secret. `rediss://` entries
    /// (all or none) make every connection TLS.
    pub urls: Vec<SecretString>,
    /// PEM bundle of the CAs that sign the servers' certificates under
    /// `rediss://`; `None`: the system's CAs. Read when the pool is built.
    pub ca_file: Option<PathBuf>,
    /// Prefix for every key, e.g. `mesh:`.
    pub key_prefix: String,
    /// Clients in the pool (each multiplexes all callers).
    pub pool_size: usize,
    /// Default command timeout.
    pub command_timeout: Duration,
    /// Connection attempt timeout.
    pub connect_timeout: Duration,
}

impl RedisConfig {
    /// Reads the Redis settings; `MESH_REDIS_URLS` is required.
    pub fn from_lookup(l: &impl Lookup) -> Result<Self, ConfigError> {
        let urls = l.secret_list(keys::URLS);
        if urls.is_empty() {
            return Err(ConfigError::new(keys::URLS, "is required"));
        }
        let d = Self::new(Vec::<String>::new(), DEFAULT_KEY_PREFIX);
        let c = Self {
            urls,
            ca_file: l.string(keys::CA_FILE).map(PathBuf::from),
            key_prefix: l.string(keys::KEY_PREFIX).unwrap_or(d.key_prefix),
            pool_size: l.parse_or(keys::POOL_SIZE, d.pool_size)?,
            command_timeout: l.millis_or(keys::COMMAND_TIMEOUT_MS, d.command_timeout)?,
            connect_timeout: l.millis_or(keys::CONNECT_TIMEOUT_MS, d.connect_timeout)?,
        };
        c.fred_config()?;
        Ok(c)
    }

    /// The variables [`Self::from_lookup`] reads, for `--help`.
    pub fn vars() -> crate::config::VarGroup {
        use crate::config::{Var, VarGroup};
        let d = Self::new(Vec::<String>::new(), DEFAULT_KEY_PREFIX);
        VarGroup::new(
            "Redis Cluster",
            vec![
                Var::required(
                    keys::URLS,
                    "comma-separated cluster seed nodes, host:port, redis://[user:pass@]host:port, or \
                     rediss://[user:pass@]host:port for TLS (all entries alike; a secret: never logged)",
                ),
                Var::unset(
                    keys::CA_FILE,
                    "the system's CAs",
                    "PEM bundle of the CAs trusted for rediss:// servers (read at start); cluster nodes \
                     announced by IP are verified against the seed's host name",
                ),
                Var::value(keys::KEY_PREFIX, d.key_prefix, "prefix of every key the service writes"),
                Var::value(
                    keys::POOL_SIZE,
                    d.pool_size,
                    "Redis clients, each pipelining every caller to every node",
                ),
                Var::millis(
                    keys::COMMAND_TIMEOUT_MS,
                    d.command_timeout,
                    "default timeout of one command (ms)",
                ),
                Var::millis(
                    keys::CONNECT_TIMEOUT_MS,
                    d.connect_timeout,
                    "timeout of one connection attempt (ms)",
                ),
            ],
        )
    }

    /// Settings for the given seed nodes with defaults for the rest.
    pub fn new(urls: impl IntoIterator<Item = impl Into<String>>, key_prefix: impl Into<String>) -> Self {
        Self {
            urls: urls.into_iter().map(|u| SecretString::from(u.into())).collect(),
            ca_file: None,
            key_prefix: key_prefix.into(),
            pool_size: 4,
            command_timeout: Duration::from_millis(500),
            connect_timeout: Duration::from_millis(1000),
        }
    }

    fn fred_config(&self) -> Result<Config, ConfigError> {
        let mut hosts = Vec::new();
        let mut creds = (None, None);
        let mut tls = None;
        for url in &self.urls {
            let url = url.expose_secret().trim();
            // TLS is set up below, from our own roots: fred's `rediss://`
            // parsing would load the system's CAs and pick a crypto provider.
            let (this_tls, rest) = match url.split_once("://") {
                Some((scheme, rest)) if scheme.eq_ignore_ascii_case("rediss") => (true, rest),
                Some((scheme, rest)) if scheme.eq_ignore_ascii_case("redis") => (false, rest),
                Some(_) => {
                    return Err(ConfigError::new(
                        keys::URLS,
                        "an entry's scheme is neither redis:// nor rediss://",
                    ));
                }
                None => (false, url),
            };
            if *tls.get_or_insert(this_tls) != this_tls {
                return Err(ConfigError::new(keys::URLS, "mixes rediss:// (TLS) and plaintext entries"));
            }
            // Never echo the URL: it may carry a password.
            let parsed = Config::from_url(&format!("redis://{rest}")).map_err(|_| {
                ConfigError::new(keys::URLS, "an entry is not host:port or redis[s]://[user:pass@]host:port")
            })?;
            if creds.1.is_none() {
                creds = (parsed.username.clone(), parsed.password.clone());
            }
            for h in parsed.server.hosts() {
                hosts.push((h.host.to_string(), h.port));
            }
        }
        Ok(Config {
            server: ServerConfig::Clustered {
                hosts: hosts.into_iter().map(Into::into).collect(),
                policy: ClusterDiscoveryPolicy::default(),
            },
            username: creds.0,
            password: creds.1,
            fail_fast: true,
            tls: if tls == Some(true) { Some(self.tls_config()?) } else { self.no_tls()? },
            ..Config::default()
        })
    }

    /// Plaintext: a CA file set anyway is a mistake worth refusing.
    fn no_tls(&self) -> Result<Option<TlsConfig>, ConfigError> {
        match self.ca_file {
            Some(_) => Err(ConfigError::new(
                keys::CA_FILE,
                format!("is set but {} are not rediss:// (TLS) URLs", keys::URLS),
            )),
            None => Ok(None),
        }
    }

    /// rustls with the ring provider (the one sqlx links too), verifying
    /// servers against [`Self::ca_file`] or the system's CAs. Cluster nodes
    /// that `CLUSTER SLOTS` names by IP are verified against the host name
    /// of the node that answered it (fred's `TlsHostMapping::DefaultHost`;
    /// nodes announced by host name keep theirs), so a certificate must name
    /// the seed host, e.g. the wildcard managed services issue.
    fn tls_config(&self) -> Result<TlsConfig, ConfigError> {
        let mut roots = rustls::RootCertStore::empty();
        match &self.ca_file {
            Some(path) => {
                let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
                    .and_then(|certs| certs.collect::<Result<_, _>>())
                    .map_err(|e| {
                        ConfigError::new(keys::CA_FILE, format!("cannot read {}: {e}", path.display()))
                    })?;
                let (added, _) = roots.add_parsable_certificates(certs);
                if added == 0 {
                    return Err(ConfigError::new(
                        keys::CA_FILE,
                        format!("{} holds no usable PEM certificate", path.display()),
                    ));
                }
            }
            None => {
                roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
                if roots.is_empty() {
                    return Err(ConfigError::new(
                        keys::CA_FILE,
                        "is unset and the system has no CA certificates: set it for rediss://",
                    ));
                }
            }
        }
        let config =
            rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .map_err(|e| ConfigError::new(keys::URLS, format!("TLS set-up failed: {e}")))?
                .with_root_certificates(roots)
                .with_no_client_auth();
        Ok(TlsConfig { connector: TlsConnector::from(config), hostnames: TlsHostMapping::DefaultHost })
    }
}

/// Redirections (`MOVED`, `ASK`) fred follows for a command: none.
///
/// fred 10.1 follows an `ASK` by writing `ASKING` to the target node's
/// connection and reading the *next frame* on it, while that connection
/// may have other commands' replies in flight: it takes one of them for
/// the `OK`, and from then on every reply on the connection belongs to the
/// command before it. Commands get other commands' answers or time out,
/// until the connection is dropped (readiness answered `cluster info
/// failed: Request timed out` for minutes after a slot migration, while the
/// cluster was ok). It also stalls the client's router while it reads,
/// behind whatever (a `WAIT`) is ahead on that connection.
///
/// With none followed, a command on a key of a slot in motion fails at
/// once with [`is_redirection`] (after a `MOVED` fred has already refreshed
/// its routing, so sending it again goes to the new owner; after an `ASK`
/// the slot is half-moved and the command can be sent again later).
/// Callers retry with [`retry_redirected`] or answer UNAVAILABLE.
pub const REDIRECTIONS: u32 = 0;

/// Whether `e` is a redirection fred did not follow ([`REDIRECTIONS`]) or a
/// `TRYAGAIN` (a multi-key command during a slot migration): the command
/// did not run and may be sent again.
pub fn is_redirection(e: &fred::error::Error) -> bool {
    let d = e.details();
    (*e.kind() == fred::error::ErrorKind::Routing && d.contains("redirections"))
        || d.starts_with("TRYAGAIN")
        || d.starts_with("MOVED")
        || d.starts_with("ASK")
}

/// Runs `op` until it succeeds, fails with something other than a
/// redirection ([`is_redirection`]), or `within` has
/// passed since the first attempt (then the last such error). Waits 1 ms,
/// doubling up to 50 ms, between attempts: a slot moves in milliseconds.
/// Only for commands that did nothing when they failed so (a redirection
/// always means the command did not run).
pub async fn retry_redirected<T, F, Fut>(within: Duration, mut op: F) -> Result<T, fred::error::Error>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, fred::error::Error>>,
{
    let deadline = tokio::time::Instant::now() + within;
    let mut pause = Duration::from_millis(1);
    loop {
        match op().await {
            Err(e) if is_redirection(&e) && tokio::time::Instant::now() + pause < deadline => {
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_millis(50));
            }
            r => return r,
        }
    }
}

/// Builds and starts the pool. Returns at once: connections are made in the
/// background and re-made forever, so a service can start (not ready) while
/// Redis is down.
pub fn connect(config: &RedisConfig) -> Result<Pool, ConfigError> {
    let fred_config = config.fred_config()?;
    let perf =
        PerformanceConfig { default_command_timeout: config.command_timeout, ..PerformanceConfig::default() };
    let conn = ConnectionConfig {
        connection_timeout: config.connect_timeout,
        internal_command_timeout: config.connect_timeout,
        // Retrying on another node after a MOVED/failover is fine; retrying
        // the same dead node until the deadline is not.
        max_command_attempts: 2,
        // Never follow a redirection (see `REDIRECTIONS`).
        max_redirections: REDIRECTIONS,
        tcp: TcpConfig { nodelay: Some(true), ..TcpConfig::default() },
        ..ConnectionConfig::default()
    };
    let pool = fred::types::Builder::from_config(fred_config)
        .set_performance_config(perf)
        .set_connection_config(conn)
        .set_policy(ReconnectPolicy::new_exponential(0, 50, 2_000, 2))
        .build_pool(config.pool_size.max(1))
        .map_err(|e| ConfigError::new(keys::URLS, format!("cannot build client: {}", e.details())))?;
    let _handles = pool.connect_pool();
    Ok(pool)
}

/// The `redis` dependency check: the cluster answers and reports
/// `cluster_state:ok`. Whether it gates readiness is the service's choice
/// (`Server::add_dependency`).
pub fn check(pool: &Pool) -> Check {
    let pool = pool.clone();
    Check::new("redis", move || {
        let client = pool.next().clone();
        async move {
            let info: String =
                client.cluster_info().await.map_err(|e| format!("cluster info failed: {}", e.details()))?;
            if info.lines().any(|l| l.trim() == "cluster_state:ok") {
                Ok(())
            } else {
                Err("cluster_state is not ok".to_owned())
            }
        }
    })
}

/// Waits until the pool is connected, or `timeout`.
pub async fn wait_connected(pool: &Pool, timeout: Duration) -> bool {
    tokio::time::timeout(timeout, pool.wait_for_connect()).await.is_ok_and(|r| r.is_ok())
}

/// A client span for one Redis round trip, with the OpenTelemetry database
/// semantic-convention attributes: `db.system.name = "redis"`,
/// `db.operation.name` (e.g. `EVALSHA`, `GET`) and, for scripts, the script's
/// name (never its arguments: keys and values can carry user data).
/// `server.address` / `server.port` are declared empty: [`span_at`] (or
/// [`record_server`]) fills them with the node that serves the call.
/// Instrument the future of the round trip with it.
pub fn span(operation: &'static str, script: Option<&'static str>) -> tracing::Span {
    let name = match script {
        Some(s) => format!("{operation} {s}"),
        None => operation.to_owned(),
    };
    tracing::info_span!(
        "redis",
        otel.name = %name,
        otel.kind = "client",
        otel.status_code = tracing::field::Empty,
        db.system = "redis",
        db.system.name = "redis",
        db.operation.name = operation,
        db.redis.script = script.unwrap_or(""),
        server.address = tracing::field::Empty,
        server.port = tracing::field::Empty,
    )
}

/// [`span`] for a call on hash slot `slot` (see [`slot_of`]), with
/// `server.address` / `server.port` of the node that owns the slot in
/// `client`'s cached cluster state (the seed node for a centralized client;
/// left empty while the client has no cluster state yet).
pub fn span_at(
    client: &impl ClusterInterface,
    operation: &'static str,
    script: Option<&'static str>,
    slot: u16,
) -> tracing::Span {
    let span = span(operation, script);
    // Not made (a dropped trace): skip the copy of the cluster's routing.
    if !span.is_disabled() {
        record_server(&span, client, slot);
    }
    span
}

/// The cluster hash slot of `key` (its `{hash tag}` if it has one).
pub fn slot_of(key: &str) -> u16 {
    fred::types::cluster::ClusterRouting::hash_key(key.as_bytes())
}

/// Records on `span` (made by [`span`]) the node that serves `slot`.
pub fn record_server(span: &tracing::Span, client: &impl ClusterInterface, slot: u16) {
    let server = match client.cached_cluster_state() {
        Some(routing) => routing.get_server(slot).map(|s| (s.host.to_string(), s.port)),
        None => match &client.client_config().server {
            ServerConfig::Centralized { server } => Some((server.host.to_string(), server.port)),
            _ => None,
        },
    };
    if let Some((host, port)) = server {
        span.record("server.address", host.as_str());
        span.record("server.port", i64::from(port));
    }
}

#[cfg(test)]
mod tests {
    use fred::error::{Error, ErrorKind};

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn redirections_are_sent_again_until_they_stop_or_time_runs_out() {
        assert!(is_redirection(&Error::new(ErrorKind::Routing, "Too many redirections.")));
        assert!(is_redirection(&Error::new(
            ErrorKind::Unknown,
            "TRYAGAIN Multiple keys request during rehashing"
        )));
        assert!(!is_redirection(&Error::new(ErrorKind::Timeout, "Request timed out.")));

        let mut attempts = 0;
        let r = retry_redirected(Duration::from_secs(1), || {
            attempts += 1;
            let n = attempts;
            async move {
                if n < 3 { Err(Error::new(ErrorKind::Routing, "Too many redirections.")) } else { Ok(n) }
            }
        })
        .await;
        assert_eq!(r.unwrap(), 3);

        let mut attempts = 0;
        let r: Result<(), _> = retry_redirected(Duration::from_millis(100), || {
            attempts += 1;
            async { Err(Error::new(ErrorKind::Routing, "Too many redirections.")) }
        })
        .await;
        assert!(r.is_err() && (3..20).contains(&attempts), "{attempts} attempts");

        let mut attempts = 0;
        let r: Result<(), _> = retry_redirected(Duration::from_secs(1), || {
            attempts += 1;
            async { Err(Error::new(ErrorKind::Timeout, "Request timed out.")) }
        })
        .await;
        assert!(r.is_err() && attempts == 1, "other errors are not sent again");
    }
}

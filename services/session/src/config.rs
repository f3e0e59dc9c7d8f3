//! Configuration from the environment.
//!
//! Besides the shared server (`MESH_LISTEN_ADDR`, …), Redis (`MESH_REDIS_*`)
//! and client (`MESH_RATELIMIT_ADDR`, `MESH_AUDIT_ADDR`, `MESH_CLIENT_*`)
//! settings, the session service reads `MESH_SESSION_*`.
//! [`SessionConfig::vars`] lists each with its default and meaning, and
//! [`Config::help`] every variable the process reads (`mesh-session --help`,
//! docs/CONFIGURATION.md).
//!
//! Without `MESH_RATELIMIT_ADDR`, CreateSession is not rate limited; without
//! `MESH_AUDIT_ADDR`, audit events wait in the outbox (up to its TTL) for an
//! instance that has it. Both are logged at startup.

use std::time::Duration;

use mesh_client::{ClientConfig, FailureMode};
use mesh_runtime::{
    ConfigError, Lookup, LookupExt, ServerConfig, TelemetryConfig,
    config::{Help, Var, VarGroup},
    redis::RedisConfig,
};
use secrecy::{ExposeSecret, SecretString};

use crate::authz::AuthzConfig;

/// Default gRPC port.
pub const DEFAULT_PORT: u16 = 50051;

/// Redis clients for validations when `MESH_REDIS_POOL_SIZE` is unset. One
/// fred client pipelines every caller over one connection per node; on the
/// 2-core benchmark one gave 6–11 % more uncached validations per second
/// than four (libs/bench/results/session.md), as it did for the rate-limit
/// service. Changes have their own clients (`MESH_SESSION_WRITE_POOL_SIZE`).
pub const DEFAULT_REDIS_POOL_SIZE: usize = 1;

/// Keys read by [`Config::from_lookup`] beyond the shared ones.
pub mod keys {
    /// Default idle timeout (ms).
    pub const IDLE_TIMEOUT_MS: &str = "MESH_SESSION_IDLE_TIMEOUT_MS";
    /// Default absolute lifetime (ms).
    pub const ABSOLUTE_TIMEOUT_MS: &str = "MESH_SESSION_ABSOLUTE_TIMEOUT_MS";
    /// Largest idle timeout per call (ms).
    pub const MAX_IDLE_TIMEOUT_MS: &str = "MESH_SESSION_MAX_IDLE_TIMEOUT_MS";
    /// Largest absolute lifetime per call (ms).
    pub const MAX_ABSOLUTE_TIMEOUT_MS: &str = "MESH_SESSION_MAX_ABSOLUTE_TIMEOUT_MS";
    /// Live sessions per user.
    pub const MAX_PER_USER: &str = "MESH_SESSION_MAX_PER_USER";
    /// Touch resolution (ms).
    pub const TOUCH_INTERVAL_MS: &str = "MESH_SESSION_TOUCH_INTERVAL_MS";
    /// Validation cache size (bytes, 0: off).
    pub const CACHE_MAX_BYTES: &str = "MESH_SESSION_CACHE_MAX_BYTES";
    /// Longest a cached validation is used (ms).
    pub const CACHE_TTL_MS: &str = "MESH_SESSION_CACHE_TTL_MS";
    /// Longest wait for revocation acknowledgements (ms).
    pub const INVALIDATION_TIMEOUT_MS: &str = "MESH_SESSION_INVALIDATION_TIMEOUT_MS";
    /// Replicas a change waits for.
    pub const WAIT_REPLICAS: &str = "MESH_SESSION_WAIT_REPLICAS";
    /// Longest wait for them (ms).
    pub const WAIT_TIMEOUT_MS: &str = "MESH_SESSION_WAIT_TIMEOUT_MS";
    /// Redis clients for changes.
    pub const WRITE_POOL_SIZE: &str = "MESH_SESSION_WRITE_POOL_SIZE";
    /// Rate-limit domain.
    pub const RATELIMIT_DOMAIN: &str = "MESH_SESSION_RATELIMIT_DOMAIN";
    /// `fail_closed` or `fail_open`.
    pub const RATELIMIT_FAILURE_MODE: &str = "MESH_SESSION_RATELIMIT_FAILURE_MODE";
    /// Rate-limit call timeout (ms).
    pub const RATELIMIT_TIMEOUT_MS: &str = "MESH_SESSION_RATELIMIT_TIMEOUT_MS";
    /// Key of the audit token hashes (secret).
    pub const AUDIT_HASH_KEY: &str = "MESH_SESSION_AUDIT_HASH_KEY";
    /// Audit Append timeout (ms).
    pub const AUDIT_TIMEOUT_MS: &str = "MESH_SESSION_AUDIT_TIMEOUT_MS";
    /// Outbox sweep period (ms).
    pub const OUTBOX_SWEEP_MS: &str = "MESH_SESSION_OUTBOX_SWEEP_MS";
    /// Events per drain.
    pub const OUTBOX_BATCH: &str = "MESH_SESSION_OUTBOX_BATCH";
    /// Buckets drained at once.
    pub const OUTBOX_CONCURRENCY: &str = "MESH_SESSION_OUTBOX_CONCURRENCY";
    /// Drain lease (ms).
    pub const OUTBOX_LEASE_MS: &str = "MESH_SESSION_OUTBOX_LEASE_MS";
    /// Longest delivery backoff (ms).
    pub const OUTBOX_RETRY_MAX_MS: &str = "MESH_SESSION_OUTBOX_RETRY_MAX_MS";
    /// Outbox expiry (ms).
    pub const OUTBOX_TTL_MS: &str = "MESH_SESSION_OUTBOX_TTL_MS";
    /// ext_authz: header carrying the user id upstream.
    pub const EXT_AUTHZ_USER_HEADER: &str = "MESH_SESSION_EXT_AUTHZ_USER_HEADER";
    /// ext_authz: header carrying the session id upstream.
    pub const EXT_AUTHZ_SESSION_HEADER: &str = "MESH_SESSION_EXT_AUTHZ_SESSION_HEADER";
    /// ext_authz: header carrying a denial's reason to the client.
    pub const EXT_AUTHZ_REASON_HEADER: &str = "MESH_SESSION_EXT_AUTHZ_REASON_HEADER";
    /// ext_authz: cookie holding the token when there is no bearer token.
    pub const EXT_AUTHZ_COOKIE: &str = "MESH_SESSION_EXT_AUTHZ_COOKIE";
    /// ext_authz: whether a check slides the idle expiry.
    pub const EXT_AUTHZ_TOUCH: &str = "MESH_SESSION_EXT_AUTHZ_TOUCH";
}

/// Shortest idle timeout or lifetime a call may ask for.
pub const MIN_TIMEOUT: Duration = Duration::from_secs(1);

/// The session service's own settings (see the module docs).
#[derive(Clone)]
pub struct SessionConfig {
    /// Default idle timeout.
    pub idle_timeout: Duration,
    /// Default absolute lifetime.
    pub absolute_timeout: Duration,
    /// Largest idle timeout per call.
    pub max_idle_timeout: Duration,
    /// Largest absolute lifetime per call.
    pub max_absolute_timeout: Duration,
    /// Live sessions per user.
    pub max_per_user: u32,
    /// Touch resolution.
    pub touch_interval: Duration,
    /// Validation cache size in bytes (0: off).
    pub cache_max_bytes: usize,
    /// Longest a cached validation is used.
    pub cache_ttl: Duration,
    /// Longest a revocation waits for every instance's acknowledgement.
    pub invalidation_timeout: Duration,
    /// Replicas a change waits for (0: none).
    pub wait_replicas: u32,
    /// Longest a change waits for them.
    pub wait_timeout: Duration,
    /// Redis clients for changes.
    pub write_pool_size: usize,
    /// Rate-limit domain.
    pub ratelimit_domain: String,
    /// What happens when the rate-limit service cannot decide.
    pub ratelimit_failure_mode: FailureMode,
    /// Longest wait for the rate-limit service.
    pub ratelimit_timeout: Duration,
    /// Key of the audit token hashes; `None`: random per process.
    pub audit_hash_key: Option<SecretString>,
    /// Deadline of one audit Append.
    pub audit_timeout: Duration,
    /// Outbox sweep period.
    pub outbox_sweep: Duration,
    /// Events per drain.
    pub outbox_batch: usize,
    /// Buckets drained at once.
    pub outbox_concurrency: usize,
    /// Drain lease.
    pub outbox_lease: Duration,
    /// First delivery backoff.
    pub outbox_retry_base: Duration,
    /// Longest delivery backoff.
    pub outbox_retry_max: Duration,
    /// Outbox expiry.
    pub outbox_ttl: Duration,
    /// Envoy ext_authz answers (`crate::authz`).
    pub ext_authz: AuthzConfig,
}

impl std::fmt::Debug for SessionConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionConfig")
            .field("idle_timeout", &self.idle_timeout)
            .field("absolute_timeout", &self.absolute_timeout)
            .field("max_idle_timeout", &self.max_idle_timeout)
            .field("max_absolute_timeout", &self.max_absolute_timeout)
            .field("max_per_user", &self.max_per_user)
            .field("touch_interval", &self.touch_interval)
            .field("cache_max_bytes", &self.cache_max_bytes)
            .field("cache_ttl", &self.cache_ttl)
            .field("invalidation_timeout", &self.invalidation_timeout)
            .field("wait_replicas", &self.wait_replicas)
            .field("wait_timeout", &self.wait_timeout)
            .field("write_pool_size", &self.write_pool_size)
            .field("ratelimit_domain", &self.ratelimit_domain)
            .field("ratelimit_failure_mode", &self.ratelimit_failure_mode)
            .field("ratelimit_timeout", &self.ratelimit_timeout)
            .field("audit_hash_key", &self.audit_hash_key.as_ref().map(|_| "[redacted]"))
            .field("audit_timeout", &self.audit_timeout)
            .field("outbox_sweep", &self.outbox_sweep)
            .field("outbox_batch", &self.outbox_batch)
            .field("outbox_concurrency", &self.outbox_concurrency)
            .field("outbox_lease", &self.outbox_lease)
            .field("outbox_retry_base", &self.outbox_retry_base)
            .field("outbox_retry_max", &self.outbox_retry_max)
            .field("outbox_ttl", &self.outbox_ttl)
            .field("ext_authz", &self.ext_authz)
            .finish()
    }
}

impl Default for SessionConfig {
    fn default() -> Self {
        Self {
            idle_timeout: Duration::from_secs(30 * 60),
            absolute_timeout: Duration::from_secs(12 * 3600),
            max_idle_timeout: Duration::from_secs(24 * 3600),
            max_absolute_timeout: Duration::from_secs(30 * 24 * 3600),
            max_per_user: 10,
            touch_interval: Duration::from_secs(60),
            cache_max_bytes: 64 << 20,
            cache_ttl: Duration::from_secs(30),
            invalidation_timeout: Duration::from_millis(250),
            wait_replicas: 1,
            wait_timeout: Duration::from_millis(100),
            write_pool_size: 2,
            ratelimit_domain: "session".to_owned(),
            ratelimit_failure_mode: FailureMode::FailClosed,
            ratelimit_timeout: Duration::from_millis(250),
            audit_hash_key: None,
            audit_timeout: Duration::from_secs(5),
            outbox_sweep: Duration::from_secs(10),
            outbox_batch: 100,
            outbox_concurrency: 8,
            outbox_lease: Duration::from_secs(15),
            outbox_retry_base: Duration::from_millis(500),
            outbox_retry_max: Duration::from_secs(30),
            outbox_ttl: Duration::from_secs(7 * 24 * 3600),
            ext_authz: AuthzConfig::default(),
        }
    }
}

impl SessionConfig {
    /// The `MESH_SESSION_*` variables [`Self::from_lookup`] reads, for `--help`.
    pub fn vars() -> VarGroup {
        use keys::*;
        let d = Self::default();
        VarGroup::new(
            "Sessions",
            vec![
                Var::millis(
                    IDLE_TIMEOUT_MS,
                    d.idle_timeout,
                    "idle timeout of a session that asks for none (ms)",
                ),
                Var::millis(
                    ABSOLUTE_TIMEOUT_MS,
                    d.absolute_timeout,
                    "absolute lifetime of a session that asks for none (ms)",
                ),
                Var::millis(
                    MAX_IDLE_TIMEOUT_MS,
                    d.max_idle_timeout,
                    "largest idle timeout a call may ask for (ms)",
                ),
                Var::millis(
                    MAX_ABSOLUTE_TIMEOUT_MS,
                    d.max_absolute_timeout,
                    "largest absolute lifetime a call may ask for (ms)",
                ),
                Var::value(
                    MAX_PER_USER,
                    d.max_per_user,
                    "live sessions per user; creating one more evicts the oldest",
                ),
                Var::millis(
                    TOUCH_INTERVAL_MS,
                    d.touch_interval,
                    "a touch is written only when the session was last seen longer ago than this, or a \
                     sixteenth of its idle timeout if smaller (ms)",
                ),
                Var::value(CACHE_MAX_BYTES, d.cache_max_bytes, "validation cache size (bytes; 0: no cache)"),
                Var::millis(
                    CACHE_TTL_MS,
                    d.cache_ttl,
                    "longest a validation is served from the cache (ms; a backstop: revocations invalidate \
                     at once)",
                ),
                Var::millis(
                    INVALIDATION_TIMEOUT_MS,
                    d.invalidation_timeout,
                    "longest a revocation waits for every instance to confirm its cache dropped the token (ms)",
                ),
                Var::value(
                    WAIT_REPLICAS,
                    d.wait_replicas,
                    "Redis replicas a change must reach (WAIT) before the call returns (0: don't wait)",
                ),
                Var::millis(
                    WAIT_TIMEOUT_MS,
                    d.wait_timeout,
                    "longest a change waits for them (ms); then it returns anyway and counts it",
                ),
                Var::value(
                    WRITE_POOL_SIZE,
                    d.write_pool_size,
                    "Redis clients for changes; each carries one change (script + WAIT) per master at a time",
                ),
                Var::value(
                    RATELIMIT_DOMAIN,
                    &d.ratelimit_domain,
                    "rate-limit domain of CreateSession (descriptors user_id, client_ip)",
                ),
                Var::value(
                    RATELIMIT_FAILURE_MODE,
                    d.ratelimit_failure_mode.label(),
                    "fail_closed: CreateSession answers UNAVAILABLE while the rate-limit service cannot \
                     decide; fail_open: creates go on unlimited",
                ),
                Var::millis(
                    RATELIMIT_TIMEOUT_MS,
                    d.ratelimit_timeout,
                    "longest CreateSession waits for the rate-limit service (ms)",
                ),
                Var::unset(
                    AUDIT_HASH_KEY,
                    "a random key per process (warned at start)",
                    "secret key (at least 16 bytes) of the salted token hashes in audit events; set the same \
                     on every instance so events correlate (a secret: never logged)",
                ),
                Var::millis(
                    AUDIT_TIMEOUT_MS,
                    d.audit_timeout,
                    "deadline of one audit Append from the outbox (ms)",
                ),
                Var::millis(
                    OUTBOX_SWEEP_MS,
                    d.outbox_sweep,
                    "how often every bucket's outbox is checked: depth and age metrics, missed \
                     notifications, retries (ms)",
                ),
                Var::value(OUTBOX_BATCH, d.outbox_batch, "most events one drain of one bucket delivers"),
                Var::value(OUTBOX_CONCURRENCY, d.outbox_concurrency, "buckets drained at once per instance"),
                Var::millis(
                    OUTBOX_LEASE_MS,
                    d.outbox_lease,
                    "a drain's claim on a bucket (ms); another instance takes over after it",
                ),
                Var::millis(
                    OUTBOX_RETRY_MAX_MS,
                    d.outbox_retry_max,
                    "longest backoff between failed deliveries (ms; from 500 ms, doubling, jittered)",
                ),
                Var::millis(OUTBOX_TTL_MS, d.outbox_ttl, "an outbox nobody drains expires after this (ms)"),
                Var::value(
                    EXT_AUTHZ_USER_HEADER,
                    &d.ext_authz.user_header,
                    "Envoy ext_authz: request header that carries the user id to the upstream (set over any \
                     copy the client sent)",
                ),
                Var::value(
                    EXT_AUTHZ_SESSION_HEADER,
                    &d.ext_authz.session_header,
                    "Envoy ext_authz: request header that carries the session id to the upstream (set over \
                     any copy the client sent)",
                ),
                Var::value(
                    EXT_AUTHZ_REASON_HEADER,
                    &d.ext_authz.reason_header,
                    "Envoy ext_authz: response header of a 401 saying why (missing_token, invalid_token)",
                ),
                Var::unset(
                    EXT_AUTHZ_COOKIE,
                    "no cookie: only Authorization: Bearer",
                    "Envoy ext_authz: cookie holding the token when the request has no bearer token",
                ),
                Var::value(
                    EXT_AUTHZ_TOUCH,
                    d.ext_authz.touch,
                    "Envoy ext_authz: whether a check slides the idle expiry (true/false; a route's \
                     context extension touch overrides it)",
                ),
            ],
        )
    }

    /// Reads the `MESH_SESSION_*` keys.
    pub fn from_lookup(l: &impl Lookup) -> Result<Self, ConfigError> {
        use keys::*;
        let d = Self::default();
        let failure_mode = FailureMode::from_lookup(l, RATELIMIT_FAILURE_MODE, d.ratelimit_failure_mode)?;
        let c = Self {
            idle_timeout: l.millis_or(IDLE_TIMEOUT_MS, d.idle_timeout)?,
            absolute_timeout: l.millis_or(ABSOLUTE_TIMEOUT_MS, d.absolute_timeout)?,
            max_idle_timeout: l.millis_or(MAX_IDLE_TIMEOUT_MS, d.max_idle_timeout)?,
            max_absolute_timeout: l.millis_or(MAX_ABSOLUTE_TIMEOUT_MS, d.max_absolute_timeout)?,
            max_per_user: l.parse_or(MAX_PER_USER, d.max_per_user)?,
            touch_interval: l.millis_or(TOUCH_INTERVAL_MS, d.touch_interval)?,
            cache_max_bytes: l.parse_or(CACHE_MAX_BYTES, d.cache_max_bytes)?,
            cache_ttl: l.millis_or(CACHE_TTL_MS, d.cache_ttl)?,
            invalidation_timeout: l.millis_or(INVALIDATION_TIMEOUT_MS, d.invalidation_timeout)?,
            wait_replicas: l.parse_or(WAIT_REPLICAS, d.wait_replicas)?,
            wait_timeout: l.millis_or(WAIT_TIMEOUT_MS, d.wait_timeout)?,
            write_pool_size: l.parse_or(WRITE_POOL_SIZE, d.write_pool_size)?,
            ratelimit_domain: l.string(RATELIMIT_DOMAIN).unwrap_or(d.ratelimit_domain),
            ratelimit_failure_mode: failure_mode,
            ratelimit_timeout: l.millis_or(RATELIMIT_TIMEOUT_MS, d.ratelimit_timeout)?,
            audit_hash_key: l.secret(AUDIT_HASH_KEY),
            audit_timeout: l.millis_or(AUDIT_TIMEOUT_MS, d.audit_timeout)?,
            outbox_sweep: l.millis_or(OUTBOX_SWEEP_MS, d.outbox_sweep)?,
            outbox_batch: l.parse_or(OUTBOX_BATCH, d.outbox_batch)?,
            outbox_concurrency: l.parse_or(OUTBOX_CONCURRENCY, d.outbox_concurrency)?,
            outbox_lease: l.millis_or(OUTBOX_LEASE_MS, d.outbox_lease)?,
            outbox_retry_base: d.outbox_retry_base,
            outbox_retry_max: l.millis_or(OUTBOX_RETRY_MAX_MS, d.outbox_retry_max)?,
            outbox_ttl: l.millis_or(OUTBOX_TTL_MS, d.outbox_ttl)?,
            ext_authz: AuthzConfig {
                user_header: header_name(l, EXT_AUTHZ_USER_HEADER, d.ext_authz.user_header)?,
                session_header: header_name(l, EXT_AUTHZ_SESSION_HEADER, d.ext_authz.session_header)?,
                reason_header: header_name(l, EXT_AUTHZ_REASON_HEADER, d.ext_authz.reason_header)?,
                cookie: match l.string(EXT_AUTHZ_COOKIE) {
                    None => None,
                    Some(c) if is_token(&c) => Some(c),
                    Some(_) => {
                        return Err(ConfigError::new(
                            EXT_AUTHZ_COOKIE,
                            "must be a cookie name (RFC 6265 token)",
                        ));
                    }
                },
                touch: l.parse_or(EXT_AUTHZ_TOUCH, d.ext_authz.touch)?,
            },
        };
        c.validate()?;
        Ok(c)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        use keys::*;
        let at_least = |key: &'static str, v: Duration, min: Duration| {
            if v < min {
                Err(ConfigError::new(key, format!("must be at least {}", min.as_millis())))
            } else {
                Ok(())
            }
        };
        at_least(IDLE_TIMEOUT_MS, self.idle_timeout, MIN_TIMEOUT)?;
        at_least(ABSOLUTE_TIMEOUT_MS, self.absolute_timeout, MIN_TIMEOUT)?;
        if self.idle_timeout > self.max_idle_timeout {
            return Err(ConfigError::new(MAX_IDLE_TIMEOUT_MS, format!("must be at least {IDLE_TIMEOUT_MS}")));
        }
        if self.absolute_timeout > self.max_absolute_timeout {
            return Err(ConfigError::new(
                MAX_ABSOLUTE_TIMEOUT_MS,
                format!("must be at least {ABSOLUTE_TIMEOUT_MS}"),
            ));
        }
        if self.max_per_user == 0 {
            return Err(ConfigError::new(MAX_PER_USER, "must be at least 1"));
        }
        if self.ratelimit_domain.len() > 256 {
            return Err(ConfigError::new(RATELIMIT_DOMAIN, "must be at most 256 bytes"));
        }
        if let Some(k) = &self.audit_hash_key
            && k.expose_secret().len() < 16
        {
            // Never echo the value.
            return Err(ConfigError::new(AUDIT_HASH_KEY, "must be at least 16 bytes long"));
        }
        at_least(RATELIMIT_TIMEOUT_MS, self.ratelimit_timeout, Duration::from_millis(1))?;
        at_least(INVALIDATION_TIMEOUT_MS, self.invalidation_timeout, Duration::from_millis(1))?;
        at_least(AUDIT_TIMEOUT_MS, self.audit_timeout, Duration::from_millis(1))?;
        at_least(OUTBOX_SWEEP_MS, self.outbox_sweep, Duration::from_millis(10))?;
        at_least(OUTBOX_LEASE_MS, self.outbox_lease, Duration::from_millis(100))?;
        at_least(OUTBOX_RETRY_MAX_MS, self.outbox_retry_max, self.outbox_retry_base)?;
        at_least(OUTBOX_TTL_MS, self.outbox_ttl, Duration::from_secs(60))?;
        for (key, v) in [
            (OUTBOX_BATCH, self.outbox_batch),
            (OUTBOX_CONCURRENCY, self.outbox_concurrency),
            (WRITE_POOL_SIZE, self.write_pool_size),
        ] {
            if v == 0 {
                return Err(ConfigError::new(key, "must be at least 1"));
            }
        }
        Ok(())
    }
}

/// An RFC 9110 token (header and cookie names).
fn is_token(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// A header name, lowercased (Envoy's header maps are lowercase).
fn header_name(l: &impl Lookup, key: &'static str, default: String) -> Result<String, ConfigError> {
    match l.string(key) {
        None => Ok(default),
        Some(v) if is_token(&v) => Ok(v.to_ascii_lowercase()),
        Some(_) => Err(ConfigError::new(key, "must be an HTTP header name (RFC 9110 token)")),
    }
}

/// The session service's configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Listeners, health, drain.
    pub server: ServerConfig,
    /// The Redis Cluster holding sessions.
    pub redis: RedisConfig,
    /// Where the rate-limit and audit services are, and the client stack's tuning.
    pub clients: ClientConfig,
    /// Timeouts, cap, cache, durability, rate limiting, audit.
    pub session: SessionConfig,
}

impl Config {
    /// `mesh-session --help`: every variable the process reads.
    pub fn help() -> Help {
        Help {
            binary: "mesh-session",
            about: "the session service (mesh.session.v1.SessionService and Envoy ext_authz, gRPC)",
            commands: &[],
            groups: vec![
                ServerConfig::vars(DEFAULT_PORT),
                TelemetryConfig::vars("mesh-session"),
                RedisConfig::vars()
                    .with_default(mesh_runtime::redis::keys::POOL_SIZE, DEFAULT_REDIS_POOL_SIZE),
                ClientConfig::vars([
                    None,
                    Some("CreateSession is not rate limited (logged at start)"),
                    Some("audit events wait in the outbox, up to its TTL, for an instance that has it"),
                    None,
                ]),
                SessionConfig::vars(),
            ],
        }
    }

    /// Reads the process environment.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(&mesh_runtime::Env)
    }

    /// Reads any [`Lookup`].
    pub fn from_lookup(l: &impl Lookup) -> Result<Self, ConfigError> {
        let mut redis = RedisConfig::from_lookup(l)?;
        if l.string(mesh_runtime::redis::keys::POOL_SIZE).is_none() {
            redis.pool_size = DEFAULT_REDIS_POOL_SIZE;
        }
        Ok(Self {
            server: ServerConfig::from_lookup(l, DEFAULT_PORT)?,
            redis,
            clients: ClientConfig::from_lookup(l)?,
            session: SessionConfig::from_lookup(l)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn map(pairs: &[(&'static str, &str)]) -> HashMap<&'static str, String> {
        let mut m: HashMap<&'static str, String> = pairs.iter().map(|(k, v)| (*k, (*v).to_owned())).collect();
        m.entry("MESH_REDIS_URLS").or_insert_with(|| "127.0.0.1:7000".to_owned());
        m
    }

    #[test]
    fn defaults_follow_the_issue() {
        let c = Config::from_lookup(&map(&[])).unwrap();
        let s = &c.session;
        assert_eq!(s.idle_timeout, Duration::from_secs(1800));
        assert_eq!(s.absolute_timeout, Duration::from_secs(12 * 3600));
        assert_eq!(s.max_per_user, 10);
        assert_eq!(s.ratelimit_failure_mode, FailureMode::FailClosed);
        assert!(c.clients.ratelimit.is_none() && c.clients.audit.is_none());
        assert_eq!(c.redis.pool_size, DEFAULT_REDIS_POOL_SIZE);
        let c = Config::from_lookup(&map(&[("MESH_REDIS_POOL_SIZE", "3")])).unwrap();
        assert_eq!(c.redis.pool_size, 3);
    }

    #[test]
    fn help_lists_every_variable_the_process_reads_with_its_real_default() {
        let problems = mesh_runtime::config::check_help(
            &Config::help(),
            &[("MESH_REDIS_URLS", "127.0.0.1:7000")],
            |l| Ok((TelemetryConfig::from_lookup(l, "mesh-session")?, Config::from_lookup(l)?)),
        );
        assert_eq!(problems, Vec::<String>::new());
    }

    #[test]
    fn every_key_is_read() {
        let c = Config::from_lookup(&map(&[
            (keys::IDLE_TIMEOUT_MS, "60000"),
            (keys::MAX_PER_USER, "3"),
            (keys::RATELIMIT_FAILURE_MODE, "fail_open"),
            (keys::CACHE_MAX_BYTES, "0"),
            (keys::WAIT_REPLICAS, "0"),
            (keys::AUDIT_HASH_KEY, "0123456789abcdef0123"),
            (keys::OUTBOX_SWEEP_MS, "200"),
            (keys::INVALIDATION_TIMEOUT_MS, "50"),
            ("MESH_AUDIT_ADDR", "127.0.0.1:50053"),
        ]))
        .unwrap();
        let s = &c.session;
        assert_eq!(s.idle_timeout, Duration::from_secs(60));
        assert_eq!((s.max_per_user, s.cache_max_bytes, s.wait_replicas), (3, 0, 0));
        assert_eq!(s.ratelimit_failure_mode, FailureMode::FailOpen);
        assert_eq!(s.outbox_sweep, Duration::from_millis(200));
        assert_eq!(s.invalidation_timeout, Duration::from_millis(50));
        assert!(c.clients.audit.is_some());
        assert!(!format!("{s:?}").contains("0123456789abcdef"), "the key never prints");
    }

    #[test]
    fn bad_values_name_their_key_and_never_echo_secrets() {
        for (key, value) in [
            (keys::IDLE_TIMEOUT_MS, "10"),
            (keys::MAX_IDLE_TIMEOUT_MS, "1000"),
            (keys::MAX_ABSOLUTE_TIMEOUT_MS, "1000"),
            (keys::MAX_PER_USER, "0"),
            (keys::RATELIMIT_FAILURE_MODE, "sometimes"),
            (keys::OUTBOX_BATCH, "0"),
            (keys::TOUCH_INTERVAL_MS, "soon"),
        ] {
            let err = Config::from_lookup(&map(&[(key, value)])).unwrap_err();
            assert_eq!(err.key, key, "{value:?}: {err}");
        }
        let err = Config::from_lookup(&map(&[(keys::AUDIT_HASH_KEY, "short-secret")])).unwrap_err();
        assert_eq!(err.key, keys::AUDIT_HASH_KEY);
        assert!(!err.to_string().contains("short-secret"));
    }
}

use std::{path::PathBuf, time::Duration};

pub use crate::rules::RateLimitHeaders;

use mesh_client::ClientConfig;
use mesh_runtime::{
    ConfigError, Lookup, LookupExt, ServerConfig, TelemetryConfig,
    config::{Help, Var, VarGroup},
    redis::RedisConfig,
};

/// Default gRPC port.
pub const DEFAULT_PORT: u16 = 50052;

/// Redis clients when `MESH_REDIS_POOL_SIZE` is unset. One fred client
/// already multiplexes every caller over one connection per node; a single
/// client pipelines more commands per write, and on the 2-core benchmark it
/// gave 15–45 % more Checks per second than four (libs/bench/results/ratelimit.md).
pub const DEFAULT_REDIS_POOL_SIZE: usize = 1;

/// `MESH_MAX_IN_FLIGHT` when unset: Checks (both APIs together) decided at
/// once. Bounding them bounds the Redis commands in flight, so that a Redis
/// round trip under load stays well inside the Redis deadline: without a
/// bound, queueing in this process pushed calls past the deadline at 512
/// callers and the instance fell back to local decisions at peak load. On
/// the 2-core benchmark machine 32 gave the most Checks decided by Redis (64
/// let 2-slot calls time out; 16 shed more than it served). The queue wait
/// is 250 ms here, not the runtime's 20: waiting costs nothing, shedding a call costs
/// about as much CPU as answering one, so a short wait against callers that
/// come straight back starves the admitted calls.
pub(crate) const MAX_IN_FLIGHT: usize = 32;

/// `MESH_QUEUE_WAIT_MS` when unset (see [`MAX_IN_FLIGHT`]).
pub(crate) const QUEUE_WAIT: Duration = Duration::from_millis(250);

/// Keys read by [`Config::from_lookup`] beyond the runtime's own.
pub mod keys {
    /// Rules file or directory (Envoy ratelimit YAML).
    pub const RULES: &str = "MESH_RATELIMIT_RULES";
    /// How often the rules path is checked for changes (ms).
    pub const RULES_POLL_MS: &str = "MESH_RATELIMIT_RULES_POLL_MS";
    /// Hard deadline of the Redis part of one Check (ms), after which the
    /// domain's failure mode decides.
    pub const REDIS_TIMEOUT_MS: &str = "MESH_RATELIMIT_REDIS_TIMEOUT_MS";
    /// The circuit breaker opens when fewer than this share of Redis calls
    /// (0.0–1.0) succeeded within the window.
    pub const BREAKER_SUCCESS_RATE: &str = "MESH_RATELIMIT_BREAKER_SUCCESS_RATE";
    /// Calls the window must hold before the breaker may open.
    pub const BREAKER_MIN_REQUESTS: &str = "MESH_RATELIMIT_BREAKER_MIN_REQUESTS";
    /// The window the success rate is measured over (ms, whole seconds).
    pub const BREAKER_WINDOW_MS: &str = "MESH_RATELIMIT_BREAKER_WINDOW_MS";
    /// How long the breaker first stays open (ms); repeated trips back off up to 8×.
    pub const BREAKER_OPEN_MS: &str = "MESH_RATELIMIT_BREAKER_OPEN_MS";
    /// Entries of the local cache of keys already over their limit (0 disables it).
    pub const LOCAL_CACHE_SIZE: &str = "MESH_RATELIMIT_LOCAL_CACHE_SIZE";
    /// Longest a key in the over-limit cache is refused without asking Redis
    /// (ms): bounds how long another instance's Reset goes unnoticed.
    pub const LOCAL_CACHE_RECHECK_MS: &str = "MESH_RATELIMIT_LOCAL_CACHE_RECHECK_MS";
    /// Keys the in-memory fallback limiter tracks at most.
    pub const FALLBACK_SIZE: &str = "MESH_RATELIMIT_FALLBACK_SIZE";
    /// RateLimit headers on Envoy RLS answers of domains whose rules do not
    /// say (`NONE` or `DRAFT_VERSION_03`).
    pub const RATE_LIMIT_HEADERS: &str = "MESH_RATELIMIT_RATE_LIMIT_HEADERS";
}

/// Tuning of the rate-limit engine.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Hard deadline of the Redis part of one Check. The default, 10 ms, is
    /// ten times a loaded Redis round trip on a LAN and half of Envoy's
    /// default rate-limit filter timeout (20 ms), so Envoy receives the
    /// domain's failure-mode answer instead of timing out itself.
    pub redis_timeout: Duration,
    /// The breaker opens below this success rate over the window. A rate,
    /// not a count of consecutive failures: at high concurrency one
    /// scheduling stall times out every call in flight at once, and that
    /// must not switch a whole instance to local decisions.
    pub breaker_success_rate: f64,
    /// Calls within the window before the breaker may open.
    pub breaker_min_requests: u32,
    /// The success-rate window.
    pub breaker_window: Duration,
    /// First open period of the breaker.
    pub breaker_open: Duration,
    /// Size of the over-limit cache (0: off).
    pub local_cache_size: usize,
    /// How long a cached over-limit key is refused before Redis is asked again.
    pub local_cache_recheck: Duration,
    /// Keys tracked by the fallback limiter.
    pub fallback_size: usize,
    /// Rules poll period.
    pub rules_poll: Duration,
    /// RateLimit headers on Envoy RLS answers (`response_headers_to_add`) of
    /// domains whose rules have no `rate_limit_headers` (default: none).
    pub rate_limit_headers: RateLimitHeaders,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            redis_timeout: Duration::from_millis(10),
            breaker_success_rate: 0.5,
            breaker_min_requests: 20,
            breaker_window: Duration::from_secs(2),
            breaker_open: Duration::from_millis(1000),
            local_cache_size: 100_000,
            local_cache_recheck: Duration::from_secs(1),
            fallback_size: 100_000,
            rules_poll: Duration::from_millis(1000),
            rate_limit_headers: RateLimitHeaders::None,
        }
    }
}

impl EngineConfig {
    /// The `MESH_RATELIMIT_*` variables [`Config::from_lookup`] reads, for `--help`.
    pub fn vars() -> VarGroup {
        use keys::*;
        let d = Self::default();
        VarGroup::new(
            "Rate limiting",
            vec![
                Var::unset(
                    RULES,
                    "no rules: every descriptor is allowed (warned at start)",
                    "rules file, or directory of files, in the Envoy ratelimit YAML format (several domains \
                     as documents separated by ---); hot-reloaded",
                ),
                Var::millis(
                    RULES_POLL_MS,
                    d.rules_poll,
                    "how often the rules path is checked for changes (ms)",
                ),
                Var::millis(
                    REDIS_TIMEOUT_MS,
                    d.redis_timeout,
                    "hard deadline of the Redis part of one Check (ms); then the domain's failure mode decides",
                ),
                Var::value(
                    BREAKER_SUCCESS_RATE,
                    d.breaker_success_rate,
                    "the Redis circuit breaker opens when fewer than this share (0.0 to 1.0) of Redis calls \
                     succeeded within the window",
                ),
                Var::value(
                    BREAKER_MIN_REQUESTS,
                    d.breaker_min_requests,
                    "calls the window must hold before the breaker may open",
                ),
                Var::millis(
                    BREAKER_WINDOW_MS,
                    d.breaker_window,
                    "the window the success rate is measured over (ms, whole seconds, at least 1000)",
                ),
                Var::millis(
                    BREAKER_OPEN_MS,
                    d.breaker_open,
                    "how long the breaker first stays open (ms); repeated trips back off up to 8x",
                ),
                Var::value(
                    LOCAL_CACHE_SIZE,
                    d.local_cache_size,
                    "entries of the local cache of keys already over their limit (0: off)",
                ),
                Var::millis(
                    LOCAL_CACHE_RECHECK_MS,
                    d.local_cache_recheck,
                    "longest a key in the over-limit cache is refused without asking Redis (ms): bounds how \
                     long another instance's Reset goes unnoticed",
                ),
                Var::value(
                    FALLBACK_SIZE,
                    d.fallback_size,
                    "keys the in-memory fallback limiter tracks at most",
                ),
                Var::value(
                    RATE_LIMIT_HEADERS,
                    d.rate_limit_headers.as_str(),
                    "RateLimit headers (x-ratelimit-limit, -remaining, -reset) on Envoy RLS answers: NONE or \
                     DRAFT_VERSION_03; a domain's rate_limit_headers in the rules overrides it",
                ),
            ],
        )
    }
}

/// The rate-limit service's configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Listeners, health, drain.
    pub server: ServerConfig,
    /// The Redis Cluster holding the counters.
    pub redis: RedisConfig,
    /// Where the rules are.
    pub rules: Option<PathBuf>,
    /// Deadlines, breaker, caches, reload.
    pub engine: EngineConfig,
    /// How refused admin RPCs (Reset) reach the audit service
    /// (`MESH_AUDIT_ADDR`, `MESH_CLIENT_*`); `None` (`MESH_AUDIT_ADDR`
    /// unset): they are logged and counted only.
    pub audit: Option<ClientConfig>,
}

impl Config {
    /// `mesh-ratelimit --help`: every variable the process reads.
    pub fn help() -> Help {
        Help {
            binary: "mesh-ratelimit",
            about: "the rate-limit service (mesh.ratelimit.v1.RateLimitService and Envoy's \
                    envoy.service.ratelimit.v3.RateLimitService, gRPC)",
            commands: &[],
            groups: vec![
                ServerConfig::vars(DEFAULT_PORT)
                    .with_default(mesh_runtime::config::keys::MAX_IN_FLIGHT, MAX_IN_FLIGHT)
                    .with_default(mesh_runtime::config::keys::QUEUE_WAIT_MS, QUEUE_WAIT.as_millis()),
                TelemetryConfig::vars("mesh-ratelimit"),
                RedisConfig::vars()
                    .with_default(mesh_runtime::redis::keys::POOL_SIZE, DEFAULT_REDIS_POOL_SIZE),
                EngineConfig::vars(),
                ClientConfig::vars([
                    None,
                    None,
                    Some("refused admin RPCs (Reset) are logged and counted, not audited (warned at start)"),
                    None,
                ]),
            ],
        }
    }

    /// Reads the process environment.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(&mesh_runtime::Env)
    }

    /// Reads any [`Lookup`].
    pub fn from_lookup(l: &impl Lookup) -> Result<Self, ConfigError> {
        let d = EngineConfig::default();
        let engine = EngineConfig {
            redis_timeout: l.millis_or(keys::REDIS_TIMEOUT_MS, d.redis_timeout)?,
            breaker_success_rate: l.parse_or(keys::BREAKER_SUCCESS_RATE, d.breaker_success_rate)?,
            breaker_min_requests: l.parse_or(keys::BREAKER_MIN_REQUESTS, d.breaker_min_requests)?,
            breaker_window: l.millis_or(keys::BREAKER_WINDOW_MS, d.breaker_window)?,
            breaker_open: l.millis_or(keys::BREAKER_OPEN_MS, d.breaker_open)?,
            local_cache_size: l.parse_or(keys::LOCAL_CACHE_SIZE, d.local_cache_size)?,
            local_cache_recheck: l.millis_or(keys::LOCAL_CACHE_RECHECK_MS, d.local_cache_recheck)?,
            fallback_size: l.parse_or(keys::FALLBACK_SIZE, d.fallback_size)?,
            rules_poll: l.millis_or(keys::RULES_POLL_MS, d.rules_poll)?,
            rate_limit_headers: match l.string(keys::RATE_LIMIT_HEADERS) {
                None => d.rate_limit_headers,
                Some(v) => RateLimitHeaders::parse(&v).ok_or_else(|| {
                    ConfigError::new(keys::RATE_LIMIT_HEADERS, "must be NONE or DRAFT_VERSION_03")
                })?,
            },
        };
        if engine.redis_timeout.is_zero() {
            return Err(ConfigError::new(keys::REDIS_TIMEOUT_MS, "must be at least 1"));
        }
        if !(0.0..=1.0).contains(&engine.breaker_success_rate) {
            return Err(ConfigError::new(keys::BREAKER_SUCCESS_RATE, "must be between 0 and 1"));
        }
        if engine.breaker_window < Duration::from_secs(1) {
            return Err(ConfigError::new(keys::BREAKER_WINDOW_MS, "must be at least 1000"));
        }
        if engine.breaker_open.is_zero() {
            return Err(ConfigError::new(keys::BREAKER_OPEN_MS, "must be at least 1"));
        }
        if engine.rules_poll.is_zero() {
            return Err(ConfigError::new(keys::RULES_POLL_MS, "must be at least 1"));
        }
        let mut redis = RedisConfig::from_lookup(l)?;
        if l.string(mesh_runtime::redis::keys::POOL_SIZE).is_none() {
            redis.pool_size = DEFAULT_REDIS_POOL_SIZE;
        }
        Ok(Self {
            server: ServerConfig::from_lookup_with(
                l,
                DEFAULT_PORT,
                mesh_runtime::Limits {
                    max_in_flight: MAX_IN_FLIGHT,
                    queue_wait: QUEUE_WAIT,
                    ..Default::default()
                },
            )?,
            redis,
            rules: l.string(keys::RULES).map(PathBuf::from),
            engine,
            audit: Some(ClientConfig::from_lookup(l)?).filter(|c| c.audit.is_some()),
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
    fn defaults_and_overrides() {
        let c = Config::from_lookup(&map(&[])).unwrap();
        assert_eq!(c.engine.redis_timeout, Duration::from_millis(10));
        assert_eq!(c.redis.pool_size, DEFAULT_REDIS_POOL_SIZE);
        assert!(c.rules.is_none());
        let c = Config::from_lookup(&map(&[
            (keys::REDIS_TIMEOUT_MS, "25"),
            (keys::RULES, "/etc/rules"),
            (keys::LOCAL_CACHE_SIZE, "0"),
            ("MESH_REDIS_POOL_SIZE", "3"),
        ]))
        .unwrap();
        assert_eq!(c.redis.pool_size, 3);
        assert_eq!(c.engine.redis_timeout, Duration::from_millis(25));
        assert_eq!(c.engine.local_cache_size, 0);
        assert_eq!(c.rules.as_deref(), Some(std::path::Path::new("/etc/rules")));
    }

    #[test]
    fn help_lists_every_variable_the_process_reads_with_its_real_default() {
        let problems = mesh_runtime::config::check_help(
            &Config::help(),
            &[("MESH_REDIS_URLS", "127.0.0.1:7000")],
            |l| Ok((TelemetryConfig::from_lookup(l, "mesh-ratelimit")?, Config::from_lookup(l)?)),
        );
        assert_eq!(problems, Vec::<String>::new());
    }

    #[test]
    fn bad_values_name_the_key() {
        let e = Config::from_lookup(&map(&[(keys::REDIS_TIMEOUT_MS, "0")])).unwrap_err();
        assert_eq!(e.key, keys::REDIS_TIMEOUT_MS);
        let e = Config::from_lookup(&map(&[(keys::BREAKER_SUCCESS_RATE, "1.5")])).unwrap_err();
        assert_eq!(e.key, keys::BREAKER_SUCCESS_RATE);
        let e = Config::from_lookup(&map(&[(keys::BREAKER_MIN_REQUESTS, "many")])).unwrap_err();
        assert_eq!(e.key, keys::BREAKER_MIN_REQUESTS);
    }
}

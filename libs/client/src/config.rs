//! Client configuration from the environment (or any [`Lookup`]).
//!
//! Where the services are: `MESH_SESSION_ADDR`, `MESH_RATELIMIT_ADDR`,
//! `MESH_AUDIT_ADDR`, `MESH_DATA_ADDR`, each a comma-separated list of
//! `host:port` / `http://host:port` / `dns:///host:port` entries; names are
//! re-resolved every `MESH_CLIENT_DNS_REFRESH_MS` (a Kubernetes headless
//! Service lists every ready pod).
//!
//! How calls behave: the `MESH_CLIENT_*` keys, every one optional and
//! shared by all clients. [`ClientConfig::vars`] lists every key with its
//! default and meaning (what `--help` and docs/CONFIGURATION.md show).

use std::time::Duration;

use mesh_runtime::{
    ConfigError, Lookup, LookupExt,
    config::{Var, VarGroup},
    tls::TlsConfig,
};
use mesh_tower::{BalanceConfig, BreakerConfig, ClientMetrics, DeadlineConfig, RetryConfig, Target};

use crate::Channel;

/// The keys read by [`ClientConfig::from_lookup`].
pub mod keys {
    /// Session service endpoints.
    pub const SESSION_ADDR: &str = "MESH_SESSION_ADDR";
    /// Rate-limit service endpoints.
    pub const RATELIMIT_ADDR: &str = "MESH_RATELIMIT_ADDR";
    /// Audit service endpoints.
    pub const AUDIT_ADDR: &str = "MESH_AUDIT_ADDR";
    /// Data service endpoints.
    pub const DATA_ADDR: &str = "MESH_DATA_ADDR";
    /// Default deadline (ms, 0: none).
    pub const TIMEOUT_MS: &str = "MESH_CLIENT_TIMEOUT_MS";
    /// Margin taken off inherited deadlines (ms).
    pub const DEADLINE_MARGIN_MS: &str = "MESH_CLIENT_DEADLINE_MARGIN_MS";
    /// Per-attempt timeout (ms).
    pub const PER_TRY_TIMEOUT_MS: &str = "MESH_CLIENT_PER_TRY_TIMEOUT_MS";
    /// Connect timeout (ms).
    pub const CONNECT_TIMEOUT_MS: &str = "MESH_CLIENT_CONNECT_TIMEOUT_MS";
    /// Attempts per call.
    pub const RETRY_MAX_ATTEMPTS: &str = "MESH_CLIENT_RETRY_MAX_ATTEMPTS";
    /// First retry backoff (ms).
    pub const RETRY_BACKOFF_BASE_MS: &str = "MESH_CLIENT_RETRY_BACKOFF_BASE_MS";
    /// Longest retry backoff (ms).
    pub const RETRY_BACKOFF_MAX_MS: &str = "MESH_CLIENT_RETRY_BACKOFF_MAX_MS";
    /// Retry budget, percent of calls.
    pub const RETRY_BUDGET_PERCENT: &str = "MESH_CLIENT_RETRY_BUDGET_PERCENT";
    /// Retries per second always allowed.
    pub const RETRY_BUDGET_MIN_PER_SEC: &str = "MESH_CLIENT_RETRY_BUDGET_MIN_PER_SEC";
    /// Largest replayable request body (bytes).
    pub const RETRY_BUFFER_BYTES: &str = "MESH_CLIENT_RETRY_BUFFER_BYTES";
    /// Consecutive failures opening a breaker.
    pub const BREAKER_CONSECUTIVE_FAILURES: &str = "MESH_CLIENT_BREAKER_CONSECUTIVE_FAILURES";
    /// Success rate (percent) under which a breaker opens.
    pub const BREAKER_MIN_SUCCESS_PERCENT: &str = "MESH_CLIENT_BREAKER_MIN_SUCCESS_PERCENT";
    /// Success-rate window (ms).
    pub const BREAKER_WINDOW_MS: &str = "MESH_CLIENT_BREAKER_WINDOW_MS";
    /// Calls in the window before the rate counts.
    pub const BREAKER_MIN_REQUESTS: &str = "MESH_CLIENT_BREAKER_MIN_REQUESTS";
    /// First open time (ms).
    pub const BREAKER_OPEN_MS: &str = "MESH_CLIENT_BREAKER_OPEN_MS";
    /// Longest open time (ms).
    pub const BREAKER_OPEN_MAX_MS: &str = "MESH_CLIENT_BREAKER_OPEN_MAX_MS";
    /// Probes at a time while half-open.
    pub const BREAKER_HALF_OPEN_PROBES: &str = "MESH_CLIENT_BREAKER_HALF_OPEN_PROBES";
    /// Least deadline left for a timeout to count against an endpoint (ms).
    pub const BREAKER_MIN_TIMEOUT_BUDGET_MS: &str = "MESH_CLIENT_BREAKER_MIN_TIMEOUT_BUDGET_MS";
    /// DNS re-resolution period (ms).
    pub const DNS_REFRESH_MS: &str = "MESH_CLIENT_DNS_REFRESH_MS";
}

/// How every layer of the stack behaves.
#[derive(Debug, Clone, PartialEq)]
pub struct StackConfig {
    /// Deadlines.
    pub deadline: DeadlineConfig,
    /// One attempt's limit (besides the call's deadline).
    pub per_try_timeout: Option<Duration>,
    /// TCP connect timeout.
    pub connect_timeout: Duration,
    /// Retries.
    pub retry: RetryConfig,
    /// Per-endpoint circuit breakers.
    pub breaker: BreakerConfig,
    /// Load estimates.
    pub balance: BalanceConfig,
    /// How often DNS names are resolved again.
    pub dns_refresh: Duration,
    /// Mutual TLS (`MESH_TLS_*`, the process's own certificate, see
    /// [`mesh_runtime::tls`]); `None`: plaintext.
    pub tls: Option<TlsConfig>,
}

impl Default for StackConfig {
    fn default() -> Self {
        Self {
            deadline: DeadlineConfig::default(),
            per_try_timeout: None,
            connect_timeout: Duration::from_secs(1),
            retry: RetryConfig::default(),
            breaker: BreakerConfig::default(),
            balance: BalanceConfig::default(),
            dns_refresh: Duration::from_secs(5),
            tls: None,
        }
    }
}

fn positive(key: &'static str, d: Duration) -> Result<Duration, ConfigError> {
    if d.is_zero() { Err(ConfigError::new(key, "must be greater than 0")) } else { Ok(d) }
}

impl StackConfig {
    /// Reads the `MESH_CLIENT_*` keys (see the module docs) and the
    /// `MESH_TLS_*` keys the server reads too ([`TlsConfig::from_lookup`];
    /// listed by `mesh_runtime::ServerConfig::vars`, not by [`Self::vars`]).
    pub fn from_lookup(l: &impl Lookup) -> Result<Self, ConfigError> {
        use keys::*;
        let d = Self::default();
        let timeout = l.millis_or(TIMEOUT_MS, d.deadline.default_timeout.unwrap_or_default())?;
        let max_attempts: u32 = l.parse_or(RETRY_MAX_ATTEMPTS, d.retry.max_attempts)?;
        if max_attempts == 0 {
            return Err(ConfigError::new(RETRY_MAX_ATTEMPTS, "must be at least 1"));
        }
        let budget_percent: f32 = l.parse_or(RETRY_BUDGET_PERCENT, d.retry.budget_ratio * 100.0)?;
        if !(0.0..=1000.0).contains(&budget_percent) {
            return Err(ConfigError::new(RETRY_BUDGET_PERCENT, "must be between 0 and 1000"));
        }
        let success_percent: f64 = l.parse_or(BREAKER_MIN_SUCCESS_PERCENT, d.breaker.success_rate * 100.0)?;
        if !(0.0..=100.0).contains(&success_percent) {
            return Err(ConfigError::new(BREAKER_MIN_SUCCESS_PERCENT, "must be between 0 and 100"));
        }
        let window = l.millis_or(BREAKER_WINDOW_MS, d.breaker.success_rate_window)?;
        if window < Duration::from_secs(1) {
            return Err(ConfigError::new(BREAKER_WINDOW_MS, "must be at least 1000"));
        }
        let open_base = positive(BREAKER_OPEN_MS, l.millis_or(BREAKER_OPEN_MS, d.breaker.open_base)?)?;
        let open_max = l.millis_or(BREAKER_OPEN_MAX_MS, d.breaker.open_max)?;
        if open_max < open_base {
            return Err(ConfigError::new(BREAKER_OPEN_MAX_MS, format!("must be at least {BREAKER_OPEN_MS}")));
        }
        let backoff_base = l.millis_or(RETRY_BACKOFF_BASE_MS, d.retry.backoff_base)?;
        let backoff_max = l.millis_or(RETRY_BACKOFF_MAX_MS, d.retry.backoff_max)?;
        if backoff_max < backoff_base {
            return Err(ConfigError::new(
                RETRY_BACKOFF_MAX_MS,
                format!("must be at least {RETRY_BACKOFF_BASE_MS}"),
            ));
        }
        let per_try = l.millis_or(PER_TRY_TIMEOUT_MS, Duration::ZERO)?;
        Ok(Self {
            deadline: DeadlineConfig {
                default_timeout: (!timeout.is_zero()).then_some(timeout),
                margin: l.millis_or(DEADLINE_MARGIN_MS, d.deadline.margin)?,
            },
            per_try_timeout: (!per_try.is_zero()).then_some(per_try),
            connect_timeout: positive(
                CONNECT_TIMEOUT_MS,
                l.millis_or(CONNECT_TIMEOUT_MS, d.connect_timeout)?,
            )?,
            retry: RetryConfig {
                max_attempts,
                backoff_base,
                backoff_max,
                budget_ratio: budget_percent / 100.0,
                budget_min_per_sec: l.parse_or(RETRY_BUDGET_MIN_PER_SEC, d.retry.budget_min_per_sec)?,
                buffer_limit: l.parse_or(RETRY_BUFFER_BYTES, d.retry.buffer_limit)?,
                ..d.retry
            },
            breaker: BreakerConfig {
                consecutive_failures: l
                    .parse_or(BREAKER_CONSECUTIVE_FAILURES, d.breaker.consecutive_failures)?
                    .max(1),
                success_rate: success_percent / 100.0,
                success_rate_window: window,
                success_rate_min_requests: l
                    .parse_or(BREAKER_MIN_REQUESTS, d.breaker.success_rate_min_requests)?,
                open_base,
                open_max,
                half_open_probes: l.parse_or(BREAKER_HALF_OPEN_PROBES, d.breaker.half_open_probes)?.max(1),
                min_timeout_budget: l
                    .millis_or(BREAKER_MIN_TIMEOUT_BUDGET_MS, d.breaker.min_timeout_budget)?,
                ..d.breaker
            },
            balance: d.balance,
            dns_refresh: positive(DNS_REFRESH_MS, l.millis_or(DNS_REFRESH_MS, d.dns_refresh)?)?,
            tls: TlsConfig::from_lookup(l)?,
        })
    }
}

/// Reads an endpoint list; `None` when the key is unset.
pub fn target_from_lookup(l: &impl Lookup, key: &'static str) -> Result<Option<Target>, ConfigError> {
    l.string(key).map(|v| v.parse().map_err(|e: String| ConfigError::new(key, e))).transpose()
}

/// The `--help` meaning of a service's endpoint list.
macro_rules! target_meaning {
    ($service:literal) => {
        concat!(
            "where the ",
            $service,
            " service is: comma-separated host:port, http://host:port or dns:///host:port entries; a name \
             is re-resolved every MESH_CLIENT_DNS_REFRESH_MS (a Kubernetes headless Service lists every \
             ready pod)"
        )
    };
}

impl StackConfig {
    /// The `MESH_CLIENT_*` variables [`Self::from_lookup`] reads, for `--help`.
    pub fn vars() -> Vec<Var> {
        use keys::*;
        let d = Self::default();
        vec![
            Var::millis(
                TIMEOUT_MS,
                d.deadline.default_timeout.unwrap_or_default(),
                "deadline of calls that set none and inherit none (ms; 0: none)",
            ),
            Var::millis(
                DEADLINE_MARGIN_MS,
                d.deadline.margin,
                "taken off an inherited deadline for the way back (ms)",
            ),
            Var::millis(
                PER_TRY_TIMEOUT_MS,
                d.per_try_timeout.unwrap_or_default(),
                "one attempt's limit, so a slow attempt can be retried (ms; 0: none)",
            ),
            Var::millis(CONNECT_TIMEOUT_MS, d.connect_timeout, "TCP connect timeout (ms)"),
            Var::value(RETRY_MAX_ATTEMPTS, d.retry.max_attempts, "attempts per call, the first included"),
            Var::millis(
                RETRY_BACKOFF_BASE_MS,
                d.retry.backoff_base,
                "first backoff between attempts (ms; doubles, plus 10-30 % jitter)",
            ),
            Var::millis(RETRY_BACKOFF_MAX_MS, d.retry.backoff_max, "longest backoff (ms)"),
            Var::value(
                RETRY_BUDGET_PERCENT,
                d.retry.budget_ratio * 100.0,
                "retries allowed on top of the calls, in percent",
            ),
            Var::value(
                RETRY_BUDGET_MIN_PER_SEC,
                d.retry.budget_min_per_sec,
                "retries per second always allowed",
            ),
            Var::value(
                RETRY_BUFFER_BYTES,
                d.retry.buffer_limit,
                "largest request body kept for replay (bytes)",
            ),
            Var::value(
                BREAKER_CONSECUTIVE_FAILURES,
                d.breaker.consecutive_failures,
                "failures in a row that open an endpoint's circuit breaker (only what says the endpoint \
                 is unhealthy: UNAVAILABLE, INTERNAL, UNKNOWN, DATA_LOSS, broken connections, timeouts \
                 with a fair budget; never a refusal such as RESOURCE_EXHAUSTED)",
            ),
            Var::value(
                BREAKER_MIN_SUCCESS_PERCENT,
                d.breaker.success_rate * 100.0,
                "success rate (percent) under which the breaker opens (0: off)",
            ),
            Var::millis(
                BREAKER_WINDOW_MS,
                d.breaker.success_rate_window,
                "success-rate window (ms, whole seconds, at least 1000)",
            ),
            Var::value(
                BREAKER_MIN_REQUESTS,
                d.breaker.success_rate_min_requests,
                "calls in the window before the success rate counts",
            ),
            Var::millis(
                BREAKER_OPEN_MS,
                d.breaker.open_base,
                "first open time (ms; doubles per re-opening, plus 10-30 % jitter)",
            ),
            Var::millis(BREAKER_OPEN_MAX_MS, d.breaker.open_max, "longest open time (ms)"),
            Var::value(
                BREAKER_HALF_OPEN_PROBES,
                d.breaker.half_open_probes,
                "calls let through at a time while half-open",
            ),
            Var::millis(
                BREAKER_MIN_TIMEOUT_BUDGET_MS,
                d.breaker.min_timeout_budget,
                "an attempt that starts with less of its call's deadline left and times out does not \
                 count against the endpoint: the caller's budget was too short (ms)",
            ),
            Var::millis(DNS_REFRESH_MS, d.dns_refresh, "how often names are resolved again (ms)"),
        ]
    }
}

/// Where the four services are and how to call them.
#[derive(Debug, Clone, PartialEq)]
pub struct ClientConfig {
    /// `MESH_SESSION_ADDR`.
    pub session: Option<Target>,
    /// `MESH_RATELIMIT_ADDR`.
    pub ratelimit: Option<Target>,
    /// `MESH_AUDIT_ADDR`.
    pub audit: Option<Target>,
    /// `MESH_DATA_ADDR`.
    pub data: Option<Target>,
    /// The `MESH_CLIENT_*` settings.
    pub stack: StackConfig,
}

impl ClientConfig {
    /// Reads the process environment.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(&mesh_runtime::Env)
    }

    /// The variables [`Self::from_lookup`] reads, for `--help`: where the
    /// services are (`unset` says what a service does without one; `None`:
    /// "not called") and the `MESH_CLIENT_*` stack settings.
    pub fn vars(unset: [Option<&str>; 4]) -> VarGroup {
        let [session, ratelimit, audit, data] = unset.map(|u| u.unwrap_or("not called").to_owned());
        let mut vars = vec![
            Var::unset(keys::SESSION_ADDR, session, target_meaning!("session")),
            Var::unset(keys::RATELIMIT_ADDR, ratelimit, target_meaning!("rate-limit")),
            Var::unset(keys::AUDIT_ADDR, audit, target_meaning!("audit")),
            Var::unset(keys::DATA_ADDR, data, target_meaning!("data")),
        ];
        vars.extend(StackConfig::vars());
        VarGroup::new("Calls to other services", vars)
    }

    /// Reads any [`Lookup`]. Addresses are optional here; a client's
    /// constructor fails when its own is missing.
    pub fn from_lookup(l: &impl Lookup) -> Result<Self, ConfigError> {
        Ok(Self {
            session: target_from_lookup(l, keys::SESSION_ADDR)?,
            ratelimit: target_from_lookup(l, keys::RATELIMIT_ADDR)?,
            audit: target_from_lookup(l, keys::AUDIT_ADDR)?,
            data: target_from_lookup(l, keys::DATA_ADDR)?,
            stack: StackConfig::from_lookup(l)?,
        })
    }

    /// The channel a typed client is built on: to `target` (the error names
    /// `key` when it is unset), with this configuration's stack, recording
    /// into `metrics`, repeating `idempotent` methods after they reached a
    /// server; with [`StackConfig::tls`], over mutual TLS (its files
    /// failing to load is an error naming the key). Call inside a Tokio runtime.
    pub(crate) fn channel(
        &self,
        upstream: &'static str,
        target: &Option<Target>,
        key: &'static str,
        metrics: &ClientMetrics,
        idempotent: &[&str],
    ) -> Result<Channel, ConfigError> {
        let target = target.clone().ok_or_else(|| ConfigError::new(key, "is required"))?;
        let mut builder = Channel::builder(upstream, target)
            .config(self.stack.clone())
            .metrics(metrics)
            .idempotent(idempotent.iter().copied());
        if let Some(tls) = &self.stack.tls {
            // Files that stopped loading since the configuration was read: a config error.
            builder = builder.tls(tls.load()?);
        }
        Ok(builder.build())
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
    fn defaults_apply_and_every_key_is_read() {
        let c = ClientConfig::from_lookup(&map(&[])).unwrap();
        assert_eq!(c.stack, StackConfig::default());
        assert_eq!(c.session, None);

        let c = ClientConfig::from_lookup(&map(&[
            (keys::RATELIMIT_ADDR, "http://ratelimit-headless:50052"),
            (keys::AUDIT_ADDR, "10.0.0.1:50053, 10.0.0.2:50053"),
            (keys::TIMEOUT_MS, "0"),
            (keys::DEADLINE_MARGIN_MS, "20"),
            (keys::PER_TRY_TIMEOUT_MS, "150"),
            (keys::RETRY_MAX_ATTEMPTS, "2"),
            (keys::RETRY_BUDGET_PERCENT, "5"),
            (keys::BREAKER_CONSECUTIVE_FAILURES, "3"),
            (keys::BREAKER_MIN_SUCCESS_PERCENT, "0"),
            (keys::BREAKER_OPEN_MS, "200"),
            (keys::BREAKER_OPEN_MAX_MS, "2000"),
            (keys::BREAKER_HALF_OPEN_PROBES, "2"),
            (keys::DNS_REFRESH_MS, "1000"),
        ]))
        .unwrap();
        assert_eq!(c.ratelimit.unwrap().to_string(), "ratelimit-headless:50052");
        assert_eq!(c.audit.unwrap().entries().len(), 2);
        let s = c.stack;
        assert_eq!(s.deadline, DeadlineConfig { default_timeout: None, margin: Duration::from_millis(20) });
        assert_eq!(s.per_try_timeout, Some(Duration::from_millis(150)));
        assert_eq!((s.retry.max_attempts, s.retry.budget_ratio), (2, 0.05));
        assert_eq!((s.breaker.consecutive_failures, s.breaker.success_rate), (3, 0.0));
        assert_eq!(
            (s.breaker.open_base, s.breaker.open_max),
            (Duration::from_millis(200), Duration::from_secs(2))
        );
        assert_eq!((s.breaker.half_open_probes, s.dns_refresh), (2, Duration::from_secs(1)));
    }

    #[test]
    fn help_lists_every_variable_with_its_real_default() {
        let help = mesh_runtime::config::Help {
            binary: "mesh-test",
            about: "a test",
            commands: &[],
            groups: vec![ClientConfig::vars([None; 4]), VarGroup::new("TLS", TlsConfig::vars())],
        };
        let problems = mesh_runtime::config::check_help(&help, &[], ClientConfig::from_lookup);
        assert_eq!(problems, Vec::<String>::new());
    }

    #[test]
    fn bad_values_name_their_key() {
        for (key, value) in [
            (keys::SESSION_ADDR, "https://session:443"),
            (keys::DATA_ADDR, "data"),
            (keys::TIMEOUT_MS, "5s"),
            (keys::RETRY_MAX_ATTEMPTS, "0"),
            (keys::RETRY_BUDGET_PERCENT, "-1"),
            (keys::BREAKER_MIN_SUCCESS_PERCENT, "120"),
            (keys::BREAKER_WINDOW_MS, "500"),
            (keys::BREAKER_OPEN_MS, "0"),
            (keys::BREAKER_OPEN_MAX_MS, "10"),
            (keys::RETRY_BACKOFF_MAX_MS, "1"),
            (keys::DNS_REFRESH_MS, "0"),
        ] {
            let err = ClientConfig::from_lookup(&map(&[(key, value)])).unwrap_err();
            assert_eq!(err.key, key, "{value:?}: {err}");
        }
    }
}

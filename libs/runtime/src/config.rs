//! Configuration from the environment, behind a lookup tests can fake.

use std::{collections::HashMap, fmt::Display, net::SocketAddr, str::FromStr, time::Duration};

use secrecy::SecretString;

/// Where configuration values come from: the process environment in
/// production, a map in tests.
pub trait Lookup {
    /// The value of `key`, if set.
    fn get(&self, key: &str) -> Option<String>;
}

/// The process environment.
#[derive(Debug, Clone, Copy, Default)]
pub struct Env;

impl Lookup for Env {
    fn get(&self, key: &str) -> Option<String> {
        std::env::var(key).ok()
    }
}

impl<S: std::hash::BuildHasher> Lookup for HashMap<String, String, S> {
    fn get(&self, key: &str) -> Option<String> {
        HashMap::get(self, key).cloned()
    }
}

impl<S: std::hash::BuildHasher> Lookup for HashMap<&'static str, String, S> {
    fn get(&self, key: &str) -> Option<String> {
        HashMap::get(self, key).cloned()
    }
}

/// A configuration value that is missing or cannot be parsed. The message
/// names the key and never carries the value when the key holds a secret.
#[derive(Debug, thiserror::Error)]
#[error("{key}: {reason}")]
pub struct ConfigError {
    /// The environment variable.
    pub key: &'static str,
    /// What is wrong with it.
    pub reason: String,
}

impl ConfigError {
    /// A new error for `key`.
    pub fn new(key: &'static str, reason: impl Into<String>) -> Self {
        Self { key, reason: reason.into() }
    }
}

/// Typed reads over a [`Lookup`]. Empty values count as unset.
pub trait LookupExt: Lookup {
    /// A non-empty string.
    fn string(&self, key: &'static str) -> Option<String> {
        self.get(key).map(|v| v.trim().to_owned()).filter(|v| !v.is_empty())
    }

    /// A required non-empty string.
    fn required(&self, key: &'static str) -> Result<String, ConfigError> {
        self.string(key).ok_or_else(|| ConfigError::new(key, "is required"))
    }

    /// A secret (a URL with a password, a token); its value never appears in errors.
    fn secret(&self, key: &'static str) -> Option<SecretString> {
        self.string(key).map(SecretString::from)
    }

    /// A value parsed with `FromStr`, or `default` when unset.
    fn parse_or<T>(&self, key: &'static str, default: T) -> Result<T, ConfigError>
    where
        T: FromStr,
        T::Err: Display,
    {
        match self.string(key) {
            None => Ok(default),
            Some(v) => v.parse().map_err(|e| ConfigError::new(key, format!("cannot parse {v:?}: {e}"))),
        }
    }

    /// A socket address, or `default` when unset.
    fn addr_or(&self, key: &'static str, default: &str) -> Result<SocketAddr, ConfigError> {
        let v = self.string(key).unwrap_or_else(|| default.to_owned());
        v.parse().map_err(|e| ConfigError::new(key, format!("cannot parse {v:?} as host:port: {e}")))
    }

    /// A duration in milliseconds, or `default` when unset.
    fn millis_or(&self, key: &'static str, default: Duration) -> Result<Duration, ConfigError> {
        match self.string(key) {
            None => Ok(default),
            Some(v) => v
                .parse::<u64>()
                .map(Duration::from_millis)
                .map_err(|e| ConfigError::new(key, format!("expected milliseconds, got {v:?}: {e}"))),
        }
    }

    /// A comma-separated list with empty items dropped.
    fn list(&self, key: &'static str) -> Vec<String> {
        self.string(key).map(|v| split_list(&v)).unwrap_or_default()
    }

    /// A comma-separated list of secrets (e.g. database URLs with passwords).
    fn secret_list(&self, key: &'static str) -> Vec<SecretString> {
        self.list(key).into_iter().map(SecretString::from).collect()
    }
}

impl<L: Lookup + ?Sized> LookupExt for L {}

/// Splits a comma-separated list, trimming items and dropping empty ones.
pub fn split_list(v: &str) -> Vec<String> {
    v.split(',').map(str::trim).filter(|s| !s.is_empty()).map(str::to_owned).collect()
}

/// Keys read by [`ServerConfig::from_lookup`].
pub mod keys {
    /// gRPC listen address.
    pub const LISTEN_ADDR: &str = "MESH_LISTEN_ADDR";
    /// Prometheus `/metrics` listen address.
    pub const METRICS_ADDR: &str = "MESH_METRICS_ADDR";
    /// How long in-flight calls get to finish after SIGTERM (ms).
    pub const SHUTDOWN_GRACE_MS: &str = "MESH_SHUTDOWN_GRACE_MS";
    /// How long to keep serving, NOT_SERVING, before closing listeners (ms),
    /// so load balancers see readiness drop before connections are refused.
    pub const DRAIN_DELAY_MS: &str = "MESH_DRAIN_DELAY_MS";
    /// How often dependencies are checked for readiness (ms).
    pub const HEALTH_INTERVAL_MS: &str = "MESH_HEALTH_INTERVAL_MS";
    /// How long one dependency check may take (ms).
    pub const HEALTH_TIMEOUT_MS: &str = "MESH_HEALTH_TIMEOUT_MS";
    /// Consecutive failed checks before readiness drops.
    pub const HEALTH_FAILURE_THRESHOLD: &str = "MESH_HEALTH_FAILURE_THRESHOLD";
}

/// What every server needs: where to listen and how to drain.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// gRPC listen address (`MESH_LISTEN_ADDR`).
    pub listen_addr: SocketAddr,
    /// Metrics listen address (`MESH_METRICS_ADDR`).
    pub metrics_addr: SocketAddr,
    /// Grace period for in-flight calls after shutdown starts.
    pub shutdown_grace: Duration,
    /// Delay between readiness going NOT_SERVING and the listeners closing.
    pub drain_delay: Duration,
    /// Readiness check period.
    pub health_interval: Duration,
    /// Timeout of one dependency check.
    pub health_timeout: Duration,
    /// Consecutive failures before a dependency counts as down.
    pub health_failure_threshold: u32,
}

impl ServerConfig {
    /// Reads the server settings; `default_port` is the service's gRPC port
    /// and its metrics port is `default_port + 1000`.
    pub fn from_lookup(l: &impl Lookup, default_port: u16) -> Result<Self, ConfigError> {
        Ok(Self {
            listen_addr: l.addr_or(keys::LISTEN_ADDR, &format!("0.0.0.0:{default_port}"))?,
            metrics_addr: l.addr_or(keys::METRICS_ADDR, &format!("0.0.0.0:{}", default_port + 1000))?,
            shutdown_grace: l.millis_or(keys::SHUTDOWN_GRACE_MS, Duration::from_secs(20))?,
            drain_delay: l.millis_or(keys::DRAIN_DELAY_MS, Duration::ZERO)?,
            health_interval: l.millis_or(keys::HEALTH_INTERVAL_MS, Duration::from_millis(1000))?,
            health_timeout: l.millis_or(keys::HEALTH_TIMEOUT_MS, Duration::from_millis(800))?,
            health_failure_threshold: l.parse_or(keys::HEALTH_FAILURE_THRESHOLD, 2)?.max(1),
        })
    }

    /// Settings for tests: both listeners on `127.0.0.1:0`, fast health checks, short grace.
    pub fn for_tests() -> Self {
        Self {
            listen_addr: ([127, 0, 0, 1], 0).into(),
            metrics_addr: ([127, 0, 0, 1], 0).into(),
            shutdown_grace: Duration::from_secs(5),
            drain_delay: Duration::ZERO,
            health_interval: Duration::from_millis(200),
            health_timeout: Duration::from_millis(500),
            health_failure_threshold: 1,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&'static str, &str)]) -> HashMap<&'static str, String> {
        pairs.iter().map(|(k, v)| (*k, (*v).to_owned())).collect()
    }

    #[test]
    fn server_defaults_follow_the_service_port() {
        let c = ServerConfig::from_lookup(&map(&[]), 50052).unwrap();
        assert_eq!(c.listen_addr, "0.0.0.0:50052".parse().unwrap());
        assert_eq!(c.metrics_addr, "0.0.0.0:51052".parse().unwrap());
        assert_eq!(c.health_failure_threshold, 2);
    }

    #[test]
    fn bad_values_name_the_key() {
        let err = ServerConfig::from_lookup(&map(&[(keys::LISTEN_ADDR, "nope")]), 1).unwrap_err();
        assert_eq!(err.key, keys::LISTEN_ADDR);
        let err = ServerConfig::from_lookup(&map(&[(keys::SHUTDOWN_GRACE_MS, "5s")]), 1).unwrap_err();
        assert_eq!(err.key, keys::SHUTDOWN_GRACE_MS);
    }

    #[test]
    fn lists_drop_empty_items() {
        let l = map(&[("K", " a, ,b ,")]);
        assert_eq!(l.list("K"), vec!["a", "b"]);
        assert!(map(&[("K", "  ")]).list("K").is_empty());
    }
}

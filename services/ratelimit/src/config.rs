use std::path::PathBuf;

use mesh_runtime::{ConfigError, Lookup, LookupExt, ServerConfig, redis::RedisConfig};

/// Default gRPC port.
pub const DEFAULT_PORT: u16 = 50052;

/// Keys read by [`Config::from_lookup`] beyond the runtime's own.
pub mod keys {
    /// Rules file or directory (Envoy ratelimit YAML).
    pub const RULES: &str = "MESH_RATELIMIT_RULES";
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
}

impl Config {
    /// Reads the process environment.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(&mesh_runtime::Env)
    }

    /// Reads any [`Lookup`].
    pub fn from_lookup(l: &impl Lookup) -> Result<Self, ConfigError> {
        Ok(Self {
            server: ServerConfig::from_lookup(l, DEFAULT_PORT)?,
            redis: RedisConfig::from_lookup(l)?,
            rules: l.string(keys::RULES).map(PathBuf::from),
        })
    }
}

use mesh_runtime::{ConfigError, Lookup, ServerConfig, redis::RedisConfig};

/// Default gRPC port.
pub const DEFAULT_PORT: u16 = 50051;

/// The session service's configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Listeners, health, drain.
    pub server: ServerConfig,
    /// The Redis Cluster holding sessions.
    pub redis: RedisConfig,
}

impl Config {
    /// Reads the process environment.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(&mesh_runtime::Env)
    }

    /// Reads any [`Lookup`].
    pub fn from_lookup(l: &impl Lookup) -> Result<Self, ConfigError> {
        Ok(Self { server: ServerConfig::from_lookup(l, DEFAULT_PORT)?, redis: RedisConfig::from_lookup(l)? })
    }
}

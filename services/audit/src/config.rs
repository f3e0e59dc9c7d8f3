use mesh_db::DbConfig;
use mesh_runtime::{ConfigError, Lookup, ServerConfig};

/// Default gRPC port.
pub const DEFAULT_PORT: u16 = 50053;

/// The audit service's configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Listeners, health, drain.
    pub server: ServerConfig,
    /// PostgreSQL primary (writes, migrations) and replicas (reads).
    pub db: DbConfig,
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
            db: DbConfig::from_lookup(l, "audit")?,
        })
    }
}

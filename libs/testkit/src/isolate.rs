//! Isolation between tests: a database schema or a Redis key prefix each.

use std::time::{SystemTime, UNIX_EPOCH};

use mesh_db::DbConfig;
use rand::Rng;
use sqlx::Connection;

use crate::Infra;

fn unique(prefix: &str) -> String {
    let secs = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
    let r: u32 = rand::rng().random();
    format!("{prefix}{secs}_{r:08x}")
}

/// A Redis key prefix no other test uses, e.g. `t1732370000_1a2b3c4d:`.
pub fn redis_prefix() -> String {
    format!("{}:", unique("t"))
}

/// A database schema of one test's own (`t_<unix time>_<random>`), on the
/// primary and, through replication, the replica.
#[derive(Debug, Clone)]
pub struct TestDb {
    /// The schema name.
    pub schema: String,
    /// Settings for a service using it (primary + replica, `search_path` set).
    pub config: DbConfig,
}

impl TestDb {
    /// Creates a fresh schema. Schemas left by runs more than a day old are dropped.
    pub async fn new(infra: &Infra) -> anyhow::Result<Self> {
        let schema = unique("t_");
        let mut conn = sqlx::PgConnection::connect(&infra.pg_primary_url()).await?;
        sqlx::query(&format!("create schema {schema}")).execute(&mut conn).await?;
        drop_stale(&mut conn).await;
        Ok(Self { config: infra.db_config(&schema), schema })
    }
}

async fn drop_stale(conn: &mut sqlx::PgConnection) {
    let cutoff = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs() - 86_400;
    let Ok(names) = sqlx::query_scalar::<_, String>(
        "select nspname::text from pg_namespace where nspname ~ '^t_[0-9]+_[0-9a-f]{8}$'",
    )
    .fetch_all(&mut *conn)
    .await
    else {
        return;
    };
    for name in names {
        let ts: u64 = name[2..].split('_').next().and_then(|t| t.parse().ok()).unwrap_or(u64::MAX);
        if ts < cutoff {
            let _ = sqlx::query(&format!("drop schema if exists {name} cascade")).execute(&mut *conn).await;
        }
    }
}

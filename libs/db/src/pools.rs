use std::{
    str::FromStr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use mesh_runtime::Check;
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use secrecy::ExposeSecret;
use sqlx::{
    Executor, PgPool,
    migrate::Migrator,
    postgres::{PgConnectOptions, PgPoolOptions},
};

use crate::{DbConfig, Lsn, config::is_identifier};

/// Database errors outside of queries.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// A URL could not be parsed (the URL itself is never shown).
    #[error("{key} is not a valid postgres URL")]
    Url {
        /// The configuration key.
        key: &'static str,
    },
    /// Migrations failed.
    #[error("migrations failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// A query failed.
    #[error(transparent)]
    Sqlx(#[from] sqlx::Error),
    /// The primary did not answer before the deadline.
    #[error("primary unreachable for {0:?}: {1}")]
    Unreachable(Duration, String),
}

/// Where a read was served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServedBy {
    /// The primary.
    Primary,
    /// A replica.
    Replica,
}

impl ServedBy {
    /// `primary` or `replica`, as in `x-mesh-served-by`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Primary => "primary",
            Self::Replica => "replica",
        }
    }
}

/// A pool to read from, and where it is.
#[derive(Debug, Clone)]
pub struct Reader {
    /// The pool.
    pub pool: PgPool,
    /// Primary or replica.
    pub served_by: ServedBy,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReadLabels {
    served_by: &'static str,
    reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReplicaLabels {
    replica: String,
}

#[derive(Debug, Clone, Default)]
struct Metrics {
    reads: Family<ReadLabels, Counter>,
    replica_up: Family<ReplicaLabels, Gauge>,
    replica_lag: Family<ReplicaLabels, Gauge>,
}

#[derive(Debug)]
struct Replica {
    /// host:port, never the URL (it may carry a password).
    name: String,
    pool: PgPool,
    healthy: AtomicBool,
    replay_lsn: AtomicU64,
}

#[derive(Debug)]
struct Inner {
    primary: PgPool,
    replicas: Vec<Replica>,
    next: AtomicUsize,
    schema: Option<String>,
    max_lag: u64,
    metrics: Metrics,
}

/// The primary pool, the replica pools and the routing between them.
#[derive(Debug, Clone)]
pub struct Db {
    inner: Arc<Inner>,
}

fn options(
    url: &str,
    key: &'static str,
    config: &DbConfig,
    app: &str,
    role: Option<&str>,
) -> Result<PgConnectOptions, DbError> {
    let mut opts = PgConnectOptions::from_str(url).map_err(|_| DbError::Url { key })?.application_name(app);
    let timeout = config.statement_timeout.as_millis().to_string();
    let mut settings = vec![("statement_timeout", timeout)];
    if let Some(schema) = &config.schema {
        settings.push(("search_path", schema.clone()));
    }
    if let Some(role) = role {
        // `role` is the setting behind SET ROLE: in the startup packet it is
        // in force before the first statement, with no extra round trip.
        settings.push(("role", role.to_owned()));
    }
    opts = opts.options(settings);
    Ok(opts)
}

fn pool(opts: PgConnectOptions, config: &DbConfig) -> PgPool {
    PgPoolOptions::new()
        .max_connections(config.max_connections)
        .min_connections(0)
        .acquire_timeout(config.acquire_timeout)
        // A dead connection fails its query and is dropped; pinging before
        // every acquire would add a round trip to every call.
        .test_before_acquire(false)
        .idle_timeout(Some(Duration::from_secs(60)))
        .max_lifetime(Some(Duration::from_secs(30 * 60)))
        .connect_lazy_with(opts)
}

impl Db {
    /// Creates the pools (connections are made on first use, so this works
    /// while the database is down), registers metrics and starts the replica monitor.
    pub fn connect(config: &DbConfig, app: &str, registry: &mut Registry) -> Result<Self, DbError> {
        Self::connect_with_role(config, app, registry, None)
    }

    /// As [`Db::connect`], but every connection (primary and replicas) runs
    /// as `role` (`SET ROLE` at connect time, through the startup options),
    /// so a service can log in as a schema owner yet hold only the privileges
    /// it was granted. The login role must be a member of `role`. Migrations
    /// need the owner: run them through a separate [`Db::connect`].
    pub fn connect_as(
        config: &DbConfig,
        app: &str,
        registry: &mut Registry,
        role: &str,
    ) -> Result<Self, DbError> {
        Self::connect_with_role(config, app, registry, Some(role))
    }

    fn connect_with_role(
        config: &DbConfig,
        app: &str,
        registry: &mut Registry,
        role: Option<&str>,
    ) -> Result<Self, DbError> {
        let primary_opts =
            options(config.write_url.expose_secret(), crate::keys::WRITE_URL, config, app, role)?;
        let primary = pool(primary_opts, config);
        let mut replicas = Vec::new();
        for url in &config.read_urls {
            let opts = options(url.expose_secret(), crate::keys::READ_URLS, config, app, role)?;
            let name = format!("{}:{}", opts.get_host(), opts.get_port());
            replicas.push(Replica {
                name,
                pool: pool(opts, config),
                healthy: AtomicBool::new(false),
                replay_lsn: AtomicU64::new(0),
            });
        }
        let metrics = Metrics::default();
        registry.register(
            "mesh_db_reads",
            "Read routing decisions by target and reason",
            metrics.reads.clone(),
        );
        registry.register(
            "mesh_db_replica_up",
            "1 when a replica answers and is within the lag bound",
            metrics.replica_up.clone(),
        );
        registry.register(
            "mesh_db_replica_lag_bytes",
            "WAL bytes a replica is behind the primary",
            metrics.replica_lag.clone(),
        );
        let db = Self {
            inner: Arc::new(Inner {
                primary,
                replicas,
                next: AtomicUsize::new(0),
                schema: config.schema.clone(),
                max_lag: config.max_replica_lag_bytes,
                metrics,
            }),
        };
        if !db.inner.replicas.is_empty() {
            tokio::spawn(monitor(Arc::downgrade(&db.inner), config.replica_poll));
        }
        Ok(db)
    }

    /// The primary: every write, and reads that must see the latest state.
    pub fn primary(&self) -> &PgPool {
        &self.inner.primary
    }

    /// A healthy replica, else the primary.
    pub fn reader(&self) -> Reader {
        self.route(None)
    }

    /// A healthy replica that has replayed `lsn`, else the primary.
    pub fn reader_at(&self, lsn: Lsn) -> Reader {
        self.route(Some(lsn))
    }

    fn route(&self, at: Option<Lsn>) -> Reader {
        let inner = &self.inner;
        let n = inner.replicas.len();
        let reason = if n == 0 {
            "no_replicas"
        } else {
            let start = inner.next.fetch_add(1, Ordering::Relaxed);
            let mut any_healthy = false;
            for i in 0..n {
                let r = &inner.replicas[(start + i) % n];
                if !r.healthy.load(Ordering::Acquire) {
                    continue;
                }
                any_healthy = true;
                if at.is_none_or(|lsn| r.replay_lsn.load(Ordering::Acquire) >= lsn.0) {
                    self.count(ServedBy::Replica, "replica");
                    return Reader { pool: r.pool.clone(), served_by: ServedBy::Replica };
                }
            }
            if any_healthy { "replica_behind_token" } else { "replicas_unhealthy" }
        };
        self.count(ServedBy::Primary, reason);
        Reader { pool: inner.primary.clone(), served_by: ServedBy::Primary }
    }

    fn count(&self, served_by: ServedBy, reason: &'static str) {
        self.inner.metrics.reads.get_or_create(&ReadLabels { served_by: served_by.as_str(), reason }).inc();
    }

    /// The primary's current WAL write position: after a commit, a token that
    /// covers it.
    pub async fn current_lsn<'e, E>(executor: E) -> Result<Lsn, sqlx::Error>
    where
        E: Executor<'e, Database = sqlx::Postgres>,
    {
        let text: String =
            sqlx::query_scalar("select pg_current_wal_lsn()::text").fetch_one(executor).await?;
        text.parse().map_err(|e| sqlx::Error::Decode(Box::new(e)))
    }

    /// Creates the schema (if one is configured) and runs `migrator` on the
    /// primary, retrying connection failures until `deadline`.
    pub async fn migrate(&self, migrator: &Migrator, deadline: Duration) -> Result<(), DbError> {
        let start = Instant::now();
        loop {
            match self.try_migrate(migrator).await {
                Ok(()) => return Ok(()),
                Err(DbError::Sqlx(e)) if is_connection_error(&e) => {
                    if start.elapsed() >= deadline {
                        return Err(DbError::Unreachable(deadline, e.to_string()));
                    }
                    tracing::warn!(error = %e, "primary not reachable yet, retrying migrations");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn try_migrate(&self, migrator: &Migrator) -> Result<(), DbError> {
        if let Some(schema) = &self.inner.schema {
            debug_assert!(is_identifier(schema));
            sqlx::query(&format!("create schema if not exists {schema}"))
                .execute(&self.inner.primary)
                .await?;
        }
        migrator.run(&self.inner.primary).await.map_err(|e| match e {
            sqlx::migrate::MigrateError::Execute(e) => DbError::Sqlx(e),
            other => DbError::Migrate(other),
        })
    }

    /// Readiness check of the primary.
    pub fn primary_check(&self) -> Check {
        let pool = self.inner.primary.clone();
        Check::new("postgres-primary", move || {
            let pool = pool.clone();
            async move {
                let in_recovery: bool = sqlx::query_scalar("select pg_is_in_recovery()")
                    .fetch_one(&pool)
                    .await
                    .map_err(|e| e.to_string())?;
                if in_recovery {
                    Err("the write URL points at a server in recovery (a replica)".to_owned())
                } else {
                    Ok(())
                }
            }
        })
    }

    /// Whether any replica is currently serving reads.
    pub fn any_replica_healthy(&self) -> bool {
        self.inner.replicas.iter().any(|r| r.healthy.load(Ordering::Acquire))
    }

    /// Waits until every replica has replayed `lsn`, or `timeout`; true if they did.
    /// For tests and tools that need a replica to be current.
    pub async fn wait_replicas(&self, lsn: Lsn, timeout: Duration) -> bool {
        let start = Instant::now();
        loop {
            if self
                .inner
                .replicas
                .iter()
                .all(|r| r.healthy.load(Ordering::Acquire) && r.replay_lsn.load(Ordering::Acquire) >= lsn.0)
            {
                return true;
            }
            if start.elapsed() >= timeout {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn is_connection_error(e: &sqlx::Error) -> bool {
    matches!(
        e,
        sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Tls(_)
    ) || matches!(e, sqlx::Error::Database(d) if d.code().is_some_and(|c| c.starts_with("57P") || c.starts_with("08")))
}

/// Polls replicas until the [`Db`] is dropped.
async fn monitor(inner: std::sync::Weak<Inner>, period: Duration) {
    let mut ticker = tokio::time::interval(period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let Some(inner) = inner.upgrade() else { return };
        let primary_lsn =
            tokio::time::timeout(period.max(Duration::from_millis(500)), Db::current_lsn(&inner.primary))
                .await
                .ok()
                .and_then(Result::ok);
        let polls = inner.replicas.iter().map(|r| async move {
            let q = sqlx::query_as::<_, (bool, Option<String>)>(
                "select pg_is_in_recovery(), pg_last_wal_replay_lsn()::text",
            )
            .fetch_one(&r.pool);
            (r, tokio::time::timeout(period.max(Duration::from_millis(500)), q).await)
        });
        for (r, result) in futures::future::join_all(polls).await {
            let labels = ReplicaLabels { replica: r.name.clone() };
            let state = match result {
                Ok(Ok((true, Some(lsn)))) => lsn.parse::<Lsn>().ok(),
                Ok(Ok(_)) => None, // promoted or never replayed: not a usable replica
                Ok(Err(_)) | Err(_) => None,
            };
            let healthy = match state {
                Some(lsn) => {
                    r.replay_lsn.store(lsn.0, Ordering::Release);
                    let lag = primary_lsn.map_or(0, |p| p.0.saturating_sub(lsn.0));
                    inner.metrics.replica_lag.get_or_create(&labels).set(lag as i64);
                    lag <= inner.max_lag
                }
                None => false,
            };
            let was = r.healthy.swap(healthy, Ordering::AcqRel);
            if was != healthy {
                if healthy {
                    tracing::info!(replica = %r.name, "replica serving reads");
                } else {
                    tracing::warn!(replica = %r.name, "replica left out of reads (down or lagging)");
                }
            }
            inner.metrics.replica_up.get_or_create(&labels).set(i64::from(healthy));
        }
    }
}

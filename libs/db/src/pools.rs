//! [`Db`]: the pools, read routing, and the monitor that keeps routing honest.

use std::{
    fmt,
    ops::{Deref, DerefMut},
    str::FromStr,
    sync::{
        Arc, LazyLock,
        atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use futures::future::BoxFuture;
use mesh_runtime::Check;
use prometheus_client::registry::Registry;
use secrecy::ExposeSecret;
use sqlx::{
    Executor, PgConnection, PgPool, Postgres,
    migrate::Migrator,
    pool::PoolConnection,
    postgres::{PgConnectOptions, PgPoolOptions},
};
use tokio::{sync::watch, time::Instant};

use crate::{
    DbConfig, Lsn,
    config::is_identifier,
    metrics::{Metrics, PoolCollector, PoolMetrics, ReadLabels, ReplicaLabels},
};

/// Database errors outside of a statement's own failure.
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
    /// A statement failed.
    #[error(transparent)]
    Sqlx(#[from] sqlx::Error),
    /// The primary did not answer before the deadline (start-up).
    #[error("primary unreachable for {0:?}: {1}")]
    Unreachable(Duration, String),
    /// The schema lacks migrations of this binary, or has them with other
    /// contents (see [`Db::check_migrations`]).
    #[error(
        "the schema is not migrated for this binary (missing versions {missing:?}, changed versions \
         {changed:?}): run `{command}` as the schema owner first"
    )]
    NotMigrated {
        /// Versions of the binary the schema has not applied.
        missing: Vec<i64>,
        /// Versions applied with another checksum.
        changed: Vec<i64>,
        /// The step that migrates, e.g. `mesh-data migrate`.
        command: &'static str,
    },
    /// The server behind a pool is known to be down: the call fails at once
    /// instead of waiting for a connection that cannot come.
    #[error("{pool} is unavailable")]
    ServerDown {
        /// The pool (`primary@host:port`, …).
        pool: Arc<str>,
    },
    /// No connection came within the acquire timeout.
    #[error("no connection to {pool} within the acquire timeout")]
    PoolTimedOut {
        /// The pool.
        pool: Arc<str>,
    },
}

impl DbError {
    /// Whether the error means "the database cannot be reached now" (gRPC
    /// UNAVAILABLE, worth retrying) rather than a fault of the statement.
    pub fn is_unavailable(&self) -> bool {
        match self {
            Self::Sqlx(e) => is_connection_error(e),
            Self::Unreachable(..) | Self::ServerDown { .. } | Self::PoolTimedOut { .. } => true,
            Self::Url { .. } | Self::Migrate(_) | Self::NotMigrated { .. } => false,
        }
    }
}

/// Whether a statement failed because the connection or the server went away
/// (I/O, TLS, pool closed or timed out, SQLSTATE class 08 or 57P: shutdown,
/// crash, cannot connect now) rather than because of the statement.
pub fn is_connection_error(e: &sqlx::Error) -> bool {
    matches!(
        e,
        sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Tls(_)
    ) || matches!(e, sqlx::Error::Database(d) if d.code().is_some_and(|c| c.starts_with("57P") || c.starts_with("08")))
}

/// How long a connection may sit idle before it is pinged ahead of its next
/// use (see [`alive_after_idle`]). Well below any restart of PostgreSQL: a
/// fast shutdown and start of an idle local server put 0.6 s between the
/// stop and the new postmaster (`idle::a_primary_restart_costs_the_first_write_no_error`
/// prints it), so a connection a restart killed has always been idle for
/// longer than this when next used. A ping is one round trip (median 20 µs
/// on loopback, measured by `idle::a_connection_terminated_while_idle_costs_no_caller_an_error`),
/// paid only by a call that finds a connection idle this long: under load
/// connections are reused sooner and nobody pays it.
pub const PING_IDLE_AFTER: Duration = Duration::from_millis(100);

/// Whether a connection that has been idle for `idle_for` may be used:
/// `true` at once if it was idle for at most [`PING_IDLE_AFTER`], else
/// whether it answers a ping (a server-side close, e.g. 57P01 from a
/// restart, or a reset surfaces here, before any statement was sent).
/// Pooled connections get this in [`Db`]'s pools; a connection held outside
/// a pool (a writer's own) should call it before each use, and reconnect
/// when it is `false`. Bounded only by the caller's own deadline.
pub async fn alive_after_idle(conn: &mut PgConnection, idle_for: Duration) -> bool {
    if idle_for <= PING_IDLE_AFTER {
        return true;
    }
    match sqlx::Connection::ping(conn).await {
        Ok(()) => true,
        Err(e) => {
            tracing::debug!(error = %e, idle = ?idle_for, "idle connection found dead, opening another");
            false
        }
    }
}

/// The `migrate` subcommand of a service binary (`mesh-data migrate`,
/// `mesh-audit migrate`): reads the database settings from the environment
/// (`MESH_DATABASE_WRITE_URL`, whose login must own the schema, and
/// `MESH_DATABASE_SCHEMA`, default `default_schema`), runs `migrator` on the
/// primary (waiting up to `MESH_DATABASE_MIGRATE_TIMEOUT_MS` for it),
/// prints the versions it applied on stdout and returns the exit code:
/// 0 done (also when nothing was missing), 64 a bad setting, 1 any other
/// failure, named on stderr (URLs and passwords never are).
pub async fn migrate_command(
    binary: &str,
    default_schema: &str,
    migrator: &Migrator,
) -> std::process::ExitCode {
    use std::process::ExitCode;
    let config = match DbConfig::from_lookup(&mesh_runtime::Env, default_schema) {
        Ok(c) => DbConfig { read_urls: Vec::new(), min_connections: 0, max_connections: 2, ..c },
        Err(e) => {
            eprintln!("{binary} migrate: bad configuration: {e}");
            return ExitCode::from(mesh_runtime::EXIT_CONFIG);
        }
    };
    let schema = config.schema.clone().unwrap_or_default();
    let result = async {
        let db = Db::connect(&config, &format!("{binary}-migrate"), &mut Registry::default())?;
        let applied = db.migrate(migrator, config.migrate_timeout).await;
        db.close().await;
        applied
    }
    .await;
    match result {
        Ok(applied) if applied.is_empty() => {
            println!("{binary} migrate: schema {schema} is up to date: nothing applied");
            ExitCode::SUCCESS
        }
        Ok(applied) => {
            let versions: Vec<String> = applied.iter().map(i64::to_string).collect();
            println!("{binary} migrate: schema {schema}: applied versions {}", versions.join(", "));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{binary} migrate: schema {schema}: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Makes the migration history (`_sqlx_migrations`, as created by its
/// owner) readable by every role and writable by its owner only: a default
/// privilege of the schema may have granted more to a serving role.
const HISTORY_GRANTS: &str = "do $$
declare r record;
begin
    if not has_table_privilege('public', '_sqlx_migrations', 'select') then
        grant select on _sqlx_migrations to public;
    end if;
    for r in select distinct a.grantee::regrole::text as grantee
               from pg_class c, aclexplode(c.relacl) a
              where c.oid = '_sqlx_migrations'::regclass and a.grantee not in (0, c.relowner)
                and a.privilege_type <> 'SELECT'
    loop
        execute format('revoke insert, update, delete, truncate, references, trigger on _sqlx_migrations from %s', r.grantee);
    end loop;
end $$";

/// The successfully applied migrations of the schema first in the
/// connection's `search_path`: (version, checksum); empty when sqlx's
/// history table does not exist yet.
async fn applied_migrations(pool: &PgPool) -> Result<Vec<(i64, Vec<u8>)>, sqlx::Error> {
    let exists: bool =
        sqlx::query_scalar("select to_regclass('_sqlx_migrations') is not null").fetch_one(pool).await?;
    if !exists {
        return Ok(Vec::new());
    }
    sqlx::query_as("select version, checksum from _sqlx_migrations where success order by version")
        .fetch_all(pool)
        .await
}

/// Whether a statement on a replica was cancelled for a conflict with
/// recovery (SQLSTATE 40001 or 40P01 on a hot standby).
fn is_recovery_conflict(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(d) if matches!(d.code().as_deref(), Some("40001" | "40P01")))
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

/// A pool to read from, and where it is (see [`Db::reader`]).
#[derive(Debug, Clone)]
pub struct Reader {
    /// The pool.
    pub pool: PgPool,
    /// Primary or replica.
    pub served_by: ServedBy,
}

/// The result of [`Db::read`] and where it was read.
#[derive(Debug)]
pub struct Read<T> {
    /// What the statement returned.
    pub value: T,
    /// Primary or replica.
    pub served_by: ServedBy,
}

/// A server, as spans name it (`server.address`, `server.port`).
#[derive(Debug)]
struct ServerInfo {
    address: String,
    port: u16,
    served_by: ServedBy,
}

/// A pooled connection with the server it is connected to; derefs to
/// [`PgConnection`]. Back in the pool when dropped.
pub struct Conn {
    conn: PoolConnection<Postgres>,
    server: Arc<ServerInfo>,
}

impl fmt::Debug for Conn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Conn").field("server", &self.server).finish()
    }
}

impl Deref for Conn {
    type Target = PgConnection;

    fn deref(&self) -> &PgConnection {
        &self.conn
    }
}

impl DerefMut for Conn {
    fn deref_mut(&mut self) -> &mut PgConnection {
        &mut self.conn
    }
}

impl Conn {
    /// Primary or replica.
    pub fn served_by(&self) -> ServedBy {
        self.server.served_by
    }

    /// A client span for one statement on this connection: [`crate::span`]
    /// plus `server.address` and `server.port`.
    pub fn span(
        &self,
        operation: &'static str,
        table: &'static str,
        statement: &'static str,
    ) -> tracing::Span {
        let span = crate::span(operation, table, statement);
        span.record("server.address", self.server.address.as_str());
        span.record("server.port", i64::from(self.server.port));
        span
    }
}

/// One server: its pool, a separate connection for the monitor and health
/// checks (so a busy pool never makes a healthy server look dead), and
/// whether it is up.
#[derive(Debug)]
pub(crate) struct Target {
    pub(crate) pool: PgPool,
    monitor: PgPool,
    pub(crate) pool_name: Arc<str>,
    server: Arc<ServerInfo>,
    metrics: PoolMetrics,
    /// Primary: it answers. Replica: it answers and is within the lag bounds.
    up: watch::Sender<bool>,
    /// When the server was last found unreachable (ms since `EPOCH`): pooled
    /// connections made before then are dropped instead of handed out.
    unreachable_at: Arc<AtomicU64>,
    /// Connections the pool keeps open.
    min_connections: u32,
    warming: AtomicBool,
}

/// Process start, the origin of `unreachable_at`.
static EPOCH: LazyLock<std::time::Instant> = LazyLock::new(std::time::Instant::now);

fn since_epoch() -> u64 {
    EPOCH.elapsed().as_millis() as u64 + 1
}

/// Decrements the pending-requests gauge when an acquire ends, however it ends.
struct Pending<'a>(&'a prometheus_client::metrics::gauge::Gauge);

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

impl Target {
    fn is_up(&self) -> bool {
        *self.up.borrow()
    }

    fn set_up(&self, up: bool) -> bool {
        self.up.send_if_modified(|v| std::mem::replace(v, up) != up)
    }

    /// Records that the server could not be reached: every connection made
    /// before now is presumed dead (a restarted server closed them all).
    fn unreachable(&self) {
        self.unreachable_at.store(since_epoch(), Ordering::Release);
    }

    /// Opens connections up to the pool's minimum, in the background (sqlx
    /// keeps the minimum only once a connection has been closed, not at start).
    fn warm(self: &Arc<Self>) {
        let missing = self.min_connections.saturating_sub(self.pool.size());
        if missing == 0 || self.warming.swap(true, Ordering::AcqRel) {
            return;
        }
        let this = self.clone();
        tokio::spawn(async move {
            let conns = futures::future::join_all((0..missing).map(|_| this.pool.acquire())).await;
            drop(conns);
            this.warming.store(false, Ordering::Release);
        });
    }

    /// A connection, counted in the pool metrics; fails at once while the
    /// server is known to be down, and as soon as the monitor finds it down.
    async fn acquire(&self) -> Result<Conn, DbError> {
        if !self.is_up() {
            return Err(DbError::ServerDown { pool: self.pool_name.clone() });
        }
        self.metrics.pending.inc();
        let _pending = Pending(&self.metrics.pending);
        let mut watch = self.up.subscribe();
        let start = Instant::now();
        let result = tokio::select! {
            biased;
            r = self.pool.acquire() => r.map_err(|e| match e {
                sqlx::Error::PoolTimedOut => {
                    self.metrics.timeouts.inc();
                    DbError::PoolTimedOut { pool: self.pool_name.clone() }
                }
                e => DbError::Sqlx(e),
            }),
            down = async { watch.wait_for(|up| !*up).await.is_ok() } => {
                if !down {
                    // The monitor is gone with the Db; the pool's own timeout decides.
                    std::future::pending::<()>().await;
                }
                Err(DbError::ServerDown { pool: self.pool_name.clone() })
            }
        };
        self.metrics.wait.observe(start.elapsed().as_secs_f64());
        Ok(Conn { conn: result?, server: self.server.clone() })
    }
}

#[derive(Debug)]
struct Replica {
    target: Arc<Target>,
    /// The highest replay position seen (by the monitor or a read).
    replay_lsn: AtomicU64,
    /// The replay position at the last poll, and when the replica was last
    /// seen current or moving forward (monitor only).
    progress: std::sync::Mutex<(u64, Instant)>,
    /// Consecutive timed-out monitor polls (monitor only).
    timeouts: AtomicU32,
}

#[derive(Debug)]
pub(crate) struct Inner {
    primary: Arc<Target>,
    replicas: Vec<Replica>,
    next: AtomicUsize,
    schema: Option<String>,
    max_lag: u64,
    max_delay: Duration,
    read_wait: Duration,
    /// The primary's insert position at the last poll.
    primary_lsn: AtomicU64,
    metrics: Metrics,
}

impl Inner {
    pub(crate) fn targets(&self) -> impl Iterator<Item = &Target> {
        std::iter::once(&*self.primary).chain(self.replicas.iter().map(|r| &*r.target))
    }
}

/// The primary pool, the replica pools and the routing between them.
///
/// - Writes go to [`Db::write`].
/// - [`Db::read`] runs a read on a healthy replica, or on the primary; with a
///   consistency token ([`Lsn`]) only on a replica whose connection has
///   replayed it, waiting at most `read_wait` for one, so a caller always
///   reads its own writes.
/// - A monitor polls the primary's position and each replica's replay
///   position, byte lag and replay delay; a replica that fails or lags past
///   either bound is left out until it is back within them. A read whose
///   replica fails is repeated on the primary.
/// - Every routing decision is counted in `mesh_db_reads_total{served_by, reason}`.
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
    let app = config.application_name.as_deref().unwrap_or(app);
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

fn target(
    opts: PgConnectOptions,
    config: &DbConfig,
    served_by: ServedBy,
    metrics: &Metrics,
    up: bool,
) -> Arc<Target> {
    let server =
        Arc::new(ServerInfo { address: opts.get_host().to_owned(), port: opts.get_port(), served_by });
    let pool_name: Arc<str> = format!("{}@{}:{}", served_by.as_str(), server.address, server.port).into();
    let unreachable_at = Arc::new(AtomicU64::new(0));
    let seen_down = unreachable_at.clone();
    let pool = PgPoolOptions::new()
        .max_connections(config.max_connections)
        .min_connections(config.min_connections)
        .acquire_timeout(config.acquire_timeout)
        // Pinging before every acquire would add a round trip to every call.
        // What is known dead is dropped for free: a connection older than the
        // last time the server was found unreachable. What may have died
        // unseen while idle (a restart between two monitor polls, a
        // terminated backend, a proxy's idle cut) is pinged first if it sat
        // idle past PING_IDLE_AFTER, so it costs no caller an error: a failed
        // ping drops it and the pool hands out another (or opens one).
        .test_before_acquire(false)
        .before_acquire(move |conn, meta| {
            let made_at = since_epoch().saturating_sub(meta.age.as_millis() as u64);
            let fresh = made_at > seen_down.load(Ordering::Acquire);
            Box::pin(async move { Ok(fresh && alive_after_idle(conn, meta.idle_for).await) })
        })
        .idle_timeout(Some(config.idle_timeout))
        .max_lifetime(Some(config.max_lifetime))
        .connect_lazy_with(opts.clone());
    let monitor = PgPoolOptions::new()
        .max_connections(2)
        .min_connections(0)
        .acquire_timeout(Duration::from_secs(2))
        .test_before_acquire(false)
        .connect_lazy_with(opts);
    Arc::new(Target {
        pool,
        monitor,
        metrics: metrics.pool(&pool_name),
        pool_name,
        server,
        up: watch::Sender::new(up),
        unreachable_at,
        min_connections: config.min_connections,
        warming: AtomicBool::new(false),
    })
}

impl Db {
    /// Creates the pools (connections are made in the background, so this
    /// works while the database is down), registers metrics and starts the monitor.
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
        let metrics = Metrics::register(registry);
        let primary_opts =
            options(config.write_url.expose_secret(), crate::keys::WRITE_URL, config, app, role)?;
        // Up until the monitor finds otherwise: a first call may as well try.
        let primary = target(primary_opts, config, ServedBy::Primary, &metrics, true);
        let mut replicas = Vec::new();
        for url in &config.read_urls {
            let opts = options(url.expose_secret(), crate::keys::READ_URLS, config, app, role)?;
            // Down until the monitor has seen it replaying.
            replicas.push(Replica {
                target: target(opts, config, ServedBy::Replica, &metrics, false),
                replay_lsn: AtomicU64::new(0),
                progress: std::sync::Mutex::new((0, Instant::now())),
                timeouts: AtomicU32::new(0),
            });
        }
        metrics.primary_up.set(1);
        let db = Self {
            inner: Arc::new(Inner {
                primary,
                replicas,
                next: AtomicUsize::new(0),
                schema: config.schema.clone(),
                max_lag: config.max_replica_lag_bytes,
                max_delay: config.max_replica_delay,
                read_wait: config.read_wait,
                primary_lsn: AtomicU64::new(0),
                metrics,
            }),
        };
        registry.register_collector(Box::new(PoolCollector(Arc::downgrade(&db.inner))));
        tokio::spawn(monitor(Arc::downgrade(&db.inner), config.replica_poll));
        Ok(db)
    }

    /// The primary's pool: writes, and reads that must see the latest state.
    /// Prefer [`Db::write`], which is counted in the pool metrics and fails
    /// fast while the primary is down.
    pub fn primary(&self) -> &PgPool {
        &self.inner.primary.pool
    }

    /// A connection to the primary. Fails at once with
    /// [`DbError::ServerDown`] while the monitor finds the primary down, and
    /// with [`DbError::PoolTimedOut`] after the acquire timeout.
    pub async fn write(&self) -> Result<Conn, DbError> {
        self.inner.primary.acquire().await
    }

    /// A healthy replica's pool (round-robin), else the primary's. Counted
    /// like [`Db::read`] without a token; no fallback if the replica then fails.
    pub fn reader(&self) -> Reader {
        let inner = &self.inner;
        if let Some(r) = self.pick(None) {
            self.count(ServedBy::Replica, "replica");
            return Reader { pool: r.target.pool.clone(), served_by: ServedBy::Replica };
        }
        self.count(ServedBy::Primary, self.no_replica_reason());
        Reader { pool: inner.primary.pool.clone(), served_by: ServedBy::Primary }
    }

    /// Runs the read `f` where it may run:
    ///
    /// - `at` `None`: on any healthy replica, else on the primary.
    /// - `at` a consistency token: on a replica whose connection has replayed
    ///   it (checked on that very connection, so a replica address that hides
    ///   several servers is still right), waiting up to `read_wait` for it;
    ///   else on the primary. A token beyond anything written (a forged one)
    ///   costs at most that wait.
    ///
    /// When the replica fails (a connection error), `f` runs again on the
    /// primary and the replica is left out until the monitor finds it
    /// healthy. Errors of `f` itself are returned as they are.
    pub async fn read<T, F>(&self, at: Option<Lsn>, f: F) -> Result<Read<T>, DbError>
    where
        F: for<'c> Fn(&'c mut Conn) -> BoxFuture<'c, Result<T, sqlx::Error>>,
    {
        let (replica, mut reason) = self.route(at).await;
        if let Some((r, mut conn, why)) = replica {
            match f(&mut conn).await {
                Ok(value) => {
                    self.count(ServedBy::Replica, why);
                    return Ok(Read { value, served_by: ServedBy::Replica });
                }
                Err(e) if is_connection_error(&e) => {
                    self.replica_failed(r, &e);
                    reason = "replica_failed";
                }
                // Cancelled by the replica to let replay go on (a conflict
                // with recovery): the primary has no such conflict.
                Err(e) if is_recovery_conflict(&e) => {
                    reason = "replica_conflict";
                }
                Err(e) => {
                    self.count(ServedBy::Replica, why);
                    return Err(e.into());
                }
            }
        }
        self.count(ServedBy::Primary, reason);
        let mut conn = self.inner.primary.acquire().await?;
        let value = f(&mut conn).await?;
        Ok(Read { value, served_by: ServedBy::Primary })
    }

    /// A healthy replica, preferring one whose last known replay position
    /// covers `at`, else the most advanced; round-robin among equals.
    fn pick(&self, at: Option<Lsn>) -> Option<&Replica> {
        let replicas = &self.inner.replicas;
        let n = replicas.len();
        if n == 0 {
            return None;
        }
        let start = self.inner.next.fetch_add(1, Ordering::Relaxed);
        let mut best: Option<&Replica> = None;
        for i in 0..n {
            let r = &replicas[(start + i) % n];
            if !r.target.is_up() {
                continue;
            }
            let replayed = r.replay_lsn.load(Ordering::Acquire);
            if at.is_none_or(|lsn| replayed >= lsn.0) {
                return Some(r);
            }
            if best.is_none_or(|b| replayed > b.replay_lsn.load(Ordering::Acquire)) {
                best = Some(r);
            }
        }
        best
    }

    fn no_replica_reason(&self) -> &'static str {
        if self.inner.replicas.is_empty() { "no_replicas" } else { "replicas_unhealthy" }
    }

    /// A replica connection fit for `at`, with the reason it counts under;
    /// else why the read goes to the primary.
    async fn route(&self, at: Option<Lsn>) -> (Option<(&Replica, Conn, &'static str)>, &'static str) {
        if at == Some(Lsn::PRIMARY) {
            return (None, "token_needs_primary");
        }
        let Some(r) = self.pick(at) else { return (None, self.no_replica_reason()) };
        let mut conn = match r.target.acquire().await {
            Ok(c) => c,
            Err(DbError::Sqlx(e)) if is_connection_error(&e) => {
                self.replica_failed(r, &e);
                return (None, "replica_failed");
            }
            // Down meanwhile, or its pool is exhausted: the primary can serve.
            Err(_) => return (None, "replica_failed"),
        };
        let Some(lsn) = at else { return (Some((r, conn, "replica")), "") };
        let deadline = Instant::now() + self.inner.read_wait;
        let mut pause = Duration::from_micros(500);
        let mut waited = false;
        loop {
            match replay_position(&mut conn).await {
                Ok(Some(replayed)) => {
                    r.replay_lsn.fetch_max(replayed.0, Ordering::AcqRel);
                    if replayed >= lsn {
                        let why = if waited { "replica_after_wait" } else { "replica" };
                        return (Some((r, conn, why)), "");
                    }
                }
                // Promoted meanwhile: not a replica any more.
                Ok(None) => return (None, "replica_failed"),
                Err(e) => {
                    if is_connection_error(&e) {
                        self.replica_failed(r, &e);
                    }
                    return (None, "replica_failed");
                }
            }
            if Instant::now() + pause > deadline {
                return (None, "replica_behind_token");
            }
            waited = true;
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(8));
        }
    }

    fn replica_failed(&self, r: &Replica, e: &sqlx::Error) {
        r.target.unreachable();
        if r.target.set_up(false) {
            tracing::warn!(replica = %r.target.pool_name, error = %e, "replica failed, reads go elsewhere until it is healthy");
            let labels = ReplicaLabels { replica: replica_label(&r.target) };
            self.inner.metrics.replica_up.get_or_create(&labels).set(0);
        }
    }

    fn count(&self, served_by: ServedBy, reason: &'static str) {
        self.inner.metrics.reads.get_or_create(&ReadLabels { served_by: served_by.as_str(), reason }).inc();
    }

    /// The primary's current WAL insert position, read on `executor`. Read
    /// after a commit on the primary, it covers that commit (also with
    /// asynchronous commit, where the *write* position may still be behind):
    /// a replica that has replayed it has the commit.
    pub async fn current_lsn<'e, E>(executor: E) -> Result<Lsn, sqlx::Error>
    where
        E: Executor<'e, Database = Postgres>,
    {
        let lsn: i64 = sqlx::query_scalar("select (pg_current_wal_insert_lsn() - '0/0')::int8")
            .fetch_one(executor)
            .await?;
        Ok(Lsn(lsn as u64))
    }

    /// Creates the schema (if one is configured) and runs `migrator` on the
    /// primary, retrying connection failures until `deadline`. Returns the
    /// versions it applied (empty: the schema was up to date). The history
    /// table (`_sqlx_migrations`) is then readable by every role (it holds
    /// versions and checksums of files shipped with the binary), so a serving
    /// role that does not own the schema can [`Db::check_migrations`], and
    /// writable by its owner only.
    pub async fn migrate(&self, migrator: &Migrator, deadline: Duration) -> Result<Vec<i64>, DbError> {
        let start = Instant::now();
        loop {
            match self.try_migrate(migrator).await {
                Ok(applied) => return Ok(applied),
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

    async fn try_migrate(&self, migrator: &Migrator) -> Result<Vec<i64>, DbError> {
        let pool = &self.inner.primary.monitor;
        if let Some(schema) = &self.inner.schema {
            debug_assert!(is_identifier(schema));
            sqlx::query(&format!("create schema if not exists {schema}")).execute(pool).await?;
        }
        let before = applied_migrations(pool).await?;
        migrator.run(pool).await.map_err(|e| match e {
            sqlx::migrate::MigrateError::Execute(e) => DbError::Sqlx(e),
            other => DbError::Migrate(other),
        })?;
        // Two instances may change the grants at once ("tuple concurrently
        // updated"); the block is idempotent, so it is simply run again.
        let mut attempt = 0;
        while let Err(e) = sqlx::query(HISTORY_GRANTS).execute(pool).await {
            attempt += 1;
            if attempt == 3 || is_connection_error(&e) {
                return Err(e.into());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let after = applied_migrations(pool).await?;
        Ok(after.into_iter().filter(|(v, _)| !before.iter().any(|(b, _)| b == v)).map(|(v, _)| v).collect())
    }

    /// Checks, without DDL, that the schema has every migration of
    /// `migrator` applied with the same checksum (migrations the schema has
    /// beyond the binary's are allowed: a newer release migrated it). Retries
    /// until `deadline` while the primary does not answer or a migration is
    /// missing (the owner's `migrate` step may still be running), then fails
    /// with [`DbError::NotMigrated`] naming `command`, the step to run.
    pub async fn check_migrations(
        &self,
        migrator: &Migrator,
        deadline: Duration,
        command: &'static str,
    ) -> Result<(), DbError> {
        let pool = &self.inner.primary.monitor;
        let start = Instant::now();
        loop {
            let problem = match applied_migrations(pool).await {
                Ok(applied) => {
                    let mut missing = Vec::new();
                    let mut changed = Vec::new();
                    for m in migrator.iter().filter(|m| !m.migration_type.is_down_migration()) {
                        match applied.iter().find(|(v, _)| *v == m.version) {
                            None => missing.push(m.version),
                            Some((_, sum)) if sum[..] != m.checksum[..] => changed.push(m.version),
                            Some(_) => {}
                        }
                    }
                    if missing.is_empty() && changed.is_empty() {
                        return Ok(());
                    }
                    DbError::NotMigrated { missing, changed, command }
                }
                Err(e) if is_connection_error(&e) => DbError::Unreachable(deadline, e.to_string()),
                Err(e) => return Err(e.into()),
            };
            if start.elapsed() >= deadline {
                return Err(problem);
            }
            tracing::warn!(error = %problem, "migrations not applied yet, checking again");
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// Readiness check of the primary (on the monitor's connection, so an
    /// exhausted pool under load does not read as a dead primary).
    pub fn primary_check(&self) -> Check {
        let pool = self.inner.primary.monitor.clone();
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

    /// Check of the replicas, named `postgres-replica`: passes while at least
    /// one replica serves reads (it answers and is within the lag bounds, as
    /// the monitor last found it; per replica: `mesh_db_replica_up`). `None`
    /// when no replica is configured.
    pub fn replica_check(&self) -> Option<Check> {
        if self.inner.replicas.is_empty() {
            return None;
        }
        let db = self.clone();
        Some(Check::new("postgres-replica", move || {
            let healthy = db.any_replica_healthy();
            async move {
                if healthy {
                    Ok(())
                } else {
                    Err("no replica serves reads (down, or lagging past the bound)".to_owned())
                }
            }
        }))
    }

    /// Whether any replica is currently serving reads.
    pub fn any_replica_healthy(&self) -> bool {
        self.inner.replicas.iter().any(|r| r.target.is_up())
    }

    /// Whether the monitor currently finds the primary answering.
    pub fn primary_up(&self) -> bool {
        self.inner.primary.is_up()
    }

    /// Waits until every replica is healthy and has replayed `lsn`, or
    /// `timeout`; true if they did. For tests and tools that need a replica
    /// to be current.
    pub async fn wait_replicas(&self, lsn: Lsn, timeout: Duration) -> bool {
        let start = Instant::now();
        loop {
            if self
                .inner
                .replicas
                .iter()
                .all(|r| r.target.is_up() && r.replay_lsn.load(Ordering::Acquire) >= lsn.0)
            {
                return true;
            }
            if start.elapsed() >= timeout {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Closes every pool (in-flight statements finish first).
    pub async fn close(&self) {
        for t in self.inner.targets() {
            t.pool.close().await;
            t.monitor.close().await;
        }
    }
}

/// A replica's replay position on `conn`; `None` when the server is not in recovery.
async fn replay_position(conn: &mut PgConnection) -> Result<Option<Lsn>, sqlx::Error> {
    let lsn: Option<i64> = sqlx::query_scalar(
        "select case when pg_is_in_recovery() then (pg_last_wal_replay_lsn() - '0/0')::int8 end",
    )
    .fetch_one(conn)
    .await?;
    Ok(lsn.map(|l| Lsn(l as u64)))
}

fn replica_label(t: &Target) -> String {
    format!("{}:{}", t.server.address, t.server.port)
}

/// Consecutive timed-out polls of the primary or a replica before it counts
/// as down (a refused or broken connection counts at once): a server busy
/// with a long write may answer one poll late without being down.
const TIMEOUTS_DOWN: u32 = 3;

/// Polls the primary and the replicas until the [`Db`] is dropped.
async fn monitor(inner: std::sync::Weak<Inner>, period: Duration) {
    let mut ticker = tokio::time::interval(period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let timeout = period.max(Duration::from_millis(500));
    let mut primary_timeouts = 0u32;
    loop {
        ticker.tick().await;
        let Some(inner) = inner.upgrade() else { return };
        let poll = sqlx::query_scalar::<_, Option<i64>>(
            "select case when not pg_is_in_recovery() then (pg_current_wal_insert_lsn() - '0/0')::int8 end",
        )
        .fetch_one(&inner.primary.monitor);
        let primary = &inner.primary;
        let up = match tokio::time::timeout(timeout, poll).await {
            Ok(Ok(Some(lsn))) => {
                primary_timeouts = 0;
                inner.primary_lsn.store(lsn as u64, Ordering::Release);
                true
            }
            // In recovery: the write URL points at a replica.
            Ok(Ok(None)) => false,
            Ok(Err(e)) if is_connection_error(&e) => false,
            Ok(Err(_)) | Err(_) => {
                primary_timeouts += 1;
                primary.is_up() && primary_timeouts < TIMEOUTS_DOWN
            }
        };
        if !up {
            primary.unreachable();
        } else {
            primary.warm();
        }
        if primary.set_up(up) {
            if up {
                tracing::info!(primary = %primary.pool_name, "primary answers again");
            } else {
                tracing::warn!(primary = %primary.pool_name, "primary unreachable, writes fail fast until it answers");
            }
        }
        inner.metrics.primary_up.set(i64::from(up));
        // The lag is unknown while the primary is: replicas keep serving reads then.
        let primary_lsn = up.then(|| inner.primary_lsn.load(Ordering::Acquire));

        let polls = inner.replicas.iter().map(|r| async move {
            let q = sqlx::query_as::<_, (bool, Option<i64>)>(
                "select pg_is_in_recovery(), (pg_last_wal_replay_lsn() - '0/0')::int8",
            )
            .fetch_one(&r.target.monitor);
            (r, tokio::time::timeout(timeout, q).await)
        });
        for (r, result) in futures::future::join_all(polls).await {
            let labels = ReplicaLabels { replica: replica_label(&r.target) };
            if result.is_ok() {
                r.timeouts.store(0, Ordering::Relaxed);
            }
            let healthy = match result {
                Ok(Ok((true, Some(lsn)))) => {
                    let lsn = lsn as u64;
                    r.replay_lsn.store(lsn, Ordering::Release);
                    let behind = primary_lsn.map_or(0, |p| p.saturating_sub(lsn));
                    // Replay delay: how long the replica has been behind the
                    // primary without its replay moving forward. Zero while it
                    // is current (a quiet primary makes no replica stale) or
                    // replaying: a replica working through a long write without
                    // commits is not stale, one whose replay is paused (a delay,
                    // a conflict) or whose stream broke is, and more so with
                    // every poll. A replica replaying but far behind is caught
                    // by the byte bound.
                    let delay = {
                        let mut progress = r.progress.lock().expect("not poisoned");
                        if behind == 0 || lsn > progress.0 {
                            *progress = (lsn, Instant::now());
                        }
                        if behind == 0 { 0.0 } else { progress.1.elapsed().as_secs_f64() }
                    };
                    inner.metrics.replica_lag.get_or_create(&labels).set(behind as i64);
                    inner.metrics.replica_delay.get_or_create(&labels).set(delay);
                    behind <= inner.max_lag && delay <= inner.max_delay.as_secs_f64()
                }
                // Promoted, or never replayed anything: not a usable replica.
                Ok(Ok(_)) => false,
                // A late answer keeps the last verdict, a few times.
                Err(_) if r.timeouts.fetch_add(1, Ordering::Relaxed) + 1 < TIMEOUTS_DOWN => r.target.is_up(),
                Ok(Err(_)) | Err(_) => {
                    r.target.unreachable();
                    false
                }
            };
            if healthy {
                r.target.warm();
            }
            if r.target.set_up(healthy) {
                if healthy {
                    tracing::info!(replica = %r.target.pool_name, "replica serving reads");
                } else {
                    tracing::warn!(replica = %r.target.pool_name, "replica left out of reads (down or lagging)");
                }
            }
            inner.metrics.replica_up.get_or_create(&labels).set(i64::from(healthy));
        }
    }
}

//! The database metrics.
//!
//! Connection pools, named after the OpenTelemetry database-client
//! semantic conventions (`db.client.connection.*`, Prometheus-translated),
//! one series per pool (`db_client_connection_pool_name`: `primary@host:port`
//! or `replica@host:port`):
//!
//! - `db_client_connections_usage{db_client_connection_state="idle"|"used"}` (gauge, read at scrape
//!   time; OpenTelemetry's `db.client.connection.count`, named as its older
//!   `db.client.connections.usage`: a gauge ending in `_count` reads as a
//!   histogram's count to Prometheus tooling, and `promtool check metrics` refuses it)
//! - `db_client_connection_max`, `db_client_connection_idle_min` (gauges: the configured bounds)
//! - `db_client_connection_pending_requests` (gauge: callers waiting for a connection)
//! - `db_client_connection_wait_time_seconds` (histogram: time to get a connection)
//! - `db_client_connection_timeouts_total` (counter: acquires that gave up)
//!
//! Routing and replicas:
//!
//! - `mesh_db_reads_total{served_by, reason}`: every routing decision (every
//!   pair at 0 from the start)
//! - `mesh_db_replica_up{replica}`, `mesh_db_replica_lag_bytes{replica}`,
//!   `mesh_db_replica_delay_seconds{replica}`
//! - `mesh_db_primary_up`: 1 while the primary answers the monitor

use std::sync::{Arc, Weak};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

use crate::pools::Inner;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ReadLabels {
    pub(crate) served_by: &'static str,
    pub(crate) reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ReplicaLabels {
    pub(crate) replica: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct PoolLabels {
    pub(crate) db_client_connection_pool_name: Arc<str>,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CountLabels {
    db_client_connection_pool_name: Arc<str>,
    db_client_connection_state: &'static str,
}

/// The metric handles of one pool, cloned out of their families once.
#[derive(Debug, Clone)]
pub(crate) struct PoolMetrics {
    pub(crate) pending: Gauge,
    pub(crate) wait: Histogram,
    pub(crate) timeouts: Counter,
}

/// Every family, registered once per registry.
#[derive(Debug, Clone)]
pub(crate) struct Metrics {
    pub(crate) reads: Family<ReadLabels, Counter>,
    pub(crate) replica_up: Family<ReplicaLabels, Gauge>,
    pub(crate) replica_lag: Family<ReplicaLabels, Gauge>,
    pub(crate) replica_delay: Family<ReplicaLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    pub(crate) primary_up: Gauge,
    pending: Family<PoolLabels, Gauge>,
    wait: Family<PoolLabels, Histogram, fn() -> Histogram>,
    timeouts: Family<PoolLabels, Counter>,
}

impl Metrics {
    pub(crate) fn register(registry: &mut Registry) -> Self {
        let m = Self {
            reads: Family::default(),
            replica_up: Family::default(),
            replica_lag: Family::default(),
            replica_delay: Family::default(),
            primary_up: Gauge::default(),
            pending: Family::default(),
            wait: Family::new_with_constructor(|| Histogram::new(mesh_runtime::latency_buckets())),
            timeouts: Family::default(),
        };
        for (served_by, reason) in [
            ("replica", "replica"),
            ("replica", "replica_after_wait"),
            ("primary", "token_needs_primary"),
            ("primary", "replica_behind_token"),
            ("primary", "replica_failed"),
            ("primary", "replica_conflict"),
            ("primary", "replicas_unhealthy"),
            ("primary", "no_replicas"),
        ] {
            let _ = m.reads.get_or_create(&ReadLabels { served_by, reason });
        }
        registry.register(
            "mesh_db_reads",
            "Read routing decisions by where the read was served and why",
            m.reads.clone(),
        );
        registry.register(
            "mesh_db_replica_up",
            "1 while a replica answers and is within the lag bounds",
            m.replica_up.clone(),
        );
        registry.register(
            "mesh_db_replica_lag_bytes",
            "WAL bytes a replica has not yet replayed",
            m.replica_lag.clone(),
        );
        registry.register(
            "mesh_db_replica_delay_seconds",
            "How long a replica has been behind the primary without its replay moving forward",
            m.replica_delay.clone(),
        );
        registry.register(
            "mesh_db_primary_up",
            "1 while the primary answers the monitor",
            m.primary_up.clone(),
        );
        registry.register(
            "db_client_connection_pending_requests",
            "Callers waiting for a connection from the pool",
            m.pending.clone(),
        );
        registry.register(
            "db_client_connection_wait_time_seconds",
            "Time it took to get a connection from the pool",
            m.wait.clone(),
        );
        registry.register(
            "db_client_connection_timeouts",
            "Connection requests that timed out waiting for the pool",
            m.timeouts.clone(),
        );
        m
    }

    /// The handles of one pool.
    pub(crate) fn pool(&self, name: &Arc<str>) -> PoolMetrics {
        let labels = PoolLabels { db_client_connection_pool_name: name.clone() };
        PoolMetrics {
            pending: self.pending.get_or_create_owned(&labels),
            wait: self.wait.get_or_create_owned(&labels),
            timeouts: self.timeouts.get_or_create_owned(&labels),
        }
    }
}

/// Reads pool sizes at scrape time (sqlx keeps them; nothing to update on the hot path).
#[derive(Debug)]
pub(crate) struct PoolCollector(pub(crate) Weak<Inner>);

impl Collector for PoolCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let Some(inner) = self.0.upgrade() else { return Ok(()) };
        let count: Family<CountLabels, Gauge> = Family::default();
        let max: Family<PoolLabels, Gauge> = Family::default();
        let min: Family<PoolLabels, Gauge> = Family::default();
        for t in inner.targets() {
            let name = t.pool_name.clone();
            let size = i64::from(t.pool.size());
            let idle = t.pool.num_idle() as i64;
            let labels = |state| CountLabels {
                db_client_connection_pool_name: name.clone(),
                db_client_connection_state: state,
            };
            count.get_or_create(&labels("idle")).set(idle);
            count.get_or_create(&labels("used")).set((size - idle).max(0));
            let pool = PoolLabels { db_client_connection_pool_name: name.clone() };
            max.get_or_create(&pool).set(i64::from(t.pool.options().get_max_connections()));
            min.get_or_create(&pool).set(i64::from(t.pool.options().get_min_connections()));
        }
        for (name, help, family) in [
            ("db_client_connection_max", "The most connections the pool may open", &max),
            ("db_client_connection_idle_min", "Connections the pool keeps open", &min),
        ] {
            family.encode(encoder.encode_descriptor(name, help, None, family.metric_type())?)?;
        }
        count.encode(encoder.encode_descriptor(
            "db_client_connections_usage",
            "Connections of the pool by state (idle or used)",
            None,
            count.metric_type(),
        )?)?;
        Ok(())
    }
}

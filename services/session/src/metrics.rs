//! The service's Prometheus metrics. Labels are fixed words, never user ids,
//! session ids or tokens. Every family has series at 0 from the start, so
//! alerts read 0, not "no data", until it first moves.

use std::sync::Arc;

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct OpLabels {
    pub(crate) op: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ValidationLabels {
    /// `valid`, `invalid`, `unavailable`.
    pub(crate) result: &'static str,
    /// `cache` or `redis`.
    pub(crate) source: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ResultLabels {
    pub(crate) result: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ReasonLabels {
    pub(crate) reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ModeLabels {
    pub(crate) mode: &'static str,
}

/// Every metric of the service.
#[derive(Debug, Clone)]
pub(crate) struct Metrics {
    pub(crate) validations: Family<ValidationLabels, Counter>,
    pub(crate) created: Counter,
    pub(crate) ended: Family<ReasonLabels, Counter>,
    pub(crate) redis_seconds: Family<OpLabels, Histogram, fn() -> Histogram>,
    pub(crate) redis_errors: Family<OpLabels, Counter>,
    pub(crate) replica_waits: Family<ResultLabels, Counter>,
    pub(crate) revocation_acks: Family<ResultLabels, Counter>,
    pub(crate) cache_enabled: Gauge,
    pub(crate) cache_entries: Gauge,
    pub(crate) cache_bytes: Gauge,
    pub(crate) cache_invalidations: Counter,
    pub(crate) cache_resets: Family<ReasonLabels, Counter>,
    pub(crate) ratelimited: Counter,
    pub(crate) ratelimit_unavailable: Family<ModeLabels, Counter>,
    pub(crate) outbox_depth: Gauge,
    pub(crate) outbox_oldest_seconds: Gauge,
    pub(crate) audit_events: Family<ResultLabels, Counter>,
    /// Write clients leased to a change (`store::Writers`).
    pub(crate) write_leases_in_use: Gauge,
    /// Time a change waited for a write client.
    pub(crate) write_lease_wait_seconds: Histogram,
    /// Changes that found every write client busy with their master in time.
    pub(crate) write_lease_timeouts: Counter,
}

fn histogram() -> Histogram {
    Histogram::new(mesh_runtime::latency_buckets())
}

impl Metrics {
    pub(crate) fn register(r: &mut Registry) -> Arc<Self> {
        let m = Self {
            validations: Family::default(),
            created: Counter::default(),
            ended: Family::default(),
            redis_seconds: Family::new_with_constructor(histogram),
            redis_errors: Family::default(),
            replica_waits: Family::default(),
            revocation_acks: Family::default(),
            cache_enabled: Gauge::default(),
            cache_entries: Gauge::default(),
            cache_bytes: Gauge::default(),
            cache_invalidations: Counter::default(),
            cache_resets: Family::default(),
            ratelimited: Counter::default(),
            ratelimit_unavailable: Family::default(),
            outbox_depth: Gauge::default(),
            outbox_oldest_seconds: Gauge::default(),
            audit_events: Family::default(),
            write_leases_in_use: Gauge::default(),
            write_lease_wait_seconds: histogram(),
            write_lease_timeouts: Counter::default(),
        };
        for (result, source) in [
            ("invalid", "format"),
            ("valid", "cache"),
            ("valid", "redis"),
            ("invalid", "redis"),
            ("unavailable", "redis"),
        ] {
            let _ = m.validations.get_or_create(&ValidationLabels { result, source });
        }
        for reason in ["revoke", "revoke_all", "refresh", "evict"] {
            let _ = m.ended.get_or_create(&ReasonLabels { reason });
        }
        // Other operations' series appear with their first round trip.
        let _ = m.redis_seconds.get_or_create(&OpLabels { op: "wait" });
        let _ = m.redis_errors.get_or_create(&OpLabels { op: "wait" });
        for result in ["ok", "timeout", "error"] {
            let _ = m.replica_waits.get_or_create(&ResultLabels { result });
        }
        for result in ["complete", "timeout"] {
            let _ = m.revocation_acks.get_or_create(&ResultLabels { result });
        }
        for reason in ["missed_messages", "unconfirmed"] {
            let _ = m.cache_resets.get_or_create(&ReasonLabels { reason });
        }
        for result in ["delivered", "failed", "dead_lettered"] {
            let _ = m.audit_events.get_or_create(&ResultLabels { result });
        }
        r.register(
            "mesh_session_validations",
            "ValidateSession answers, by result and by what answered (format: refused on its shape, cache, redis)",
            m.validations.clone(),
        );
        r.register("mesh_session_created", "Sessions created", m.created.clone());
        r.register(
            "mesh_session_ended",
            "Sessions ended early, by reason (revoke, revoke_all, refresh: the old token, evict: the per-user cap)",
            m.ended.clone(),
        );
        r.register("mesh_session_redis_seconds", "Redis round trips, by operation", m.redis_seconds.clone());
        r.register(
            "mesh_session_redis_errors",
            "Redis operations that failed, by operation",
            m.redis_errors.clone(),
        );
        r.register(
            "mesh_session_replica_waits",
            "WAIT after a change: ok (a replica has it), timeout (none acknowledged in time; the call still succeeded), error",
            m.replica_waits.clone(),
        );
        r.register(
            "mesh_session_revocation_acks",
            "Revocations by result: complete (every instance that received it confirmed its cache dropped the token), timeout",
            m.revocation_acks.clone(),
        );
        r.register(
            "mesh_session_cache_enabled",
            "1 while the validation cache is used (subscribed to every invalidation channel)",
            m.cache_enabled.clone(),
        );
        r.register("mesh_session_cache_entries", "Validations in the cache", m.cache_entries.clone());
        r.register("mesh_session_cache_bytes", "Approximate size of the cache", m.cache_bytes.clone());
        r.register(
            "mesh_session_cache_invalidations",
            "Revoked tokens received on the invalidation channels",
            m.cache_invalidations.clone(),
        );
        r.register(
            "mesh_session_cache_resets",
            "Cache cleared, by reason (subscription lost, messages missed)",
            m.cache_resets.clone(),
        );
        r.register(
            "mesh_session_ratelimited",
            "CreateSession calls refused by the rate-limit service",
            m.ratelimited.clone(),
        );
        r.register(
            "mesh_session_ratelimit_unavailable",
            "CreateSession calls the rate-limit service could not decide, by the failure mode applied",
            m.ratelimit_unavailable.clone(),
        );
        r.register(
            "mesh_session_outbox_depth",
            "Audit events waiting in the outboxes (at the last sweep)",
            m.outbox_depth.clone(),
        );
        r.register(
            "mesh_session_outbox_oldest_age_seconds",
            "Age of the oldest audit event waiting (at the last sweep; 0 when none)",
            m.outbox_oldest_seconds.clone(),
        );
        r.register(
            "mesh_session_audit_events",
            "Outbox events handed to the audit service, by result (delivered, failed: retried later, dead_lettered: refused for good)",
            m.audit_events.clone(),
        );
        r.register(
            "mesh_session_write_leases_in_use",
            "Redis write clients leased to a change (each carries one change per master at a time; \
             at MESH_SESSION_WRITE_POOL_SIZE per master, changes to it wait)",
            m.write_leases_in_use.clone(),
        );
        r.register(
            "mesh_session_write_lease_wait_seconds",
            "How long a change waited for a write client",
            m.write_lease_wait_seconds.clone(),
        );
        r.register(
            "mesh_session_write_lease_timeouts",
            "Changes answered UNAVAILABLE because every write client stayed busy with their master",
            m.write_lease_timeouts.clone(),
        );
        Arc::new(m)
    }
}

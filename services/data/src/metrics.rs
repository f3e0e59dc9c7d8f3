//! The data service's own Prometheus metrics (besides `grpc_server_*`,
//! `mesh_db_*`, `db_client_connection_*` and `mesh_client_*`). Every family
//! is registered at start, so a counter reads 0, not "no data", until it
//! first moves.
//!
//! - `mesh_data_writes_total{op="put"|"delete"}`: operations committed
//! - `mesh_data_version_conflicts_total`: writes refused by their precondition
//! - `mesh_data_ratelimited_total`: calls refused over a limit
//! - `mesh_data_ratelimit_undecided_total{mode}`: Checks the rate-limit service could not decide
//! - `mesh_data_session_unavailable_total`: calls refused because no session could be validated
//! - `mesh_data_audit_events_total{result="delivered"|"failed"|"dead_lettered"}`
//! - `mesh_data_outbox_depth`, `mesh_data_outbox_oldest_seconds`, `mesh_data_outbox_dead`:
//!   events waiting for delivery, the age of the oldest, and events the
//!   audit service refused for good (from the last sweep)

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct OpLabels {
    pub(crate) op: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ModeLabels {
    pub(crate) mode: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ResultLabels {
    pub(crate) result: &'static str,
}

/// See the module docs.
#[derive(Debug, Default)]
pub(crate) struct Metrics {
    pub(crate) writes: Family<OpLabels, Counter>,
    pub(crate) conflicts: Counter,
    pub(crate) ratelimited: Counter,
    pub(crate) ratelimit_undecided: Family<ModeLabels, Counter>,
    pub(crate) session_unavailable: Counter,
    pub(crate) audit_events: Family<ResultLabels, Counter>,
    pub(crate) outbox_depth: Gauge,
    pub(crate) outbox_oldest_seconds: Gauge,
    pub(crate) outbox_dead: Gauge,
}

impl Metrics {
    pub(crate) fn register(r: &mut Registry, mode: &'static str) -> std::sync::Arc<Self> {
        let m = Self::default();
        for op in ["put", "delete"] {
            let _ = m.writes.get_or_create(&OpLabels { op });
        }
        let _ = m.ratelimit_undecided.get_or_create(&ModeLabels { mode });
        for result in ["delivered", "failed", "dead_lettered"] {
            let _ = m.audit_events.get_or_create(&ResultLabels { result });
        }
        r.register("mesh_data_writes", "Document writes committed, by operation", m.writes.clone());
        r.register(
            "mesh_data_version_conflicts",
            "Writes refused because their expected_version did not hold",
            m.conflicts.clone(),
        );
        r.register("mesh_data_ratelimited", "Calls refused over a rate limit", m.ratelimited.clone());
        r.register(
            "mesh_data_ratelimit_undecided",
            "Rate-limit checks the rate-limit service could not decide, by the failure mode applied",
            m.ratelimit_undecided.clone(),
        );
        r.register(
            "mesh_data_session_unavailable",
            "Calls refused because the session service could not validate their token",
            m.session_unavailable.clone(),
        );
        r.register(
            "mesh_data_audit_events",
            "Audit events from the outbox, by delivery result",
            m.audit_events.clone(),
        );
        r.register("mesh_data_outbox_depth", "Audit events waiting for delivery", m.outbox_depth.clone());
        r.register(
            "mesh_data_outbox_oldest_seconds",
            "Age of the oldest audit event waiting for delivery",
            m.outbox_oldest_seconds.clone(),
        );
        r.register(
            "mesh_data_outbox_dead",
            "Audit events the audit service refused for good (kept in the outbox for an operator)",
            m.outbox_dead.clone(),
        );
        std::sync::Arc::new(m)
    }
}

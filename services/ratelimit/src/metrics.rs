//! The service's Prometheus metrics. Per-rule series are labelled by domain
//! and rule name, both from the rules file, never by descriptor values, so
//! cardinality is bounded by the configuration.

use std::sync::Arc;

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct RuleLabels {
    pub(crate) domain: String,
    pub(crate) rule: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct OpLabels {
    pub(crate) op: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ErrorLabels {
    pub(crate) op: &'static str,
    pub(crate) kind: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct FallbackLabels {
    pub(crate) domain: String,
    pub(crate) mode: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ResultLabels {
    pub(crate) result: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct StateLabels {
    pub(crate) state: &'static str,
}

/// Every metric of the service.
#[derive(Debug, Clone)]
pub(crate) struct Metrics {
    pub(crate) total_hits: Family<RuleLabels, Counter>,
    pub(crate) over_limit: Family<RuleLabels, Counter>,
    pub(crate) near_limit: Family<RuleLabels, Counter>,
    pub(crate) within_limit: Family<RuleLabels, Counter>,
    pub(crate) shadow_mode: Family<RuleLabels, Counter>,
    pub(crate) over_limit_local_cache: Family<RuleLabels, Counter>,
    pub(crate) redis_seconds: Family<OpLabels, Histogram, fn() -> Histogram>,
    pub(crate) redis_errors: Family<ErrorLabels, Counter>,
    pub(crate) compensations: Family<ResultLabels, Counter>,
    pub(crate) breaker_state: Gauge,
    pub(crate) breaker_transitions: Family<StateLabels, Counter>,
    pub(crate) fallback: Family<FallbackLabels, Counter>,
    pub(crate) reloads: Family<ResultLabels, Counter>,
    pub(crate) domains: Gauge,
}

fn histogram() -> Histogram {
    Histogram::new(mesh_runtime::latency_buckets())
}

impl Metrics {
    pub(crate) fn register(r: &mut Registry) -> Arc<Self> {
        let m = Self {
            total_hits: Family::default(),
            over_limit: Family::default(),
            near_limit: Family::default(),
            within_limit: Family::default(),
            shadow_mode: Family::default(),
            over_limit_local_cache: Family::default(),
            redis_seconds: Family::new_with_constructor(histogram),
            redis_errors: Family::default(),
            compensations: Family::default(),
            breaker_state: Gauge::default(),
            breaker_transitions: Family::default(),
            fallback: Family::default(),
            reloads: Family::default(),
            domains: Gauge::default(),
        };
        r.register("mesh_ratelimit_total_hits", "Hits checked against a rule", m.total_hits.clone());
        r.register(
            "mesh_ratelimit_over_limit",
            "Hits refused by a rule (shadow rules included)",
            m.over_limit.clone(),
        );
        r.register(
            "mesh_ratelimit_near_limit",
            "Allowed hits that left a rule above 80% of its limit",
            m.near_limit.clone(),
        );
        r.register("mesh_ratelimit_within_limit", "Hits allowed by a rule", m.within_limit.clone());
        r.register(
            "mesh_ratelimit_shadow_mode",
            "Hits over a shadow-mode rule, allowed because the rule is not enforced",
            m.shadow_mode.clone(),
        );
        r.register(
            "mesh_ratelimit_over_limit_with_local_cache",
            "Hits refused from the local over-limit cache without asking Redis",
            m.over_limit_local_cache.clone(),
        );
        r.register(
            "mesh_ratelimit_redis_seconds",
            "Redis round trips of the rate limiter (check: one Check's decision, all slots)",
            m.redis_seconds.clone(),
        );
        r.register(
            "mesh_ratelimit_redis_errors",
            "Redis operations that failed, by kind (timeout, error, breaker_open)",
            m.redis_errors.clone(),
        );
        r.register(
            "mesh_ratelimit_compensations",
            "Hits given back to slots of a multi-slot call that another slot refused",
            m.compensations.clone(),
        );
        r.register(
            "mesh_ratelimit_redis_breaker_state",
            "Circuit breaker around Redis: 0 closed, 1 half-open, 2 open",
            m.breaker_state.clone(),
        );
        r.register(
            "mesh_ratelimit_redis_breaker_transitions",
            "Circuit breaker state changes, by new state",
            m.breaker_transitions.clone(),
        );
        r.register(
            "mesh_ratelimit_fallback_decisions",
            "Checks decided by the domain's failure mode because Redis could not answer",
            m.fallback.clone(),
        );
        r.register("mesh_ratelimit_rule_reloads", "Rules reload attempts, by result", m.reloads.clone());
        r.register("mesh_ratelimit_domains", "Domains in the rules in force", m.domains.clone());
        Arc::new(m)
    }
}

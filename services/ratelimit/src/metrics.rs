//! The service's Prometheus metrics. Per-rule series are labelled by domain
//! and rule name, both from the rules file, never by descriptor values, so
//! cardinality is bounded by the configuration. Every family has its series
//! at 0 from the start (per-rule ones from each rules load), so alerts read 0,
//! not "no data".
//!
//! Per rule, `total_hits = within_limit + over_limit`: a hit is counted once,
//! as allowed (consumed) or as refused by this rule. The hits of a call that
//! another rule refused are neither consumed (all-or-nothing) nor refused by
//! this rule, so none of the three counts them.

use std::{
    collections::HashSet,
    sync::{Arc, Mutex},
};

use crate::rules::Rules;

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

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct DomainLabels {
    pub(crate) domain: String,
}

/// How many distinct unknown domains get their own series; the rest share
/// [`OTHER_DOMAIN`], so a caller spraying random domains adds one series.
pub(crate) const UNKNOWN_DOMAIN_SERIES: usize = 32;

/// The `domain` label of unknown domains past [`UNKNOWN_DOMAIN_SERIES`], and
/// of names longer than [`UNKNOWN_DOMAIN_MAX_LEN`] or not printable ASCII.
pub(crate) const OTHER_DOMAIN: &str = "_other";

/// Longest unknown domain name used as a label.
pub(crate) const UNKNOWN_DOMAIN_MAX_LEN: usize = 64;

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
    pub(crate) unknown_domain: Family<DomainLabels, Counter>,
    /// Unknown domains that have their own series (at most [`UNKNOWN_DOMAIN_SERIES`]).
    unknown_seen: Arc<Mutex<HashSet<String>>>,
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
            unknown_domain: Family::default(),
            unknown_seen: Arc::default(),
        };
        for op in ["check", "reset"] {
            let _ = m.redis_seconds.get_or_create(&OpLabels { op });
            for kind in ["timeout", "error", "breaker_open"] {
                let _ = m.redis_errors.get_or_create(&ErrorLabels { op, kind });
            }
        }
        let _ = m.redis_errors.get_or_create(&ErrorLabels { op: "check", kind: "timeout_queued" });
        for result in ["ok", "failed"] {
            let _ = m.compensations.get_or_create(&ResultLabels { result });
        }
        for state in ["closed", "half_open", "open"] {
            let _ = m.breaker_transitions.get_or_create(&StateLabels { state });
        }
        for result in ["ok", "error"] {
            let _ = m.reloads.get_or_create(&ResultLabels { result });
        }
        let _ = m.unknown_domain.get_or_create(&DomainLabels { domain: OTHER_DOMAIN.to_owned() });
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
        r.register(
            "mesh_ratelimit_unknown_domain",
            "Checks against a domain that has no rules (allowed), by domain (the first 32 distinct names; later ones as _other)",
            m.unknown_domain.clone(),
        );
        Arc::new(m)
    }

    /// Puts every rule with a limit in `rules` at 0 in the per-rule counters,
    /// and every domain in `fallback_decisions` under its failure mode.
    pub(crate) fn initialize(&self, rules: &Rules) {
        for domain in rules.domains.values() {
            let _ = self.fallback.get_or_create(&FallbackLabels {
                domain: domain.name.clone(),
                mode: domain.failure_mode.as_str(),
            });
            let mut stack = vec![&domain.root];
            while let Some(level) = stack.pop() {
                for node in &level.nodes {
                    stack.push(&node.children);
                    let Some(rule) = node.rule.as_ref().filter(|r| r.limit.is_some()) else { continue };
                    let labels = RuleLabels { domain: domain.name.clone(), rule: rule.name.to_string() };
                    for family in [
                        &self.total_hits,
                        &self.over_limit,
                        &self.near_limit,
                        &self.within_limit,
                        &self.shadow_mode,
                        &self.over_limit_local_cache,
                    ] {
                        let _ = family.get_or_create(&labels);
                    }
                }
            }
        }
    }

    /// Counts a Check against `domain`, which has no rules: its own series
    /// for the first [`UNKNOWN_DOMAIN_SERIES`] distinct names, then `_other`.
    pub(crate) fn count_unknown_domain(&self, domain: &str) {
        let printable = !domain.is_empty()
            && domain.len() <= UNKNOWN_DOMAIN_MAX_LEN
            && domain.bytes().all(|b| b.is_ascii_graphic());
        let label = {
            let mut seen = self.unknown_seen.lock().unwrap_or_else(|e| e.into_inner());
            if printable && (seen.contains(domain) || seen.len() < UNKNOWN_DOMAIN_SERIES) {
                seen.insert(domain.to_owned());
                domain
            } else {
                OTHER_DOMAIN
            }
        };
        self.unknown_domain.get_or_create(&DomainLabels { domain: label.to_owned() }).inc();
    }
}

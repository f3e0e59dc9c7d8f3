//! The decision: rules → local over-limit cache → Redis (deadline, breaker)
//! → the domain's failure mode, with Envoy's `unlimited` and `replaces`
//! semantics and the per-rule metrics.

use std::{
    collections::HashSet,
    fmt::Write as _,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use crate::{
    algo::{Outcome, Params},
    error::Error,
    local::{LocalItem, LocalLimiter, OverLimitCache},
    metrics::{FallbackLabels, Metrics, RuleLabels},
    request::CheckCall,
    rules::{FailureMode, Limit, Rule, Rules, RulesHandle},
    store::{RedisItem, Store},
};

/// An allowed call that leaves a rule above this share of its limit counts
/// as near the limit (Envoy's threshold).
const NEAR_LIMIT_RATIO: f64 = 0.8;

/// What fail_closed answers as retry_after (and reset): when the breaker may
/// let a call probe Redis again.
const FAIL_CLOSED_RETRY: Duration = Duration::from_secs(1);

/// What made the decision (also sent as `x-mesh-ratelimit-decided-by`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DecidedBy {
    /// No descriptor had a limit to count: no counter was touched.
    Rules,
    Redis,
    /// Refused from the local over-limit cache.
    LocalCache,
    /// Redis could not answer; the fail_open domain's local limiter decided.
    FailOpen,
    /// Redis could not answer; the fail_closed domain refused.
    FailClosed,
}

impl DecidedBy {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Rules => "rules",
            Self::Redis => "redis",
            Self::LocalCache => "local-cache",
            Self::FailOpen => "fail-open",
            Self::FailClosed => "fail-closed",
        }
    }
}

/// The decision for one descriptor.
#[derive(Debug, Clone, Default)]
pub(crate) struct Status {
    pub(crate) over: bool,
    /// The rule with a limit that applied (`None`: no rule, replaced or unlimited).
    pub(crate) rule: Option<Arc<Rule>>,
    pub(crate) unlimited: bool,
    pub(crate) remaining: u32,
    pub(crate) reset: Option<Duration>,
    pub(crate) retry_after: Option<Duration>,
    pub(crate) shadow: bool,
}

impl Status {
    /// The limit that applied.
    pub(crate) fn limit(&self) -> Option<(&Rule, &Limit)> {
        let r = self.rule.as_deref()?;
        Some((r, r.limit.as_ref()?))
    }
}

/// The decision for a call.
#[derive(Debug, Clone)]
pub(crate) struct Decision {
    pub(crate) over: bool,
    pub(crate) statuses: Vec<Status>,
    pub(crate) decided_by: DecidedBy,
}

/// One descriptor that counts against a limit.
struct Item {
    index: usize,
    rule: Arc<Rule>,
    params: Params,
    key: String,
    hits: u32,
}

/// The limiter.
#[derive(Debug)]
pub(crate) struct Engine {
    rules: RulesHandle,
    store: Store,
    cache: OverLimitCache,
    local: LocalLimiter,
    metrics: Arc<Metrics>,
    prefix: String,
    /// When a fallback was last logged (ms since the epoch): at most one line per 10 s.
    last_fallback_log: AtomicU64,
}

/// Escapes the separators of a Redis key part, so different descriptors
/// never share a key (`a=b|c` vs `a` = `b|c`).
fn escape(out: &mut String, s: &str) {
    for ch in s.chars() {
        match ch {
            '%' => out.push_str("%25"),
            '|' => out.push_str("%7C"),
            '=' => out.push_str("%3D"),
            '{' => out.push_str("%7B"),
            '}' => out.push_str("%7D"),
            c => out.push(c),
        }
    }
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_millis() as u64
}

impl Engine {
    pub(crate) fn new(
        rules: RulesHandle,
        store: Store,
        cache_size: usize,
        cache_recheck: Duration,
        fallback_size: usize,
        metrics: Arc<Metrics>,
        prefix: String,
    ) -> Self {
        Self {
            rules,
            store,
            cache: OverLimitCache::new(cache_size, cache_recheck),
            local: LocalLimiter::new(fallback_size),
            metrics,
            prefix,
            last_fallback_log: AtomicU64::new(0),
        }
    }

    pub(crate) fn rules(&self) -> Arc<Rules> {
        self.rules.get()
    }

    /// Forgets cached over-limit keys (rules changed: limits may have).
    pub(crate) fn rules_changed(&self) {
        self.cache.clear();
    }

    /// The Redis key of a descriptor under a limit.
    fn key(&self, domain: &str, entries: &[(String, String)], limit: &Limit, is_override: bool) -> String {
        let mut k = String::with_capacity(self.prefix.len() + 32 + domain.len());
        k.push_str(&self.prefix);
        k.push_str("rl:{");
        escape(&mut k, domain);
        for (key, value) in entries {
            k.push('|');
            escape(&mut k, key);
            k.push('=');
            escape(&mut k, value);
        }
        let _ = write!(k, "}}:{}:{}", limit.algorithm.tag(), limit.unit.seconds());
        if is_override {
            let _ = write!(k, ":ov{}", limit.requests_per_unit);
        }
        k
    }

    fn labels(domain: &str, rule: &Rule) -> RuleLabels {
        RuleLabels { domain: domain.to_owned(), rule: rule.name.to_string() }
    }

    /// Decides a call. Never fails and never waits on Redis longer than the deadline.
    pub(crate) async fn check(&self, call: &CheckCall) -> Decision {
        let rules = self.rules.get();
        let n = call.descriptors.len();
        let mut statuses = vec![Status::default(); n];
        let Some(domain) = rules.domain(&call.domain) else {
            self.metrics.count_unknown_domain(&call.domain);
            return Decision { over: false, statuses, decided_by: DecidedBy::Rules };
        };

        // Match, then apply Envoy's `replaces` and `unlimited`.
        let matched: Vec<Option<(Arc<Rule>, bool)>> = call
            .descriptors
            .iter()
            .map(|d| match &d.limit_override {
                Some(l) => Some((
                    Arc::new(Rule {
                        name: "override".into(),
                        named: false,
                        limit: Some(l.clone()),
                        shadow_mode: false,
                        replaces: Vec::new(),
                    }),
                    true,
                )),
                None => domain
                    .find(d.entries.iter().map(|(k, v)| (k.as_str(), v.as_str())))
                    .map(|r| (r.clone(), false)),
            })
            .collect();
        let replaced: HashSet<&str> =
            matched.iter().flatten().flat_map(|(r, _)| r.replaces.iter().map(String::as_str)).collect();
        let mut items = Vec::new();
        for (index, m) in matched.iter().enumerate() {
            let Some((rule, is_override)) = m else { continue };
            let Some(limit) = &rule.limit else {
                statuses[index].unlimited = true;
                statuses[index].remaining = u32::MAX;
                continue;
            };
            if rule.named && replaced.contains(&*rule.name) {
                continue;
            }
            let d = &call.descriptors[index];
            statuses[index].rule = Some(rule.clone());
            statuses[index].shadow = rule.shadow_mode;
            items.push(Item {
                index,
                rule: rule.clone(),
                params: Params::from(limit),
                key: self.key(&domain.name, &d.entries, limit, *is_override),
                hits: d.hits,
            });
        }
        if items.is_empty() {
            return Decision { over: false, statuses, decided_by: DecidedBy::Rules };
        }
        // A call with a key known to be over, whose every key's answer is
        // known: refused without a round trip, answering what Redis did.
        let cached: Option<Vec<Outcome>> = items.iter().map(|it| self.cache.get(&it.key)).collect();
        let cached = cached
            .filter(|outcomes| items.iter().zip(outcomes).any(|(it, o)| o.over && !it.rule.shadow_mode));
        if let Some(outcomes) = cached {
            for (it, o) in items.iter().zip(&outcomes) {
                if o.over && !it.rule.shadow_mode {
                    let labels = Self::labels(&domain.name, &it.rule);
                    self.metrics.over_limit_local_cache.get_or_create(&labels).inc_by(u64::from(it.hits));
                }
            }
            return self.decision(&domain.name, &items, outcomes, statuses, DecidedBy::LocalCache);
        }

        let redis_items: Vec<RedisItem<'_>> = items
            .iter()
            .map(|it| RedisItem {
                key: &it.key,
                params: it.params,
                hits: it.hits,
                shadow: it.rule.shadow_mode,
            })
            .collect();
        let (outcomes, decided_by) = match self.store.decide(&redis_items).await {
            Ok(outcomes) => {
                let refused = items.iter().zip(&outcomes).any(|(it, o)| o.over && !it.rule.shadow_mode);
                if refused {
                    self.cache
                        .insert_refused(items.iter().zip(&outcomes).map(|(it, o)| (it.key.as_str(), *o)));
                }
                (outcomes, DecidedBy::Redis)
            }
            Err(e) => {
                let mode = domain.failure_mode;
                self.metrics
                    .fallback
                    .get_or_create(&FallbackLabels { domain: domain.name.clone(), mode: mode.as_str() })
                    .inc();
                let now = now_ms();
                let last = self.last_fallback_log.load(Ordering::Relaxed);
                if now.saturating_sub(last) >= 10_000
                    && self
                        .last_fallback_log
                        .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                        .is_ok()
                {
                    tracing::warn!(domain = %domain.name, mode = mode.as_str(), error = %e, "redis unavailable, deciding by the failure mode");
                } else {
                    tracing::debug!(domain = %domain.name, mode = mode.as_str(), error = %e, "redis unavailable, deciding by the failure mode");
                }
                match mode {
                    FailureMode::FailOpen => {
                        let local: Vec<LocalItem<'_>> = items
                            .iter()
                            .map(|it| LocalItem {
                                key: &it.key,
                                params: it.params,
                                hits: it.hits,
                                shadow: it.rule.shadow_mode,
                            })
                            .collect();
                        (self.local.decide(&local), DecidedBy::FailOpen)
                    }
                    FailureMode::FailClosed => {
                        // Nothing is known: over, nothing left, and come back
                        // when the breaker may probe Redis again.
                        let wait = FAIL_CLOSED_RETRY.as_millis() as u64;
                        let outcomes = items
                            .iter()
                            .map(|_| Outcome {
                                over: true,
                                remaining: 0,
                                reset_ms: wait,
                                retry_ms: Some(wait),
                                retry1_ms: Some(wait),
                            })
                            .collect();
                        (outcomes, DecidedBy::FailClosed)
                    }
                }
            }
        };
        self.decision(&domain.name, &items, outcomes, statuses, decided_by)
    }

    /// The statuses and metrics of a decision, the same way whatever decided.
    fn decision(
        &self,
        domain: &str,
        items: &[Item],
        outcomes: Vec<Outcome>,
        mut statuses: Vec<Status>,
        decided_by: DecidedBy,
    ) -> Decision {
        let mut over = false;
        for (it, o) in items.iter().zip(outcomes) {
            let s = &mut statuses[it.index];
            s.over = o.over;
            s.remaining = o.remaining;
            s.reset = Some(Duration::from_millis(o.reset_ms));
            s.retry_after = if o.over { o.retry_ms.map(Duration::from_millis) } else { None };
            over |= o.over && !it.rule.shadow_mode;
        }
        for it in items {
            let s = &statuses[it.index];
            let labels = Self::labels(domain, &it.rule);
            let hits = u64::from(it.hits);
            // total_hits = within_limit + over_limit (see the metrics module).
            if s.over || !over {
                self.metrics.total_hits.get_or_create(&labels).inc_by(hits);
            }
            if s.over {
                self.metrics.over_limit.get_or_create(&labels).inc_by(hits);
                if it.rule.shadow_mode {
                    self.metrics.shadow_mode.get_or_create(&labels).inc_by(hits);
                }
            } else if !over {
                self.metrics.within_limit.get_or_create(&labels).inc_by(hits);
                let used = it.params.limit - f64::from(s.remaining);
                if used > NEAR_LIMIT_RATIO * it.params.limit {
                    self.metrics.near_limit.get_or_create(&labels).inc_by(hits);
                }
            }
        }
        Decision { over, statuses, decided_by }
    }

    /// Drops the counter of one descriptor (Redis, and this instance's caches).
    pub(crate) async fn reset(&self, domain_name: &str, entries: &[(String, String)]) -> Result<(), Error> {
        let rules = self.rules.get();
        let domain = rules
            .domain(domain_name)
            .ok_or_else(|| Error::NotFound(format!("no rules for domain {domain_name:?}")))?;
        let rule = domain
            .find(entries.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .ok_or_else(|| Error::NotFound("no rule matches the descriptor".to_owned()))?;
        let Some(limit) = &rule.limit else { return Ok(()) };
        let key = self.key(&domain.name, entries, limit, false);
        self.cache.remove(&key);
        self.local.remove(&key);
        self.store.delete(&key).await.map_err(|e| Error::Unavailable(format!("reset failed: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_escape_separators() {
        let mut a = String::new();
        escape(&mut a, "x|y=z{}%");
        assert_eq!(a, "x%7Cy%3Dz%7B%7D%25");
    }
}

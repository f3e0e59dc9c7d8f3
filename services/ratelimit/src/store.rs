//! Counters in the Redis Cluster, decided atomically across hash slots.
//!
//! # Keys
//! One key per descriptor: `<prefix>rl:{<domain>|<k>=<v>|…}:<algorithm>:<unit>`.
//! The hash tag is the descriptor's identity, so descriptors spread over the
//! cluster; a window counter is a hash (`w`, `c`, `p`: window, count,
//! previous count), a token bucket a theoretical arrival time. Every write
//! sets a TTL that ends when the state no longer matters (a fixed window's
//! end, a sliding window's next window's end, a full bucket) plus 1 s.
//!
//! # Protocol: all-or-nothing across slots
//! The descriptors of one call are grouped by hash slot; each group is one
//! `EVALSHA` of `lua/check.lua`, and the groups go out in parallel.
//!
//! - One group: the script decides every descriptor and writes only when all
//!   fit. Exactly all-or-nothing, one round trip.
//! - Several groups: each group's script commits its part only when all of
//!   its descriptors fit (optimistic reservation). When every group fits
//!   the call is allowed — one round trip. When any group does not, the
//!   groups that committed are compensated with `lua/undo.lua` (in
//!   parallel), which takes back exactly the hits they added (from the same
//!   window, still current or now previous; for GCRA the same emission time),
//!   and the call is refused.
//!
//! Guarantees: a call is allowed only if every descriptor fitted in its own
//! slot's atomic step, so limits are never exceeded by concurrent calls (no
//! check-then-update race). A refused call's tentative hits are visible to
//! other calls only between the two round trips: they can make a concurrent
//! call be refused that would have fitted, never allow one that should not.
//! When compensation itself fails (a node dies in between, or this instance
//! does), the hits stay counted until their window or bucket passes — the
//! safe direction — and `mesh_ratelimit_compensations_total{result="failed"}`
//! counts it. For GCRA the give-back is exact unless the bucket had refilled
//! between the two steps, where it errs by at most that interval (< 1 hit at
//! any sane rate).
//!
//! # Deadline and breaker
//! The whole decision has one hard deadline (`MESH_RATELIMIT_REDIS_TIMEOUT_MS`),
//! applied per group so that groups that did commit are known and can be
//! compensated; a call past it is decided by the domain's failure mode.
//! Failures and timeouts feed a `failsafe` circuit breaker that opens when
//! the success rate over a short window drops below a threshold (jittered
//! exponential open periods); while it is open no call waits on Redis at
//! all. A success rate rather than consecutive failures: at high
//! concurrency one stall times out every call in flight at once.

use std::{collections::BTreeMap, fmt, sync::Arc, time::Duration};

use failsafe::{
    Config as BreakerConfig,
    failure_policy::{SuccessRateOverTimeWindow, success_rate_over_time_window},
};
use fred::{clients::Pool, interfaces::KeysInterface, types::scripts::Script};
use futures::future::join_all;
use tokio::time::{Instant, timeout_at};
use tracing::Instrument as _;

use crate::{
    EngineConfig,
    algo::{Outcome, Params},
    metrics::{ErrorLabels, Metrics, OpLabels, ResultLabels, StateLabels},
    rules::Algorithm,
};

const CHECK_LUA: &str = include_str!("lua/check.lua");
const UNDO_LUA: &str = include_str!("lua/undo.lua");

/// One descriptor to decide in Redis.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RedisItem<'a> {
    pub(crate) key: &'a str,
    pub(crate) params: Params,
    pub(crate) hits: u32,
    pub(crate) shadow: bool,
}

/// Why Redis did not decide.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum StoreError {
    #[error("redis circuit breaker is open")]
    BreakerOpen,
    #[error("redis did not answer within {0:?}")]
    Timeout(Duration),
    #[error("redis failed: {0}")]
    Redis(String),
}

impl StoreError {
    fn kind(&self) -> &'static str {
        match self {
            Self::BreakerOpen => "breaker_open",
            Self::Timeout(_) => "timeout",
            Self::Redis(_) => "error",
        }
    }
}

/// Jittered exponential open periods: `start`, doubling, capped at 8×.
#[derive(Debug, Clone)]
struct Backoff {
    next: Duration,
    max: Duration,
}

impl Iterator for Backoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let base = self.next;
        self.next = (self.next * 2).min(self.max);
        // ±25 %, so instances that tripped together do not probe together.
        let jitter = rand::random_range(0.75..1.25);
        Some(base.mul_f64(jitter))
    }
}

/// Breaker state changes → gauge, counter, log.
#[derive(Debug, Clone)]
struct BreakerEvents(Arc<Metrics>);

impl BreakerEvents {
    fn set(&self, value: i64, state: &'static str) {
        self.0.breaker_state.set(value);
        self.0.breaker_transitions.get_or_create(&StateLabels { state }).inc();
    }
}

impl failsafe::Instrument for BreakerEvents {
    fn on_call_rejected(&self) {}

    fn on_open(&self) {
        tracing::warn!("redis circuit breaker open, deciding by each domain's failure mode");
        self.set(2, "open");
    }

    fn on_half_open(&self) {
        tracing::info!("redis circuit breaker half-open, probing redis");
        self.set(1, "half_open");
    }

    fn on_closed(&self) {
        // Also called once at construction: only count real transitions.
        if self.0.breaker_state.get() != 0 {
            tracing::info!("redis circuit breaker closed, redis decides again");
            self.set(0, "closed");
        }
    }
}

type Breaker = failsafe::StateMachine<SuccessRateOverTimeWindow<Backoff>, BreakerEvents>;

/// The Redis side of the limiter.
pub(crate) struct Store {
    pool: Pool,
    check: Script,
    undo: Script,
    timeout: Duration,
    breaker: Breaker,
    metrics: Arc<Metrics>,
}

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Store").field("timeout", &self.timeout).field("breaker", &self.breaker).finish()
    }
}

/// One slot group's answer.
struct GroupResult {
    applied: bool,
    outcomes: Vec<(usize, Outcome)>,
}

fn parse_group(indices: &[usize], raw: &[i64]) -> Result<GroupResult, StoreError> {
    if raw.len() != 1 + 6 * indices.len() {
        return Err(StoreError::Redis(format!("check script returned {} values", raw.len())));
    }
    let opt = |v: i64| u64::try_from(v).ok();
    let outcomes = indices
        .iter()
        .enumerate()
        .map(|(n, i)| {
            let r = &raw[1 + 6 * n..1 + 6 * (n + 1)];
            let over = r[0] == 1;
            (
                *i,
                Outcome {
                    over,
                    remaining: u32::try_from(r[1].max(0)).unwrap_or(u32::MAX),
                    reset_ms: opt(r[2]).unwrap_or(0),
                    retry_ms: if over { opt(r[3]) } else { Some(0) },
                    retry1_ms: opt(r[4]),
                    marker: r[5],
                },
            )
        })
        .collect();
    Ok(GroupResult { applied: raw[0] == 1, outcomes })
}

impl Store {
    pub(crate) fn new(pool: Pool, config: &EngineConfig, metrics: Arc<Metrics>) -> Self {
        let backoff = Backoff { next: config.breaker_open, max: config.breaker_open * 8 };
        let policy = success_rate_over_time_window(
            config.breaker_success_rate,
            config.breaker_min_requests,
            config.breaker_window,
            backoff,
        );
        let breaker =
            BreakerConfig::new().failure_policy(policy).instrument(BreakerEvents(metrics.clone())).build();
        Self {
            pool,
            check: Script::from_lua(CHECK_LUA),
            undo: Script::from_lua(UNDO_LUA),
            timeout: config.redis_timeout,
            breaker,
            metrics,
        }
    }

    fn error(&self, op: &'static str, e: &StoreError) {
        self.metrics.redis_errors.get_or_create(&ErrorLabels { op, kind: e.kind() }).inc();
    }

    /// Decides `items` all-or-nothing (see the module docs). Outcomes are in
    /// the order of `items`.
    pub(crate) async fn decide(&self, items: &[RedisItem<'_>]) -> Result<Vec<Outcome>, StoreError> {
        if !self.breaker.is_call_permitted() {
            let e = StoreError::BreakerOpen;
            self.error("check", &e);
            return Err(e);
        }
        let start = Instant::now();
        let result = self.decide_inner(items, start + self.timeout).await;
        self.metrics
            .redis_seconds
            .get_or_create(&OpLabels { op: "check" })
            .observe(start.elapsed().as_secs_f64());
        match &result {
            Ok(_) => self.breaker.on_success(),
            Err(e) => {
                self.breaker.on_error();
                self.error("check", e);
            }
        }
        result
    }

    async fn decide_inner(
        &self,
        items: &[RedisItem<'_>],
        deadline: Instant,
    ) -> Result<Vec<Outcome>, StoreError> {
        let mut groups: BTreeMap<u16, Vec<usize>> = BTreeMap::new();
        for (i, item) in items.iter().enumerate() {
            groups.entry(fred::util::redis_keyslot(item.key.as_bytes())).or_default().push(i);
        }
        let calls = groups.values().map(|indices| {
            let keys: Vec<String> = indices.iter().map(|i| items[*i].key.to_owned()).collect();
            let mut args: Vec<String> = Vec::with_capacity(6 * indices.len());
            for i in indices {
                let it = &items[*i];
                let alg = match it.params.algorithm {
                    Algorithm::FixedWindow => "1",
                    Algorithm::SlidingWindow => "2",
                    Algorithm::TokenBucket => "3",
                };
                args.extend([
                    alg.to_owned(),
                    it.params.limit.to_string(),
                    it.params.period_ms.to_string(),
                    it.params.burst.to_string(),
                    it.hits.to_string(),
                    if it.shadow { "1" } else { "0" }.to_owned(),
                ]);
            }
            let client = self.pool.next().clone();
            let script = &self.check;
            let timeout = self.timeout;
            async move {
                let call = script.evalsha_with_reload::<Vec<i64>, _, _>(&client, keys, args);
                let raw = match timeout_at(deadline, call)
                    .instrument(mesh_runtime::redis::span("EVALSHA", Some("ratelimit_check")))
                    .await
                {
                    Err(_) => return Err(StoreError::Timeout(timeout)),
                    Ok(Err(e)) => return Err(StoreError::Redis(e.details().to_owned())),
                    Ok(Ok(raw)) => raw,
                };
                parse_group(indices, &raw)
            }
        });
        let results = join_all(calls).await;

        let all_applied = results.iter().all(|r| matches!(r, Ok(g) if g.applied));
        let committed: Vec<&GroupResult> =
            results.iter().filter_map(|r| r.as_ref().ok()).filter(|g| g.applied).collect();
        let first_error = results.iter().find_map(|r| r.as_ref().err().cloned());

        if !all_applied && !committed.is_empty() {
            // Give back what the committed groups consumed (module docs).
            let undo = self.compensate(items, &committed);
            if first_error.is_some() {
                // Redis is in trouble: do not hold the caller for the give-back.
                tokio::spawn(undo.run());
            } else {
                undo.run().await;
            }
        }
        if let Some(e) = first_error {
            return Err(e);
        }

        let mut outcomes = vec![None; items.len()];
        for g in results.into_iter().flatten() {
            for (i, mut o) in g.outcomes {
                if g.applied && !all_applied && !o.over {
                    // Compensated: report the state without this call's hits.
                    o.remaining = o.remaining.saturating_add(items[i].hits);
                }
                outcomes[i] = Some(o);
            }
        }
        Ok(outcomes.into_iter().map(|o| o.expect("every item is in one group")).collect())
    }

    /// The give-back of committed groups, as a future that owns its inputs.
    fn compensate(&self, items: &[RedisItem<'_>], committed: &[&GroupResult]) -> Compensation {
        let mut groups = Vec::new();
        for g in committed {
            let mut keys = Vec::new();
            let mut args = Vec::new();
            let mut hits = 0u64;
            for (i, o) in &g.outcomes {
                let it = &items[*i];
                if o.over || it.hits == 0 {
                    continue;
                }
                let marker = match it.params.algorithm {
                    Algorithm::TokenBucket => (f64::from(it.hits) * it.params.emission_ms()).to_string(),
                    _ => o.marker.to_string(),
                };
                let alg = match it.params.algorithm {
                    Algorithm::FixedWindow => "1",
                    Algorithm::SlidingWindow => "2",
                    Algorithm::TokenBucket => "3",
                };
                keys.push(it.key.to_owned());
                args.extend([alg.to_owned(), it.params.period_ms.to_string(), it.hits.to_string(), marker]);
                hits += u64::from(it.hits);
            }
            if !keys.is_empty() {
                groups.push((keys, args, hits));
            }
        }
        Compensation {
            pool: self.pool.clone(),
            undo: self.undo.clone(),
            timeout: self.timeout,
            metrics: self.metrics.clone(),
            groups,
        }
    }

    /// Drops the counter of one descriptor.
    pub(crate) async fn delete(&self, key: &str) -> Result<(), StoreError> {
        let client = self.pool.next().clone();
        let r = tokio::time::timeout(self.timeout * 10, client.del::<i64, _>(key))
            .instrument(mesh_runtime::redis::span("DEL", None))
            .await;
        let r = match r {
            Err(_) => Err(StoreError::Timeout(self.timeout * 10)),
            Ok(Err(e)) => Err(StoreError::Redis(e.details().to_owned())),
            Ok(Ok(_)) => Ok(()),
        };
        if let Err(e) = &r {
            self.error("reset", e);
        }
        r
    }
}

/// Loads both scripts on every primary once Redis answers, so the first
/// calls do not pay a `NOSCRIPT` round trip inside their deadline.
pub(crate) async fn preload_scripts(pool: Pool) {
    if !mesh_runtime::redis::wait_connected(&pool, crate::app::SCRIPT_PRELOAD_WAIT).await {
        return;
    }
    for script in [Script::from_lua(CHECK_LUA), Script::from_lua(UNDO_LUA)] {
        if let Err(e) = script.load(pool.next()).await {
            tracing::debug!(error = %e.details(), "cannot preload rate-limit scripts, evalsha will load them");
        }
    }
}

/// Undo scripts for committed slot groups.
struct Compensation {
    pool: Pool,
    undo: Script,
    timeout: Duration,
    metrics: Arc<Metrics>,
    groups: Vec<(Vec<String>, Vec<String>, u64)>,
}

impl Compensation {
    async fn run(self) {
        let deadline = Instant::now() + self.timeout;
        let calls = self.groups.into_iter().map(|(keys, args, hits)| {
            let client = self.pool.next().clone();
            let undo = self.undo.clone();
            async move {
                let call = undo.evalsha_with_reload::<i64, _, _>(&client, keys, args);
                let r = timeout_at(deadline, call)
                    .instrument(mesh_runtime::redis::span("EVALSHA", Some("ratelimit_undo")))
                    .await;
                (r.map(|r| r.is_ok()).unwrap_or(false), hits)
            }
        });
        for (ok, hits) in join_all(calls).await {
            let result = if ok { "ok" } else { "failed" };
            if !ok {
                tracing::warn!(
                    hits,
                    "could not give back the hits of a refused call; they stay counted until their window passes"
                );
            }
            self.metrics.compensations.get_or_create(&ResultLabels { result }).inc_by(hits);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_a_cap_with_jitter() {
        let b = Backoff { next: Duration::from_millis(100), max: Duration::from_millis(800) };
        let v: Vec<Duration> = b.take(6).collect();
        for (d, base) in v.iter().zip([100u64, 200, 400, 800, 800, 800]) {
            let base = Duration::from_millis(base);
            assert!(*d >= base.mul_f64(0.75) && *d <= base.mul_f64(1.25), "{d:?} vs {base:?}");
        }
    }

    #[test]
    fn group_results_parse() {
        let g = parse_group(&[3, 5], &[1, 0, 4, 1000, 0, 0, 7, 1, 0, 500, 250, 250, 7]).unwrap();
        assert!(g.applied);
        assert_eq!(g.outcomes[0].0, 3);
        assert_eq!(g.outcomes[0].1.remaining, 4);
        assert!(g.outcomes[1].1.over);
        assert_eq!(g.outcomes[1].1.retry_ms, Some(250));
        assert!(parse_group(&[1], &[1, 0]).is_err());
        let never = parse_group(&[0], &[0, 1, 0, 0, -1, -1, 0]).unwrap();
        assert_eq!(never.outcomes[0].1.retry_ms, None);
    }
}

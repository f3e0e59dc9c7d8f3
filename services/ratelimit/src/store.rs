//! Counters in the Redis Cluster, decided atomically across hash slots.
//!
//! # Keys
//! One key per descriptor: `<prefix>rl:{<domain>|<k>=<v>|…}:<algorithm>:<unit>`.
//! The hash tag is the descriptor's identity, so descriptors spread over the
//! cluster. A fixed window (`fc`) is one integer, the window's number mod
//! 1024 × 2^32 plus its count, so a decision costs Redis a GET and an INCRBY
//! (a SET with its expiry for a window's first hit); a sliding window (`sw`)
//! is a hash (`w`, `c`, `p`: window, count, previous count); a token bucket
//! (`tb`) a theoretical arrival time. Fixed windows were hashes under `fw`
//! before: during a rolling upgrade from that layout, old and new instances
//! count a fixed window apart, so it can admit up to twice its limit until
//! every instance runs the new one (at most one window). Every write
//! sets a TTL that ends when the state no longer matters (a fixed window's
//! end, a sliding window's next window's end, a full bucket) plus 1 s.
//!
//! # Protocol: all-or-nothing across slots
//! The descriptors of one call are grouped by hash slot; each group is one
//! `EVALSHA` of `lua/check.lua`, and the groups go out in parallel. No
//! script is ever resent by the client (`max_attempts: 1` per command): a
//! resend of a check that did run would count its hits twice.
//!
//! - One group: the script decides every descriptor and writes only when all
//!   fit. Exactly all-or-nothing, one round trip.
//! - Several groups: the call gets a random id, and each group's script, when
//!   all of its descriptors fit, writes its hits and records the id, with the
//!   server time, in a sorted set beside each counter it wrote
//!   (`<counter>:r`, same slot). When every group wrote, the call is allowed —
//!   one round trip; the records are dropped after [`RECORD_TTL`] and the
//!   hits are final. When any group refused, failed or timed out, the call is
//!   not allowed by Redis, and a give-back task (spawned: it outlives the
//!   caller) runs `lua/undo.lua` on every group that wrote or may have
//!   written. The undo removes the call's record and takes back exactly the
//!   hits it stands for — once, however often it runs; where the record is
//!   missing it leaves a tombstone so a check still in flight writes nothing.
//!   The task retries with backoff for [`COMPENSATION_BOUND`].
//!
//! Guarantees: a call is allowed only if every descriptor fitted in its own
//! slot's atomic step, so limits are never exceeded by concurrent calls (no
//! check-then-update race), and the hits of an allowed call are never given
//! back. A call Redis did not allow has its hits given back exactly once if
//! its give-back lands within [`COMPENSATION_BOUND`]; until then they are
//! visible (tentative) and can make a concurrent call be refused that would
//! have fitted, never allow one that should not. A give-back that cannot
//! land in time (a node away for longer, or this instance dies) leaves the
//! hits counted until their window or bucket passes — the safe direction —
//! and `mesh_ratelimit_compensations_total{result="failed"}` counts them.
//! A single-group call that fails in flight after Redis ran it stays counted
//! the same way (there is nothing to undo it by). For GCRA the give-back is
//! exact unless the bucket refilled in between, where it errs by at most
//! that interval (< 1 hit at any sane rate).
//!
//! # Deadline and breaker
//! The whole decision has one hard deadline (`MESH_RATELIMIT_REDIS_TIMEOUT_MS`),
//! applied per group so that groups that did commit are known and can be
//! compensated; a call past it is decided by the domain's failure mode.
//! Failures feed the repository's one circuit breaker ([`mesh_tower::Breaker`],
//! the client stack's) that opens when the success rate over a short window
//! drops below a threshold (its backoff for the open periods); while it is
//! open no call waits on Redis at all, and while half-open one call at a time
//! probes Redis, the others are decided by the failure mode. A success rate
//! rather than consecutive failures: at high concurrency one stall times out
//! every call in flight at once.
//!
//! Only evidence that Redis is unhealthy counts: an error from Redis or from
//! the connection to it, and a timeout during which Redis answered no other
//! check of this instance. A timeout while Redis went on answering others
//! is this process' queueing (its runtime or its connection saturated, see
//! the admission limit in `app.rs`), not Redis' failure: the call is still
//! decided by the failure mode, counted as
//! `mesh_ratelimit_redis_errors_total{kind="timeout_queued"}`, and the
//! breaker is not fed — so overload never turns the shared limit into a
//! per-instance one by itself. A wedged node while others answer therefore
//! costs its callers the deadline each, not the breaker.

use std::{
    collections::BTreeMap,
    fmt,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use fred::{
    clients::{Client, Pool},
    interfaces::{ClientLike, KeysInterface},
    types::{ClusterHash, CustomCommand, Value, config::Options, scripts::Script},
};
use futures::future::join_all;
use tokio::time::{Instant, timeout_at};
use tracing::Instrument as _;

use mesh_tower::{Breaker, BreakerConfig, BreakerState, ClientMetrics, Outcome as Evidence};

use crate::{
    EngineConfig,
    algo::{Outcome, Params},
    metrics::{ErrorLabels, Metrics, OpLabels, ResultLabels, StateLabels},
    rules::Algorithm,
};

pub(crate) const CHECK_LUA: &str = include_str!("lua/check.lua");
pub(crate) const UNDO_LUA: &str = include_str!("lua/undo.lua");

/// How long a cross-slot call's records of its hits stay in Redis: a
/// give-back must land within this, after it the hits are final.
pub(crate) const RECORD_TTL: Duration = Duration::from_secs(5);
/// How long a give-back is retried (well inside [`RECORD_TTL`]): the longest
/// a refused call's hits stay visible while Redis answers.
pub(crate) const COMPENSATION_BOUND: Duration = Duration::from_secs(2);
/// Waits between give-back attempts.
const COMPENSATION_BACKOFF: (Duration, Duration) = (Duration::from_millis(5), Duration::from_millis(200));
/// Each give-back attempt waits at least this long for its answer.
const COMPENSATION_ATTEMPT: Duration = Duration::from_millis(100);

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

/// The breaker around Redis: the client stack's breaker, success rate only,
/// one probe at a time while half-open; its transitions go to the service's
/// own gauge, counter and log.
fn redis_breaker(config: &EngineConfig, metrics: &Arc<Metrics>) -> Breaker {
    let breaker = Breaker::new(
        &BreakerConfig {
            consecutive_failures: 0,
            success_rate: config.breaker_success_rate,
            success_rate_window: config.breaker_window,
            success_rate_min_requests: config.breaker_min_requests,
            open_base: config.breaker_open,
            open_max: config.breaker_open * 8,
            half_open_probes: 1,
            ..BreakerConfig::default()
        },
        "redis".into(),
        "cluster".into(),
        // The client families stay unregistered: the service reports below.
        ClientMetrics::default(),
    );
    let metrics = metrics.clone();
    breaker.observe(move |state| {
        let value = match state {
            BreakerState::Closed => {
                tracing::info!("redis circuit breaker closed, redis decides again");
                0
            }
            BreakerState::HalfOpen => {
                tracing::info!("redis circuit breaker half-open, probing redis");
                1
            }
            BreakerState::Open => {
                tracing::warn!("redis circuit breaker open, deciding by each domain's failure mode");
                2
            }
        };
        metrics.breaker_state.set(value);
        metrics.breaker_transitions.get_or_create(&StateLabels { state: state.as_str() }).inc();
    });
    breaker
}

/// When Redis last answered a check: the evidence that tells a timeout of
/// this process' queueing from one of Redis (module docs).
#[derive(Debug)]
struct Answers {
    epoch: std::time::Instant,
    last_us: AtomicU64,
}

impl Answers {
    fn new() -> Self {
        Self { epoch: std::time::Instant::now(), last_us: AtomicU64::new(0) }
    }

    fn micros(&self, t: std::time::Instant) -> u64 {
        u64::try_from(t.saturating_duration_since(self.epoch).as_micros()).unwrap_or(u64::MAX)
    }

    /// Redis answered a check now.
    fn mark(&self) {
        self.last_us.fetch_max(self.micros(std::time::Instant::now()), Ordering::Relaxed);
    }

    /// Whether Redis answered a check after `t`.
    fn since(&self, t: std::time::Instant) -> bool {
        self.last_us.load(Ordering::Relaxed) > self.micros(t)
    }
}

/// The Redis side of the limiter.
pub(crate) struct Store {
    pool: Pool,
    check: Script,
    undo: Script,
    timeout: Duration,
    breaker: Breaker,
    answers: Answers,
    metrics: Arc<Metrics>,
}

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Store").field("timeout", &self.timeout).field("breaker", &self.breaker).finish()
    }
}

/// One slot group's answer.
pub(crate) struct GroupResult {
    pub(crate) applied: bool,
    /// Per descriptor: the outcome as answered, and without this call's hits
    /// (what a refused call reports once its hits are given back).
    pub(crate) outcomes: Vec<(usize, Outcome, Outcome)>,
}

/// Values per descriptor in `check.lua`'s answer.
const CHECK_OUT: usize = 7;

pub(crate) fn parse_group(indices: &[usize], raw: &[i64]) -> Result<GroupResult, StoreError> {
    if raw.len() != 1 + CHECK_OUT * indices.len() {
        return Err(StoreError::Redis(format!("check script returned {} values", raw.len())));
    }
    let opt = |v: i64| u64::try_from(v).ok();
    let count = |v: i64| u32::try_from(v.max(0)).unwrap_or(u32::MAX);
    let outcomes = indices
        .iter()
        .enumerate()
        .map(|(n, i)| {
            let r = &raw[1 + CHECK_OUT * n..1 + CHECK_OUT * (n + 1)];
            let over = r[0] == 1;
            let o = Outcome {
                over,
                remaining: count(r[1]),
                reset_ms: opt(r[2]).unwrap_or(0),
                retry_ms: if over { opt(r[3]) } else { Some(0) },
                retry1_ms: opt(r[4]),
            };
            let before = Outcome { remaining: count(r[5]), reset_ms: opt(r[6]).unwrap_or(0), ..o };
            (*i, o, before)
        })
        .collect();
    Ok(GroupResult { applied: raw[0] == 1, outcomes })
}

fn algorithm_code(a: Algorithm) -> &'static str {
    match a {
        Algorithm::FixedWindow => "1",
        Algorithm::SlidingWindow => "2",
        Algorithm::TokenBucket => "3",
    }
}

/// The record key (`lua/check.lua`) beside a counter: same hash tag, same slot.
fn record_key(key: &str) -> String {
    format!("{key}:r")
}

/// `check.lua`'s KEYS and ARGV for one group: `call_id` empty for a call
/// that records nothing, `now_ms` only in tests (the server's clock otherwise).
pub(crate) fn check_command(
    items: &[&RedisItem<'_>],
    call_id: &str,
    now_ms: Option<f64>,
) -> (Vec<String>, Vec<String>) {
    let mut keys: Vec<String> = items.iter().map(|it| it.key.to_owned()).collect();
    if !call_id.is_empty() {
        keys.extend(items.iter().map(|it| record_key(it.key)));
    }
    let mut args = args_head(call_id, now_ms, 6 * items.len());
    for it in items {
        args.extend([
            algorithm_code(it.params.algorithm).to_owned(),
            it.params.limit.to_string(),
            it.params.period_ms.to_string(),
            it.params.burst.to_string(),
            it.hits.to_string(),
            if it.shadow { "1" } else { "0" }.to_owned(),
        ]);
    }
    (keys, args)
}

/// The ARGV head both scripts read the same way: the call id, the record
/// TTL (ms) and the test clock (ms, empty: the server's), with room for
/// `more` per-descriptor arguments after it.
fn args_head(call_id: &str, now_ms: Option<f64>, more: usize) -> Vec<String> {
    let mut args = Vec::with_capacity(3 + more);
    args.extend([
        call_id.to_owned(),
        RECORD_TTL.as_millis().to_string(),
        now_ms.map(|t| t.to_string()).unwrap_or_default(),
    ]);
    args
}

/// `undo.lua`'s KEYS and ARGV for one group of a call (`now_ms` as for
/// [`check_command`]).
pub(crate) fn undo_command(
    items: &[&RedisItem<'_>],
    call_id: &str,
    now_ms: Option<f64>,
) -> (Vec<String>, Vec<String>) {
    let mut keys: Vec<String> = items.iter().map(|it| it.key.to_owned()).collect();
    keys.extend(items.iter().map(|it| record_key(it.key)));
    let mut args = args_head(call_id, now_ms, 4 * items.len());
    for it in items {
        args.extend([
            algorithm_code(it.params.algorithm).to_owned(),
            it.params.period_ms.to_string(),
            it.params.emission_ms().to_string(),
            it.hits.to_string(),
        ]);
    }
    (keys, args)
}

/// One `EVALSHA` on the primary of `slot`, written at most once per
/// attempt: the client never resends it (on a reconnection, say), and gives
/// up on it unsent after `timeout`. Sent again only where it certainly did
/// not run: a `NOSCRIPT` (loads the script first) and, within `timeout`, a
/// redirection of a slot in motion (`mesh_runtime::redis::is_redirection`).
pub(crate) async fn eval_once(
    client: &Client,
    script: &Script,
    slot: u16,
    keys: Vec<String>,
    args: Vec<String>,
    timeout: Duration,
) -> Result<Value, fred::error::Error> {
    let options = Options { max_attempts: Some(1), timeout: Some(timeout), ..Options::default() };
    let mut argv: Vec<Value> = Vec::with_capacity(2 + keys.len() + args.len());
    argv.push(Value::from(script.sha1().clone()));
    argv.push(Value::from(keys.len() as i64));
    argv.extend(keys.into_iter().map(Value::from));
    argv.extend(args.into_iter().map(Value::from));
    let command = CustomCommand::new_static("EVALSHA", ClusterHash::Custom(slot), false);
    let with = client.with_options(&options);
    mesh_runtime::redis::retry_redirected(timeout, || async {
        match with.custom::<Value, Value>(command.clone(), argv.clone()).await {
            Err(e) if e.details().starts_with("NOSCRIPT") => {
                script.load(client).await?;
                with.custom(command.clone(), argv.clone()).await
            }
            r => r,
        }
    })
    .await
}

pub(crate) fn to_ints(v: Value) -> Result<Vec<i64>, StoreError> {
    use fred::types::FromValue as _;
    Vec::<i64>::from_value(v).map_err(|e| StoreError::Redis(e.details().to_owned()))
}

impl Store {
    pub(crate) fn new(pool: Pool, config: &EngineConfig, metrics: Arc<Metrics>) -> Self {
        let breaker = redis_breaker(config, &metrics);
        Self {
            pool,
            check: Script::from_lua(CHECK_LUA),
            undo: Script::from_lua(UNDO_LUA),
            timeout: config.redis_timeout,
            breaker,
            answers: Answers::new(),
            metrics,
        }
    }

    fn error(&self, op: &'static str, e: &StoreError) {
        self.metrics.redis_errors.get_or_create(&ErrorLabels { op, kind: e.kind() }).inc();
    }

    /// Decides `items` all-or-nothing (see the module docs). Outcomes are in
    /// the order of `items`.
    pub(crate) async fn decide(&self, items: &[RedisItem<'_>]) -> Result<Vec<Outcome>, StoreError> {
        let Some(permit) = self.breaker.try_acquire() else {
            let e = StoreError::BreakerOpen;
            self.error("check", &e);
            return Err(e);
        };
        let start = Instant::now();
        let result = self.decide_inner(items, start + self.timeout).await;
        self.metrics
            .redis_seconds
            .get_or_create(&OpLabels { op: "check" })
            .observe(start.elapsed().as_secs_f64());
        match &result {
            Ok(_) => permit.record(Evidence::Status(tonic::Code::Ok)),
            // Redis answered others meanwhile: the time went here (module docs).
            Err(StoreError::Timeout(_)) if self.answers.since(start.into_std()) => {
                drop(permit);
                self.metrics
                    .redis_errors
                    .get_or_create(&ErrorLabels { op: "check", kind: "timeout_queued" })
                    .inc();
            }
            Err(e) => {
                permit.record(Evidence::Transport);
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
        let groups: Vec<(u16, Vec<usize>)> = groups.into_iter().collect();
        // Only a call over several slots can need a give-back, and only its
        // writes are recorded (module docs).
        let call_id =
            if groups.len() > 1 { format!("{:016x}", rand::random::<u64>()) } else { String::new() };
        let calls = groups.iter().map(|(slot, indices)| {
            let group: Vec<&RedisItem<'_>> = indices.iter().map(|i| &items[*i]).collect();
            let (keys, args) = check_command(&group, &call_id, None);
            let client = self.pool.next().clone();
            let script = &self.check;
            let answers = &self.answers;
            let timeout = self.timeout;
            let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
            async move {
                let call = eval_once(&client, script, *slot, keys, args, left);
                let raw = match timeout_at(deadline, call)
                    .instrument(mesh_runtime::redis::span_at(
                        &client,
                        "EVALSHA",
                        Some("ratelimit_check"),
                        *slot,
                    ))
                    .await
                {
                    Err(_) => return Err(StoreError::Timeout(timeout)),
                    Ok(Err(e)) => return Err(StoreError::Redis(e.details().to_owned())),
                    Ok(Ok(raw)) => {
                        answers.mark();
                        to_ints(raw)?
                    }
                };
                parse_group(indices, &raw)
            }
        });
        let results = join_all(calls).await;

        let all_applied = results.iter().all(|r| matches!(r, Ok(g) if g.applied));
        let first_error = results.iter().find_map(|r| r.as_ref().err().cloned());
        if !all_applied && !call_id.is_empty() {
            // Every group that wrote, or may have written, gives back (module docs).
            let undo: Vec<(u16, Vec<usize>)> = groups
                .iter()
                .zip(&results)
                .filter(|(_, r)| !matches!(r, Ok(g) if !g.applied))
                .map(|((slot, indices), _)| {
                    (*slot, indices.iter().copied().filter(|i| items[*i].hits > 0).collect::<Vec<_>>())
                })
                .filter(|(_, indices)| !indices.is_empty())
                .collect();
            if !undo.is_empty() {
                let task = tokio::spawn(self.compensate(items, &call_id, &undo).run());
                if first_error.is_none() {
                    // Redis answers: let the caller see its state given back,
                    // briefly; the task goes on without it either way.
                    let _ = tokio::time::timeout(self.timeout, task).await;
                }
            }
        }
        if let Some(e) = first_error {
            return Err(e);
        }

        let mut outcomes = vec![None; items.len()];
        for g in results.into_iter().flatten() {
            for (i, o, before) in g.outcomes {
                // A refused call's hits are given back: report the state without them.
                outcomes[i] = Some(if all_applied { o } else { before });
            }
        }
        Ok(outcomes.into_iter().map(|o| o.expect("every item is in one group")).collect())
    }

    /// The give-back of a call's groups, as a future that owns its inputs.
    fn compensate(
        &self,
        items: &[RedisItem<'_>],
        call_id: &str,
        groups: &[(u16, Vec<usize>)],
    ) -> Compensation {
        let groups = groups
            .iter()
            .map(|(slot, indices)| {
                let group: Vec<&RedisItem<'_>> = indices.iter().map(|i| &items[*i]).collect();
                let (keys, args) = undo_command(&group, call_id, None);
                let hits = group.iter().map(|it| u64::from(it.hits)).sum();
                UndoGroup { slot: *slot, keys, args, hits }
            })
            .collect();
        Compensation {
            pool: self.pool.clone(),
            undo: self.undo.clone(),
            attempt: self.timeout.max(COMPENSATION_ATTEMPT),
            metrics: self.metrics.clone(),
            groups,
        }
    }

    /// Drops the counter of one descriptor.
    pub(crate) async fn delete(&self, key: &str) -> Result<(), StoreError> {
        let client = self.pool.next().clone();
        let r = tokio::time::timeout(
            self.timeout * 10,
            client.del::<i64, _>(vec![key.to_owned(), record_key(key)]),
        )
        .instrument(mesh_runtime::redis::span_at(&client, "DEL", None, mesh_runtime::redis::slot_of(key)))
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

/// One group's give-back.
struct UndoGroup {
    slot: u16,
    keys: Vec<String>,
    args: Vec<String>,
    /// The hits the call asked for in this group (logs only).
    hits: u64,
}

/// The give-back of one call: `undo.lua` on each group, retried until it
/// lands or [`COMPENSATION_BOUND`] passes (it is idempotent, so a retry of
/// one that did run is harmless).
struct Compensation {
    pool: Pool,
    undo: Script,
    attempt: Duration,
    metrics: Arc<Metrics>,
    groups: Vec<UndoGroup>,
}

impl Compensation {
    async fn run(self) {
        let bound = Instant::now() + COMPENSATION_BOUND;
        let calls = self.groups.into_iter().map(|g| {
            let pool = self.pool.clone();
            let undo = self.undo.clone();
            let attempt = self.attempt;
            async move {
                let mut waits =
                    mesh_tower::Backoff::new(COMPENSATION_BACKOFF.0, COMPENSATION_BACKOFF.1).iter();
                loop {
                    let until = (Instant::now() + attempt).min(bound);
                    let client = pool.next();
                    let call = eval_once(client, &undo, g.slot, g.keys.clone(), g.args.clone(), attempt);
                    let r = timeout_at(until, call)
                        .instrument(mesh_runtime::redis::span_at(
                            client,
                            "EVALSHA",
                            Some("ratelimit_undo"),
                            g.slot,
                        ))
                        .await;
                    match r {
                        Ok(Ok(given)) => return (Some(given.as_i64().unwrap_or(0)), g.hits),
                        _ => {
                            let wait = waits.next().unwrap_or(COMPENSATION_BACKOFF.1);
                            if Instant::now() + wait >= bound {
                                return (None, g.hits);
                            }
                            tokio::time::sleep(wait).await;
                        }
                    }
                }
            }
        });
        for (given, hits) in join_all(calls).await {
            match given {
                Some(given) => {
                    let given = u64::try_from(given).unwrap_or(0);
                    self.metrics.compensations.get_or_create(&ResultLabels { result: "ok" }).inc_by(given);
                }
                None => {
                    tracing::warn!(
                        hits,
                        "could not give back the hits of a call redis did not allow; they stay counted until their window passes"
                    );
                    self.metrics.compensations.get_or_create(&ResultLabels { result: "failed" }).inc_by(hits);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_results_parse() {
        let g = parse_group(&[3, 5], &[1, 0, 4, 1000, 0, 0, 5, 900, 1, 0, 500, 250, 250, 0, 500]).unwrap();
        assert!(g.applied);
        assert_eq!(g.outcomes[0].0, 3);
        assert_eq!(g.outcomes[0].1.remaining, 4);
        assert_eq!((g.outcomes[0].2.remaining, g.outcomes[0].2.reset_ms), (5, 900));
        assert!(g.outcomes[1].1.over);
        assert_eq!(g.outcomes[1].1.retry_ms, Some(250));
        assert!(parse_group(&[1], &[1, 0]).is_err());
        let never = parse_group(&[0], &[0, 1, 0, 0, -1, -1, 0, 0]).unwrap();
        assert_eq!(never.outcomes[0].1.retry_ms, None);
    }
}

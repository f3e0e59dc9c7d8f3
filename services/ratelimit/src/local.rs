//! What the service keeps in memory: the cache of answers for keys already
//! over their limit, and the fallback limiter that decides while Redis
//! cannot. Both are bounded `quick_cache` caches (sharded, O(1) per
//! operation, no scans under a lock).

use std::{
    collections::HashMap,
    hash::{BuildHasher, RandomState},
    sync::{Arc, Mutex},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use quick_cache::{DefaultHashBuilder, Lifecycle, UnitWeighter, sync::Cache};
use tokio::time::Instant;

use crate::{
    algo::{self, Outcome, Params, State},
    rules::Algorithm,
};

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A descriptor's answer from Redis, kept for a while.
#[derive(Debug, Clone, Copy)]
struct Known {
    outcome: Outcome,
    at: Instant,
    /// Until when the answer may stand in for Redis.
    until: Instant,
}

impl Known {
    /// The answer as it stands at `now`: the waits shortened by the time since.
    fn at(&self, now: Instant) -> Outcome {
        let spent = now.saturating_duration_since(self.at).as_millis() as u64;
        let o = self.outcome;
        Outcome {
            reset_ms: o.reset_ms.saturating_sub(spent),
            retry_ms: o.retry_ms.map(|ms| ms.saturating_sub(spent)),
            retry1_ms: o.retry1_ms.map(|ms| ms.saturating_sub(spent)),
            ..o
        }
    }
}

/// Answers of calls Redis refused, per key: the keys that were over, until a
/// single hit fits again, and the other descriptors of those calls, so a
/// call can be refused without a Redis round trip and still answer every
/// descriptor as Redis did (remaining, reset, retry; the waits shortened by
/// the time since). A hot abusive key costs Redis at most one call per
/// recheck period per instance. Per instance; bounded; cleared by Reset (on
/// this instance) and by a rules reload. The recheck bounds how stale an
/// answer can be: another instance's hits or Reset go unnoticed here for at
/// most that long.
#[derive(Debug)]
pub(crate) struct OverLimitCache {
    entries: Option<Cache<String, Known>>,
    recheck: Duration,
}

impl OverLimitCache {
    pub(crate) fn new(capacity: usize, recheck: Duration) -> Self {
        Self { entries: (capacity > 0).then(|| Cache::new(capacity)), recheck }
    }

    /// The cached answer for `key`, as it stands now.
    pub(crate) fn get(&self, key: &str) -> Option<Outcome> {
        let now = Instant::now();
        let known = self.entries.as_ref()?.get(key)?;
        (known.until > now).then(|| known.at(now))
    }

    /// Remembers the answers of a call Redis refused. A key over its limit
    /// stands until a single hit fits (or the recheck); the call's other
    /// keys only ever complete such an answer, for the recheck period. Keys
    /// over only for this call's hits (one hit would fit) are not kept.
    pub(crate) fn insert_refused<'a>(&self, answers: impl IntoIterator<Item = (&'a str, Outcome)>) {
        let Some(entries) = &self.entries else { return };
        let now = Instant::now();
        let answers: Vec<(&str, Outcome)> = answers.into_iter().collect();
        let stands = |o: &Outcome| o.over && o.retry1_ms.is_none_or(|ms| ms > 0);
        if !answers.iter().any(|(_, o)| stands(o)) {
            return;
        }
        for (key, outcome) in answers {
            let until = match outcome.retry1_ms {
                Some(ms) if stands(&outcome) => self.recheck.min(Duration::from_millis(ms)),
                _ => self.recheck,
            };
            entries.insert(key.to_owned(), Known { outcome, at: now, until: now + until });
        }
    }

    pub(crate) fn remove(&self, key: &str) {
        if let Some(e) = &self.entries {
            e.remove(key);
        }
    }

    pub(crate) fn clear(&self) {
        if let Some(e) = &self.entries {
            e.clear();
        }
    }
}

/// One descriptor handed to the fallback limiter.
#[derive(Debug)]
pub(crate) struct LocalItem<'a> {
    pub(crate) key: &'a str,
    pub(crate) params: Params,
    pub(crate) hits: u32,
    pub(crate) shadow: bool,
}

/// A limit as a map key (same arithmetic, same floor).
type LimitId = (u8, u64, u64, u64);

fn limit_id(p: &Params) -> LimitId {
    let alg = match p.algorithm {
        Algorithm::FixedWindow => 1,
        Algorithm::SlidingWindow => 2,
        Algorithm::TokenBucket => 3,
    };
    (alg, p.limit.to_bits(), p.period_ms.to_bits(), p.burst.to_bits())
}

/// A tracked key's state.
#[derive(Debug, Clone, Copy)]
struct Tracked {
    state: State,
    /// When the state no longer matters (ms).
    expires_at: f64,
    limit: LimitId,
}

/// The most any state still counts: `a` and `b` of one limit merged.
fn merge(a: State, b: State) -> State {
    match (a, b) {
        (State::Tat(x), State::Tat(y)) => State::Tat(x.max(y)),
        (State::Window { w: w1, c: c1, p: p1 }, State::Window { w: w2, c: c2, p: p2 }) => {
            let ((w1, c1, p1), (w2, c2, p2)) =
                if w1 >= w2 { ((w1, c1, p1), (w2, c2, p2)) } else { ((w2, c2, p2), (w1, c1, p1)) };
            if w1 == w2 {
                State::Window { w: w1, c: c1.max(c2), p: p1.max(p2) }
            } else if w1 == w2 + 1 {
                State::Window { w: w1, c: c1, p: p1.max(c2) }
            } else {
                State::Window { w: w1, c: c1, p: p1 }
            }
        }
        (State::Empty, x) | (x, State::Empty) => x,
        (x, _) => x,
    }
}

/// At most this many limits keep a floor (far more than any rules file has).
const FLOORS: usize = 4096;

/// Per limit, the most any evicted key still counted: where a key is not
/// tracked (new, or evicted), its state starts from this floor, so evicting
/// a key never resets it.
#[derive(Debug, Clone, Default)]
struct Floors(Arc<Mutex<HashMap<LimitId, (State, f64)>>>);

impl Floors {
    fn get(&self, limit: &LimitId, now: f64) -> State {
        lock(&self.0).get(limit).filter(|(_, exp)| *exp > now).map(|(s, _)| *s).unwrap_or_default()
    }

    fn raise(&self, t: &Tracked) {
        let mut floors = lock(&self.0);
        if floors.len() >= FLOORS && !floors.contains_key(&t.limit) {
            // Bounded: forget floors that no longer count, else keep what is there.
            let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs_f64() * 1000.0;
            floors.retain(|_, (_, exp)| *exp > now);
            if floors.len() >= FLOORS {
                return;
            }
        }
        let e = floors.entry(t.limit).or_insert((State::Empty, 0.0));
        e.0 = merge(e.0, t.state);
        e.1 = e.1.max(t.expires_at);
    }
}

impl Lifecycle<String, Tracked> for Floors {
    type RequestState = ();

    fn on_evict(&self, _: &mut (), _key: String, val: Tracked) {
        self.raise(&val);
    }
}

/// Locks held while one call reads and writes its keys (all-or-nothing).
const STRIPES: usize = 64;

/// The in-memory limiter `fail_open` domains fall back to: the same rules
/// and algorithms as Redis, per instance (so with N instances a client may
/// get up to N× its limit while Redis is away). Bounded to `capacity` keys;
/// a key it has to evict raises its limit's floor, where every untracked
/// key of that limit starts, so rotating descriptor values to push keys out
/// never resets a key's count (it makes new keys start fuller instead).
#[derive(Debug)]
pub(crate) struct LocalLimiter {
    states: Cache<String, Tracked, UnitWeighter, DefaultHashBuilder, Floors>,
    floors: Floors,
    stripes: Vec<Mutex<()>>,
    hasher: RandomState,
    base_ms: f64,
    base: Instant,
}

impl LocalLimiter {
    pub(crate) fn new(capacity: usize) -> Self {
        let base_ms = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs_f64() * 1000.0;
        let floors = Floors::default();
        let capacity = capacity.max(1);
        let states = Cache::with(
            capacity,
            capacity as u64,
            UnitWeighter,
            DefaultHashBuilder::default(),
            floors.clone(),
        );
        Self {
            states,
            floors,
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
            hasher: RandomState::new(),
            base_ms,
            base: Instant::now(),
        }
    }

    /// Wall-clock ms, advanced by tokio's clock (so tests can pause it).
    fn now_ms(&self) -> f64 {
        self.base_ms + self.base.elapsed().as_secs_f64() * 1000.0
    }

    /// Decides all items at once, all-or-nothing, as the Redis script does.
    pub(crate) fn decide(&self, items: &[LocalItem<'_>]) -> Vec<Outcome> {
        let mut stripes: Vec<usize> =
            items.iter().map(|i| self.hasher.hash_one(i.key) as usize % STRIPES).collect();
        stripes.sort_unstable();
        stripes.dedup();
        let _held: Vec<_> = stripes.iter().map(|s| lock(&self.stripes[*s])).collect();
        let now = self.now_ms();
        let plans: Vec<algo::Plan> = items
            .iter()
            .map(|i| {
                let limit = limit_id(&i.params);
                let s = match self.states.get(i.key).filter(|t| t.expires_at > now) {
                    Some(t) => t.state,
                    None => self.floors.get(&limit, now),
                };
                algo::plan(&i.params, s, now, i.hits)
            })
            .collect();
        let all_fit = items.iter().zip(&plans).all(|(i, p)| p.fits() || i.shadow);
        if all_fit {
            for (i, p) in items.iter().zip(&plans) {
                if p.fits() && i.hits > 0 {
                    let t = Tracked { state: p.next(), expires_at: p.expires_at, limit: limit_id(&i.params) };
                    self.states.insert(i.key.to_owned(), t);
                }
            }
        }
        plans.iter().map(|p| p.outcome(all_fit && p.fits())).collect()
    }

    pub(crate) fn remove(&self, key: &str) {
        self.states.remove(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::{Limit, Unit};

    fn params(rpu: u32) -> Params {
        Params::from(&Limit {
            requests_per_unit: rpu,
            unit: Unit::Second,
            algorithm: Algorithm::FixedWindow,
            burst: 0,
        })
    }

    fn over(retry1: u64, reset: u64) -> Outcome {
        Outcome { over: true, remaining: 0, reset_ms: reset, retry_ms: Some(retry1), retry1_ms: Some(retry1) }
    }

    fn fits(remaining: u32, reset: u64) -> Outcome {
        Outcome { over: false, remaining, reset_ms: reset, retry_ms: Some(0), retry1_ms: Some(0) }
    }

    #[tokio::test(start_paused = true)]
    async fn refused_answers_stand_until_one_hit_fits_or_the_recheck() {
        const RECHECK: Duration = Duration::from_secs(1);
        let c = OverLimitCache::new(10, RECHECK);
        c.insert_refused([("k", over(500, 3_600_000)), ("broad", fits(98, 3_000_000))]);
        assert_eq!(c.get("k"), Some(over(500, 3_600_000)));
        assert_eq!(c.get("broad"), Some(fits(98, 3_000_000)));
        tokio::time::advance(Duration::from_millis(200)).await;
        // The waits count down; counts stay as Redis said.
        assert_eq!(c.get("k"), Some(over(300, 3_599_800)));
        assert_eq!(c.get("broad"), Some(fits(98, 2_999_800)));
        tokio::time::advance(Duration::from_millis(301)).await;
        assert!(c.get("k").is_none(), "one hit fits again");
        // Long waits are reported in full but rechecked with Redis after RECHECK.
        c.insert_refused([("k", over(3_600_000, 3_600_000))]);
        assert!(c.get("k").is_some());
        tokio::time::advance(RECHECK).await;
        assert!(c.get("k").is_none());
        assert!(c.get("broad").is_none());
        // A call over only for its own hits (one would fit) is not kept.
        c.insert_refused([("k", over(0, 10)), ("broad", fits(1, 10))]);
        assert!(c.get("k").is_none() && c.get("broad").is_none());
        c.insert_refused([("k", over(2000, 2000))]);
        c.remove("k");
        assert!(c.get("k").is_none());
        let off = OverLimitCache::new(0, RECHECK);
        off.insert_refused([("k", over(2000, 2000))]);
        assert!(off.get("k").is_none());
    }

    fn hourly(rpu: u32) -> Params {
        Params::from(&Limit {
            requests_per_unit: rpu,
            unit: Unit::Hour,
            algorithm: Algorithm::SlidingWindow,
            burst: 0,
        })
    }

    fn one(l: &LocalLimiter, key: &str) -> bool {
        !l.decide(&[LocalItem { key, params: hourly(2), hits: 1, shadow: false }])[0].over
    }

    #[tokio::test(start_paused = true)]
    async fn rotating_values_cannot_escape_the_fallback_limits() {
        const CAPACITY: usize = 64;
        let l = LocalLimiter::new(CAPACITY);
        assert!(one(&l, "victim") && one(&l, "victim"));
        assert!(!one(&l, "victim"));
        // Many more values than the limiter tracks, three passes over them:
        // each value is allowed its 2 per hour at most, however often the
        // others push it out.
        let values: Vec<String> = (0..20 * CAPACITY).map(|i| format!("v{i}")).collect();
        let mut allowed: HashMap<&str, u32> = HashMap::new();
        for _ in 0..3 {
            for v in &values {
                *allowed.entry(v).or_default() += u32::from(one(&l, v));
            }
        }
        let most = allowed.values().copied().max().unwrap();
        assert!(most <= 2, "a value got {most} hits past a limit of 2");
        assert!(!one(&l, "victim"), "the victim's count survived its eviction");
        assert!(l.states.len() <= CAPACITY + CAPACITY / 4, "bounded: {}", l.states.len());
        // Once the hour has passed everything is free again.
        tokio::time::advance(Duration::from_secs(2 * 3600 + 1)).await;
        assert!(one(&l, "victim"));
    }

    #[tokio::test(start_paused = true)]
    async fn fallback_is_all_or_nothing_and_refills_with_time() {
        let l = LocalLimiter::new(100);
        let a = LocalItem { key: "a", params: params(2), hits: 1, shadow: false };
        let b = LocalItem { key: "b", params: params(1), hits: 1, shadow: false };
        let first = l.decide(&[LocalItem { ..a }, LocalItem { ..b }]);
        assert!(first.iter().all(|o| !o.over));
        let a = LocalItem { key: "a", params: params(2), hits: 1, shadow: false };
        let b = LocalItem { key: "b", params: params(1), hits: 1, shadow: false };
        let second = l.decide(&[a, b]);
        assert!(!second[0].over && second[1].over);
        assert_eq!(second[0].remaining, 1, "a refused call consumed nothing from a");
        tokio::time::advance(Duration::from_secs(1)).await;
        let b = LocalItem { key: "b", params: params(1), hits: 1, shadow: false };
        assert!(!l.decide(&[b])[0].over, "a new window");
    }
}

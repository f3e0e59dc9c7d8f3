//! What the service keeps in memory: the cache of keys already over their
//! limit, and the fallback limiter that decides while Redis cannot.

use std::{
    collections::HashMap,
    hash::{BuildHasher, RandomState},
    sync::Mutex,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use tokio::time::Instant;

use crate::algo::{self, Outcome, Params, State};

const SHARDS: usize = 16;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Keys Redis said are over their limit, until a single hit fits again. A
/// call with such a key is refused without a Redis round trip, so a hot
/// abusive key costs Redis at most one call per recheck period per instance.
/// Per instance; bounded; cleared by Reset (on this instance) and by a rules
/// reload. The recheck bounds how long another instance's Reset goes
/// unnoticed here.
#[derive(Debug)]
pub(crate) struct OverLimitCache {
    /// Per key: when it fits again (reported as retry_after), when to ask Redis anyway.
    shards: Vec<Mutex<HashMap<String, (Instant, Instant)>>>,
    hasher: RandomState,
    per_shard: usize,
    recheck: Duration,
}

impl OverLimitCache {
    pub(crate) fn new(capacity: usize, recheck: Duration) -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            hasher: RandomState::new(),
            per_shard: capacity.div_ceil(SHARDS),
            recheck,
        }
    }

    fn shard(&self, key: &str) -> &Mutex<HashMap<String, (Instant, Instant)>> {
        &self.shards[self.hasher.hash_one(key) as usize % SHARDS]
    }

    /// How long `key` stays over its limit, if it is cached as over.
    pub(crate) fn get(&self, key: &str) -> Option<Duration> {
        if self.per_shard == 0 {
            return None;
        }
        let now = Instant::now();
        let mut shard = lock(self.shard(key));
        match shard.get(key) {
            Some((until, recheck)) if *recheck > now => Some(*until - now),
            Some(_) => {
                shard.remove(key);
                None
            }
            None => None,
        }
    }

    pub(crate) fn insert(&self, key: &str, for_: Duration) {
        if self.per_shard == 0 || for_.is_zero() {
            return;
        }
        let now = Instant::now();
        let mut shard = lock(self.shard(key));
        if shard.len() >= self.per_shard {
            shard.retain(|_, (_, recheck)| *recheck > now);
            if shard.len() >= self.per_shard {
                return;
            }
        }
        shard.insert(key.to_owned(), (now + for_, now + for_.min(self.recheck)));
    }

    pub(crate) fn remove(&self, key: &str) {
        lock(self.shard(key)).remove(key);
    }

    pub(crate) fn clear(&self) {
        for s in &self.shards {
            lock(s).clear();
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

/// The in-memory limiter `fail_open` domains fall back to: the same rules
/// and algorithms as Redis, per instance (so with N instances a client may
/// get up to N× its limit while Redis is away). Bounded: when full of live
/// keys, new keys are allowed without being tracked.
#[derive(Debug)]
pub(crate) struct LocalLimiter {
    state: Mutex<HashMap<String, (State, f64)>>,
    capacity: usize,
    base_ms: f64,
    base: Instant,
}

impl LocalLimiter {
    pub(crate) fn new(capacity: usize) -> Self {
        let base_ms = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs_f64() * 1000.0;
        Self { state: Mutex::new(HashMap::new()), capacity, base_ms, base: Instant::now() }
    }

    /// Wall-clock ms, advanced by tokio's clock (so tests can pause it).
    fn now_ms(&self) -> f64 {
        self.base_ms + self.base.elapsed().as_secs_f64() * 1000.0
    }

    /// Decides all items at once, all-or-nothing, as the Redis script does.
    pub(crate) fn decide(&self, items: &[LocalItem<'_>]) -> Vec<Outcome> {
        let now = self.now_ms();
        let mut state = lock(&self.state);
        let plans: Vec<algo::Plan> = items
            .iter()
            .map(|i| {
                let s = state.get(i.key).filter(|(_, exp)| *exp > now).map(|(s, _)| *s).unwrap_or_default();
                algo::plan(&i.params, s, now, i.hits)
            })
            .collect();
        let all_fit = items.iter().zip(&plans).all(|(i, p)| p.fits() || i.shadow);
        if all_fit {
            if state.len() >= self.capacity {
                state.retain(|_, (_, exp)| *exp > now);
            }
            for (i, p) in items.iter().zip(&plans) {
                if p.fits() && i.hits > 0 && (state.len() < self.capacity || state.contains_key(i.key)) {
                    state.insert(i.key.to_owned(), (p.next(), p.expires_at));
                }
            }
        }
        plans.iter().map(|p| p.outcome(all_fit && p.fits())).collect()
    }

    pub(crate) fn remove(&self, key: &str) {
        lock(&self.state).remove(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::{Algorithm, Limit, Unit};

    fn params(rpu: u32) -> Params {
        Params::from(&Limit {
            requests_per_unit: rpu,
            unit: Unit::Second,
            algorithm: Algorithm::FixedWindow,
            burst: 0,
        })
    }

    #[tokio::test(start_paused = true)]
    async fn cache_entries_expire() {
        const RECHECK: Duration = Duration::from_secs(1);
        let c = OverLimitCache::new(10, RECHECK);
        c.insert("k", Duration::from_millis(500));
        assert_eq!(c.get("k"), Some(Duration::from_millis(500)));
        tokio::time::advance(Duration::from_millis(501)).await;
        assert!(c.get("k").is_none());
        // Long waits are reported in full but rechecked with Redis after RECHECK.
        c.insert("k", Duration::from_secs(3600));
        assert_eq!(c.get("k"), Some(Duration::from_secs(3600)));
        tokio::time::advance(RECHECK).await;
        assert!(c.get("k").is_none());
        c.insert("k", Duration::from_secs(2));
        c.remove("k");
        assert!(c.get("k").is_none());
        let off = OverLimitCache::new(0, RECHECK);
        off.insert("k", Duration::from_secs(2));
        assert!(off.get("k").is_none());
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

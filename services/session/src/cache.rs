//! The validation cache: recent validations by token hash, so most
//! ValidateSession calls need no Redis round trip.
//!
//! Correctness rests on three rules:
//!
//! - **Revocation invalidates.** Every script that ends a token publishes its
//!   hash on the bucket's sharded pub/sub channel in the same atomic step;
//!   every instance removes it on receipt and confirms (`pubsub`), the
//!   revoking call waits for the confirmations (`store`), and the instance
//!   that made the change also removes it itself before answering.
//! - **No subscription, no cache.** The cache is used only while every
//!   bucket's channel is subscribed; losing any connection (or missing
//!   messages) disables and clears it until all are subscribed again.
//! - **No stale insert.** A validation read from Redis is inserted only if no
//!   invalidation or reset happened since it was sent (a generation counter
//!   checked under the shard lock), so a revocation that crosses the read in
//!   flight cannot be overwritten by it.
//!
//! Entries also expire locally: at the session's own expiry as Redis reported
//! it (measured from when the request was sent, so never later than Redis's),
//! and after `MESH_SESSION_CACHE_TTL_MS` at most, a backstop for anything the
//! rules above cannot see (a slot migrated by hand under a subscriber). A
//! touch is served from the cache only while it would not be written anyway
//! (the touch interval); otherwise it goes to Redis.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use mesh_proto::session as pb;
use prost::Message as _;
use tokio::time::Instant;

use crate::{
    metrics::{Metrics, ReasonLabels},
    token::TokenHash,
};

const SHARDS: usize = 16;
/// Bytes an entry costs beyond its encoded session (map slot, key, bookkeeping).
const OVERHEAD: usize = 160;

/// One cached validation.
#[derive(Debug, Clone)]
pub(crate) struct Entry {
    pub(crate) session: Arc<pb::Session>,
    /// When the session expires (local clock, never later than Redis's).
    pub(crate) expires: Instant,
    /// When the entry stops being used regardless.
    pub(crate) stale: Instant,
    /// When the session was last seen (touched), on the local clock.
    pub(crate) last_seen: Instant,
    /// How long after `last_seen` a touch is written again.
    pub(crate) touch_interval: Duration,
    size: usize,
}

impl Entry {
    /// An entry for `session`, read by a request sent at `sent`, when the
    /// session had `remaining` left and was last seen `since_seen` ago
    /// (both by Redis's clock at the read).
    pub(crate) fn new(
        session: pb::Session,
        sent: Instant,
        remaining: Duration,
        since_seen: Duration,
        touch_interval: Duration,
        ttl: Duration,
    ) -> Self {
        let size = session.encoded_len() + OVERHEAD;
        Self {
            session: Arc::new(session),
            expires: sent + remaining,
            stale: sent + ttl,
            last_seen: sent.checked_sub(since_seen).unwrap_or(sent),
            touch_interval,
            size,
        }
    }

    fn usable(&self, now: Instant) -> bool {
        now < self.expires && now < self.stale
    }

    /// Whether a touch at `now` must be written to Redis.
    pub(crate) fn touch_due(&self, now: Instant) -> bool {
        now.saturating_duration_since(self.last_seen) >= self.touch_interval
    }
}

#[derive(Debug, Default)]
struct Shard {
    map: HashMap<TokenHash, Entry>,
    bytes: usize,
}

impl Shard {
    fn remove(&mut self, h: &TokenHash) -> Option<Entry> {
        let e = self.map.remove(h)?;
        self.bytes -= e.size;
        Some(e)
    }
}

/// See the module docs.
#[derive(Debug)]
pub(crate) struct Cache {
    shards: Vec<Mutex<Shard>>,
    shard_bytes: usize,
    enabled: AtomicBool,
    generation: AtomicU64,
    metrics: Arc<Metrics>,
}

impl Cache {
    /// A cache of about `max_bytes`; 0 makes every operation a no-op. It
    /// starts disabled: nothing is subscribed yet.
    pub(crate) fn new(max_bytes: usize, metrics: Arc<Metrics>) -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
            shard_bytes: max_bytes / SHARDS,
            enabled: AtomicBool::new(false),
            generation: AtomicU64::new(0),
            metrics,
        }
    }

    /// Whether the cache is configured at all.
    pub(crate) fn configured(&self) -> bool {
        self.shard_bytes > 0
    }

    fn shard(&self, h: &TokenHash) -> std::sync::MutexGuard<'_, Shard> {
        self.shards[h.0[0] as usize % SHARDS].lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The generation to pass to [`Cache::insert`] for a read starting now.
    pub(crate) fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    /// A usable entry for `h` at `now`.
    pub(crate) fn get(&self, h: &TokenHash, now: Instant) -> Option<Entry> {
        if !self.enabled.load(Ordering::SeqCst) {
            return None;
        }
        let mut shard = self.shard(h);
        match shard.map.get(h) {
            Some(e) if e.usable(now) => Some(e.clone()),
            Some(_) => {
                let e = shard.remove(h).expect("present");
                self.gone(1, e.size);
                None
            }
            None => None,
        }
    }

    /// Inserts `entry` unless the cache was invalidated or reset since
    /// `generation` was read (module docs).
    pub(crate) fn insert(&self, generation: u64, h: TokenHash, entry: Entry) {
        if !self.configured() || entry.size > self.shard_bytes {
            return;
        }
        let mut shard = self.shard(&h);
        // Both checks under the lock: an invalidation bumps the generation
        // before it takes the lock to remove, so it either stops this insert
        // or removes what it inserted.
        if !self.enabled.load(Ordering::SeqCst) || self.generation.load(Ordering::SeqCst) != generation {
            return;
        }
        let size = entry.size;
        if let Some(old) = shard.map.insert(h, entry) {
            shard.bytes -= old.size;
            self.gone(1, old.size);
        }
        shard.bytes += size;
        self.metrics.cache_entries.inc();
        self.metrics.cache_bytes.inc_by(size as i64);
        if shard.bytes > self.shard_bytes {
            self.evict(&mut shard, Instant::now());
        }
    }

    /// Makes room: expired entries first, then arbitrary ones (the map's
    /// order is random) down to 90 % of the shard's share.
    fn evict(&self, shard: &mut Shard, now: Instant) {
        let before = (shard.map.len(), shard.bytes);
        shard.map.retain(|_, e| e.usable(now));
        shard.bytes = shard.map.values().map(|e| e.size).sum();
        let target = self.shard_bytes / 10 * 9;
        if shard.bytes > target {
            let mut victims = Vec::new();
            let mut bytes = shard.bytes;
            for (h, e) in &shard.map {
                if bytes <= target {
                    break;
                }
                bytes -= e.size;
                victims.push(*h);
            }
            for h in victims {
                shard.remove(&h);
            }
        }
        self.gone(before.0 - shard.map.len(), before.1 - shard.bytes);
    }

    fn gone(&self, entries: usize, bytes: usize) {
        self.metrics.cache_entries.dec_by(entries as i64);
        self.metrics.cache_bytes.dec_by(bytes as i64);
    }

    /// Removes revoked tokens.
    pub(crate) fn invalidate(&self, hashes: &[TokenHash]) {
        if !self.configured() || hashes.is_empty() {
            return;
        }
        self.generation.fetch_add(1, Ordering::SeqCst);
        for h in hashes {
            if let Some(e) = self.shard(h).remove(h) {
                self.gone(1, e.size);
            }
        }
    }

    /// Drops everything (messages may have been missed).
    pub(crate) fn reset(&self, reason: &'static str) {
        if !self.configured() {
            return;
        }
        self.generation.fetch_add(1, Ordering::SeqCst);
        for shard in &self.shards {
            let mut s = shard.lock().unwrap_or_else(|p| p.into_inner());
            self.gone(s.map.len(), s.bytes);
            s.map.clear();
            s.bytes = 0;
        }
        self.metrics.cache_resets.get_or_create(&ReasonLabels { reason }).inc();
    }

    /// Turns the cache on (every channel subscribed) or off (cleared first).
    pub(crate) fn set_enabled(&self, on: bool, reason: &'static str) {
        if !self.configured() {
            return;
        }
        if on {
            // Whatever arrived before the subscriptions were complete may be stale.
            self.reset(reason);
            self.enabled.store(true, Ordering::SeqCst);
        } else {
            self.enabled.store(false, Ordering::SeqCst);
            self.reset(reason);
        }
        self.metrics.cache_enabled.set(i64::from(on));
    }

    /// Drops expired entries (called now and then, so memory follows use).
    pub(crate) fn purge(&self, now: Instant) {
        for shard in &self.shards {
            let mut s = shard.lock().unwrap_or_else(|p| p.into_inner());
            let before = (s.map.len(), s.bytes);
            s.map.retain(|_, e| e.usable(now));
            s.bytes = s.map.values().map(|e| e.size).sum();
            self.gone(before.0 - s.map.len(), before.1 - s.bytes);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cache(bytes: usize) -> Cache {
        let metrics = Metrics::register(&mut prometheus_client::registry::Registry::default());
        let c = Cache::new(bytes, metrics);
        c.set_enabled(true, "test");
        c
    }

    fn entry(remaining: Duration) -> Entry {
        Entry::new(
            pb::Session { id: "s".into(), ..Default::default() },
            Instant::now(),
            remaining,
            Duration::ZERO,
            Duration::from_secs(10),
            Duration::from_secs(30),
        )
    }

    fn h(n: u8) -> TokenHash {
        let mut b = [0u8; 32];
        b[0] = n;
        b[1] = n;
        TokenHash(b)
    }

    #[tokio::test(start_paused = true)]
    async fn entries_expire_with_their_session_and_the_ttl() {
        let c = cache(1 << 20);
        let g = c.generation();
        c.insert(g, h(1), entry(Duration::from_secs(5)));
        c.insert(g, h(2), entry(Duration::from_secs(3600)));
        assert!(c.get(&h(1), Instant::now()).is_some());
        tokio::time::advance(Duration::from_secs(5)).await;
        assert!(c.get(&h(1), Instant::now()).is_none(), "expired with its session");
        assert!(c.get(&h(2), Instant::now()).is_some());
        tokio::time::advance(Duration::from_secs(25)).await;
        assert!(c.get(&h(2), Instant::now()).is_none(), "the ttl is a backstop");
        assert_eq!(c.metrics.cache_entries.get(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn touches_are_due_after_the_interval() {
        let e = entry(Duration::from_secs(3600));
        assert!(!e.touch_due(Instant::now()));
        tokio::time::advance(Duration::from_secs(10)).await;
        assert!(e.touch_due(Instant::now()));
    }

    #[tokio::test(start_paused = true)]
    async fn an_invalidation_during_a_read_stops_its_insert() {
        let c = cache(1 << 20);
        let g = c.generation();
        c.invalidate(&[h(9)]);
        c.insert(g, h(1), entry(Duration::from_secs(60)));
        assert!(c.get(&h(1), Instant::now()).is_none());
        let g = c.generation();
        c.insert(g, h(1), entry(Duration::from_secs(60)));
        assert!(c.get(&h(1), Instant::now()).is_some());
        c.invalidate(&[h(1)]);
        assert!(c.get(&h(1), Instant::now()).is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn disabled_means_empty_and_unused() {
        let c = cache(1 << 20);
        let g = c.generation();
        c.insert(g, h(1), entry(Duration::from_secs(60)));
        c.set_enabled(false, "test");
        assert!(c.get(&h(1), Instant::now()).is_none());
        c.insert(c.generation(), h(1), entry(Duration::from_secs(60)));
        c.set_enabled(true, "test");
        assert!(c.get(&h(1), Instant::now()).is_none(), "nothing from before survives");
        assert_eq!(c.metrics.cache_enabled.get(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn size_is_bounded() {
        let c = cache(SHARDS * 10 * (OVERHEAD + 16));
        for n in 0..=255u8 {
            let mut b = [n; 32];
            b[0] = 0; // all in one shard
            c.insert(c.generation(), TokenHash(b), entry(Duration::from_secs(60)));
        }
        let s = c.shards[0].lock().unwrap();
        assert!(s.bytes <= c.shard_bytes, "{} > {}", s.bytes, c.shard_bytes);
        assert!(!s.map.is_empty());
        assert_eq!(c.metrics.cache_bytes.get() as usize, s.bytes);
    }
}

//! Warnings that can repeat on every call (a replica away, the rate-limit
//! service down) are logged at most once per period, with how many were
//! suppressed; metrics should count every one.

use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

/// See the module docs.
#[derive(Debug)]
pub struct Throttle {
    every_ms: u64,
    last_ms: AtomicU64,
    suppressed: AtomicU64,
}

impl Throttle {
    /// At most one warning per `every`.
    pub fn new(every: Duration) -> Self {
        Self { every_ms: every.as_millis() as u64, last_ms: AtomicU64::new(0), suppressed: AtomicU64::new(0) }
    }

    /// `Some(suppressed since the last one)` when this one should be logged.
    pub fn ready(&self) -> Option<u64> {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_millis() as u64;
        let last = self.last_ms.load(Ordering::Relaxed);
        if now.saturating_sub(last) >= self.every_ms
            && self.last_ms.compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed).is_ok()
        {
            return Some(self.suppressed.swap(0, Ordering::Relaxed));
        }
        self.suppressed.fetch_add(1, Ordering::Relaxed);
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_in_a_period_gets_through() {
        let t = Throttle::new(Duration::from_secs(3600));
        assert_eq!(t.ready(), Some(0));
        assert_eq!(t.ready(), None);
        assert_eq!(t.ready(), None);
        t.last_ms.store(0, Ordering::Relaxed);
        assert_eq!(t.ready(), Some(2));
    }
}

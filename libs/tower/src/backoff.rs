//! The one backoff of the repository: exponential waits with added jitter
//! and a cap. Retries wait by it between attempts, circuit breakers stay
//! open by it ([`Backoff::iter`]), and services use it for their own
//! redelivery loops (e.g. the data service's outbox).

use std::time::Duration;

use rand::Rng;

/// Wait `n` (from 0) is `base × 2^n`, capped so that with the 10–30 %
/// jitter added it never exceeds `max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    base: Duration,
    max: Duration,
}

impl Backoff {
    /// Waits from `base`, never longer than `max` (`max` below `base` is taken as `base`).
    pub fn new(base: Duration, max: Duration) -> Self {
        Self { base, max: max.max(base) }
    }

    /// The wait before retry `n` (0 for the first), with `jitter` in 0.1..=0.3.
    pub fn delay_with(&self, n: u32, jitter: f64) -> Duration {
        let exp = self.base.saturating_mul(1 << n.min(20)).min(self.max.div_f64(1.3));
        exp.mul_f64(1.0 + jitter.clamp(0.1, 0.3))
    }

    /// The wait before retry `n`, randomly jittered by 10–30 %.
    pub fn delay(&self, n: u32) -> Duration {
        self.delay_with(n, rand::rng().random_range(0.1..=0.3))
    }

    /// The waits in order, endlessly (what `failsafe`'s policies take as open times).
    pub fn iter(self) -> BackoffIter {
        BackoffIter { backoff: self, n: 0 }
    }
}

/// [`Backoff::delay`] for 0, 1, 2, …; clones start where the original is.
#[derive(Debug, Clone)]
pub struct BackoffIter {
    backoff: Backoff,
    n: u32,
}

impl Iterator for BackoffIter {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let d = self.backoff.delay(self.n);
        self.n = self.n.saturating_add(1);
        Some(d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn backoff_doubles_with_ten_to_thirty_percent_jitter_and_a_cap() {
        let b = Backoff::new(25 * MS, 1000 * MS);
        assert_eq!(b.delay_with(0, 0.1), Duration::from_micros(27_500));
        assert_eq!(b.delay_with(0, 0.3), Duration::from_micros(32_500));
        assert_eq!(b.delay_with(2, 0.2), 120 * MS);
        for n in 0..40 {
            let d = b.delay(n);
            let exp = (25 * MS).saturating_mul(1 << n.min(20)).min((1000 * MS).div_f64(1.3));
            assert!(d >= exp.mul_f64(1.1) && d <= exp.mul_f64(1.3), "retry {n}: {d:?}");
            assert!(d <= 1000 * MS, "capped: {d:?}");
        }
    }

    #[test]
    fn the_iterator_walks_the_same_waits() {
        let got: Vec<Duration> = Backoff::new(100 * MS, 1300 * MS).iter().take(6).collect();
        for (d, exp) in got.iter().zip([100u64, 200, 400, 800, 1000, 1000]) {
            let exp = Duration::from_millis(exp);
            assert!(*d >= exp.mul_f64(1.1) && *d <= exp.mul_f64(1.3), "{d:?} vs {exp:?}");
        }
    }
}

//! The three algorithms as pure functions of (state, now, hits), used by the
//! in-memory fallback limiter. `lua/check.lua` is the same arithmetic inside
//! Redis; the unit tests below pin the behaviour both must have.
//!
//! - fixed_window: one counter per calendar window of one unit.
//! - sliding_window: the weighted two-window counter — the previous window's
//!   count weighted by how much of it still overlaps the last unit, plus the
//!   current window's count (Cloudflare's approximation; never allows 2× at
//!   a window boundary, unlike a fixed window).
//! - token_bucket: GCRA. Emission interval `T = unit / requests_per_unit`,
//!   tolerance `burst × T`; the state is one theoretical arrival time.
//!
//! A call of `hits = 0` is decided as if it asked for one hit (is there room
//! for one more?) and consumes nothing.

use crate::rules::{Algorithm, Limit};

/// Slack for float rounding, in the unit compared (hits or ms).
const EPS: f64 = 1e-9;

/// A limit in the form the arithmetic needs.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Params {
    pub(crate) algorithm: Algorithm,
    pub(crate) limit: f64,
    pub(crate) period_ms: f64,
    pub(crate) burst: f64,
}

impl From<&Limit> for Params {
    fn from(l: &Limit) -> Self {
        Self {
            algorithm: l.algorithm,
            limit: f64::from(l.requests_per_unit),
            period_ms: l.unit.seconds() as f64 * 1000.0,
            burst: f64::from(l.burst),
        }
    }
}

impl Params {
    /// GCRA emission interval (ms per hit).
    pub(crate) fn emission_ms(&self) -> f64 {
        self.period_ms / self.limit
    }
}

/// Stored state of one counter.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(crate) enum State {
    #[default]
    Empty,
    Window {
        w: i64,
        c: f64,
        p: f64,
    },
    Tat(f64),
}

/// The decision for one descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Outcome {
    pub(crate) over: bool,
    pub(crate) remaining: u32,
    pub(crate) reset_ms: u64,
    /// When over: until the same hits fit; `None` when they never can.
    pub(crate) retry_ms: Option<u64>,
    /// Until a single hit fits (0: now); `None` when never.
    pub(crate) retry1_ms: Option<u64>,
}

/// A decision before it is applied.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Plan {
    /// `Some(0.0)`: fits now; `Some(ms)`: fits after; `None`: never.
    wait: Option<f64>,
    retry1: Option<f64>,
    rem_now: f64,
    rem_after: f64,
    reset_now: f64,
    reset_after: f64,
    next: State,
    /// When the state can be forgotten (ms).
    pub(crate) expires_at: f64,
}

impl Plan {
    pub(crate) fn fits(&self) -> bool {
        self.wait == Some(0.0)
    }

    /// The outcome, `applied` when the hits were consumed.
    pub(crate) fn outcome(&self, applied: bool) -> Outcome {
        let (rem, reset) =
            if applied { (self.rem_after, self.reset_after) } else { (self.rem_now, self.reset_now) };
        let ms = |v: f64| v.max(0.0).ceil() as u64;
        Outcome {
            over: !self.fits(),
            remaining: (rem + EPS).floor().clamp(0.0, f64::from(u32::MAX)) as u32,
            reset_ms: ms(reset),
            retry_ms: self.wait.map(ms),
            retry1_ms: self.retry1.map(ms),
        }
    }

    /// The state after consuming the hits.
    pub(crate) fn next(&self) -> State {
        self.next
    }
}

/// Decides `hits` against `state` at `now` (ms since the epoch).
pub(crate) fn plan(params: &Params, state: State, now: f64, hits: u32) -> Plan {
    let hits = f64::from(hits);
    let need = hits.max(1.0);
    match params.algorithm {
        Algorithm::TokenBucket => {
            let t = params.emission_ms();
            let dvt = t * params.burst;
            let tat = match state {
                State::Tat(tat) => tat.max(now),
                _ => now,
            };
            let wait = |h: f64| {
                if h > params.burst {
                    return None;
                }
                let at = tat + h * t - dvt;
                Some(if at <= now + 0.001 { 0.0 } else { at - now })
            };
            let new_tat = tat + hits * t;
            Plan {
                wait: wait(need),
                retry1: wait(1.0),
                rem_now: (dvt - (tat - now)) / t,
                rem_after: (dvt - (new_tat - now)) / t,
                reset_now: tat - now,
                reset_after: new_tat - now,
                next: State::Tat(new_tat),
                expires_at: new_tat + 1000.0,
            }
        }
        Algorithm::FixedWindow | Algorithm::SlidingWindow => {
            let period = params.period_ms;
            let limit = params.limit;
            let fixed = params.algorithm == Algorithm::FixedWindow;
            let w = (now / period).floor() as i64;
            let (c, mut prev) = match state {
                State::Window { w: sw, c, p } if sw == w => (c, p),
                State::Window { w: sw, c, .. } if sw == w - 1 => (0.0, c),
                _ => (0.0, 0.0),
            };
            if fixed {
                prev = 0.0;
            }
            let left = (w + 1) as f64 * period - now;
            let est = prev * left / period + c;
            let wait = |h: f64| {
                if h > limit {
                    return None;
                }
                if est + h <= limit + EPS {
                    return Some(0.0);
                }
                if c + h <= limit {
                    return Some(left - (limit - c - h) * period / prev);
                }
                if fixed {
                    return Some(left);
                }
                Some(left + (period - (limit - h) * period / c).max(0.0))
            };
            let reset = |count: f64| {
                if fixed {
                    left
                } else if count > 0.0 {
                    left + period
                } else if prev > 0.0 {
                    left
                } else {
                    0.0
                }
            };
            let keep = if fixed { period } else { 2.0 * period };
            Plan {
                wait: wait(need),
                retry1: wait(1.0),
                rem_now: limit - est,
                rem_after: limit - est - hits,
                reset_now: reset(c),
                reset_after: reset(c + hits),
                next: State::Window { w, c: c + hits, p: prev },
                expires_at: w as f64 * period + keep + 1000.0,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::Unit;

    fn params(algorithm: Algorithm, rpu: u32, burst: u32) -> Params {
        Params::from(&Limit { requests_per_unit: rpu, unit: Unit::Minute, algorithm, burst })
    }

    /// Runs `hits` at `now`, applying when it fits.
    fn hit(p: &Params, s: &mut State, now: f64, hits: u32) -> Outcome {
        let plan = plan(p, *s, now, hits);
        if plan.fits() {
            *s = plan.next();
        }
        plan.outcome(plan.fits())
    }

    const MIN: f64 = 60_000.0;

    #[test]
    fn windows_are_exact_at_the_limit() {
        for alg in [Algorithm::FixedWindow, Algorithm::SlidingWindow] {
            let p = params(alg, 5, 0);
            let mut s = State::Empty;
            let t0 = 100.0 * MIN + 10.0;
            for i in 0..5 {
                let o = hit(&p, &mut s, t0, 1);
                assert!(!o.over, "{alg:?} hit {i}");
                assert_eq!(o.remaining, 4 - i);
            }
            let o = hit(&p, &mut s, t0, 1);
            assert!(o.over);
            assert_eq!(o.remaining, 0);
            assert!(o.retry_ms.unwrap() > 0);
        }
    }

    #[test]
    fn sliding_window_does_not_allow_twice_the_limit_across_a_boundary() {
        let p = params(Algorithm::SlidingWindow, 10, 0);
        let mut s = State::Empty;
        // Fill the limit at the very end of one window...
        let end = 100.0 * MIN - 5.0;
        for _ in 0..10 {
            assert!(!hit(&p, &mut s, end, 1).over);
        }
        // ...just after the boundary a fixed window would allow 10 more.
        let o = hit(&p, &mut s, 100.0 * MIN + 5.0, 1);
        assert!(o.over);
        // The retry time is when the previous window's weight has decayed by one hit.
        let retry = o.retry_ms.unwrap() as f64;
        assert!((retry - (MIN / 10.0 - 5.0)).abs() <= 1.0, "retry {retry}");
        assert!(!hit(&p, &mut s, 100.0 * MIN + 5.0 + retry, 1).over);
        // Half way through the next window half the limit is free again.
        let mut allowed = 0;
        while !hit(&p, &mut s, 100.5 * MIN, 1).over {
            allowed += 1;
        }
        assert_eq!(allowed, 4, "5 free at half-time, one used at the retry");
        // A fixed window allows the full limit again right after the boundary.
        let f = params(Algorithm::FixedWindow, 10, 0);
        let mut s = State::Empty;
        for _ in 0..10 {
            assert!(!hit(&f, &mut s, end, 1).over);
        }
        assert!(!hit(&f, &mut s, 100.0 * MIN + 5.0, 1).over);
    }

    #[test]
    fn token_bucket_honours_burst_and_rate() {
        // 6/minute sustained (one per 10 s), bursts of 3.
        let p = params(Algorithm::TokenBucket, 6, 3);
        let mut s = State::Empty;
        let t0 = 1_000_000.0;
        for i in 0..3 {
            let o = hit(&p, &mut s, t0, 1);
            assert!(!o.over, "burst hit {i}");
            assert_eq!(o.remaining, 2 - i);
        }
        let o = hit(&p, &mut s, t0, 1);
        assert!(o.over);
        assert_eq!(o.retry_ms, Some(10_000));
        assert!(hit(&p, &mut s, t0 + 9_999.0, 1).over);
        assert!(!hit(&p, &mut s, t0 + 10_000.0, 1).over);
        // After a long pause the bucket holds the burst again, never more.
        let later = t0 + 10.0 * MIN;
        let mut n = 0;
        while !hit(&p, &mut s, later, 1).over {
            n += 1;
        }
        assert_eq!(n, 3);
        // More hits than the burst never fit.
        assert_eq!(hit(&p, &mut State::Empty, t0, 4).retry_ms, None);
    }

    #[test]
    fn zero_hits_checks_without_consuming() {
        let p = params(Algorithm::SlidingWindow, 2, 0);
        let mut s = State::Empty;
        let t0 = 10.0 * MIN;
        let o = hit(&p, &mut s, t0, 0);
        assert!(!o.over);
        assert_eq!(o.remaining, 2);
        hit(&p, &mut s, t0, 2);
        let o = hit(&p, &mut s, t0, 0);
        assert!(o.over, "no room for one more hit");
    }

    #[test]
    fn multi_hit_calls_are_all_or_nothing() {
        let p = params(Algorithm::FixedWindow, 10, 0);
        let mut s = State::Empty;
        let t0 = 10.0 * MIN;
        assert!(!hit(&p, &mut s, t0, 7).over);
        let o = hit(&p, &mut s, t0, 4);
        assert!(o.over);
        assert_eq!(o.remaining, 3, "a refused call consumes nothing");
        assert_eq!(o.retry1_ms, Some(0), "a single hit still fits");
        assert!(!hit(&p, &mut s, t0, 3).over);
    }
}

/// One table of test vectors, run against both implementations: the Rust
/// arithmetic here (the fail-open fallback) and `lua/check.lua` in the real
/// Redis Cluster (with the clock passed in). Every decision path reports what
/// these say.
#[cfg(test)]
mod vectors {
    use std::time::Duration;

    use fred::types::scripts::Script;

    use super::*;
    use crate::{
        rules::{Limit, Unit},
        store::{self, RedisItem},
    };

    const MIN: u64 = 60_000;
    /// A minute boundary.
    const T0: u64 = 29_400_000 * MIN;

    /// What one call reports: over, remaining, reset_ms, retry_ms (-1: never), retry1_ms.
    type Expect = (bool, u32, u64, i64, u64);

    struct Vector {
        name: &'static str,
        limit: Limit,
        /// Calls: (time, hits, expected answer).
        calls: &'static [(u64, u32, Expect)],
    }

    fn limit(algorithm: Algorithm, requests_per_unit: u32, burst: u32) -> Limit {
        Limit { requests_per_unit, unit: Unit::Minute, algorithm, burst }
    }

    fn vectors() -> Vec<Vector> {
        vec![
            Vector {
                name: "fixed window 5/min, from 10 s into a window",
                limit: limit(Algorithm::FixedWindow, 5, 0),
                calls: &[
                    (T0 + 10_000, 1, (false, 4, 50_000, 0, 0)),
                    (T0 + 10_000, 4, (false, 0, 50_000, 0, 0)),
                    (T0 + 10_000, 1, (true, 0, 50_000, 50_000, 50_000)),
                    (T0 + 11_000, 0, (true, 0, 49_000, 49_000, 49_000)),
                    (T0 + MIN, 1, (false, 4, 60_000, 0, 0)),
                    (T0 + MIN, 6, (true, 4, 60_000, -1, 0)),
                ],
            },
            Vector {
                name: "sliding window 10/min, full at the end of a window",
                limit: limit(Algorithm::SlidingWindow, 10, 0),
                calls: &[
                    (T0 + 54_000, 10, (false, 0, 66_000, 0, 0)),
                    (T0 + 54_000, 1, (true, 0, 66_000, 12_000, 12_000)),
                    (T0 + 65_000, 1, (true, 0, 55_000, 1_000, 1_000)),
                    (T0 + 66_000, 1, (false, 0, 114_000, 0, 0)),
                    (T0 + 66_000, 0, (true, 0, 114_000, 6_000, 6_000)),
                ],
            },
            Vector {
                name: "token bucket 6/min, burst 3",
                limit: limit(Algorithm::TokenBucket, 6, 3),
                calls: &[
                    (T0, 1, (false, 2, 10_000, 0, 0)),
                    (T0, 2, (false, 0, 30_000, 0, 0)),
                    (T0, 1, (true, 0, 30_000, 10_000, 10_000)),
                    (T0, 4, (true, 0, 30_000, -1, 10_000)),
                    (T0 + 10_000, 1, (false, 0, 30_000, 0, 0)),
                    (T0 + 25_000, 0, (false, 1, 15_000, 0, 0)),
                ],
            },
        ]
    }

    fn expected((over, remaining, reset_ms, retry, retry1): Expect) -> Outcome {
        Outcome { over, remaining, reset_ms, retry_ms: u64::try_from(retry).ok(), retry1_ms: Some(retry1) }
    }

    #[test]
    fn the_fallback_answers_every_vector() {
        for v in vectors() {
            let params = Params::from(&v.limit);
            let mut state = State::Empty;
            for (n, (at, hits, expect)) in v.calls.iter().enumerate() {
                let p = plan(&params, state, *at as f64, *hits);
                if p.fits() {
                    state = p.next();
                }
                assert_eq!(p.outcome(p.fits()), expected(*expect), "{}: call {}", v.name, n + 1);
            }
        }
    }

    async fn pool() -> fred::clients::Pool {
        let infra = mesh_testkit::Infra::shared();
        let pool = mesh_runtime::redis::connect(&infra.redis_config(&mesh_testkit::redis_prefix())).unwrap();
        assert!(mesh_runtime::redis::wait_connected(&pool, Duration::from_secs(20)).await);
        pool
    }

    async fn run(
        pool: &fred::clients::Pool,
        script: &Script,
        key: &str,
        (keys, args): (Vec<String>, Vec<String>),
    ) -> Vec<i64> {
        let slot = fred::util::redis_keyslot(key.as_bytes());
        let raw =
            store::eval_once(pool.next(), script, slot, keys, args, Duration::from_secs(5)).await.unwrap();
        store::to_ints(raw).unwrap()
    }

    #[tokio::test]
    async fn the_redis_script_answers_every_vector() {
        let pool = pool().await;
        let check = Script::from_lua(store::CHECK_LUA);
        let prefix = mesh_testkit::redis_prefix();
        for v in vectors() {
            let key = format!("{prefix}rl:{{{}}}", v.name);
            for (n, (at, hits, expect)) in v.calls.iter().enumerate() {
                let item =
                    RedisItem { key: &key, params: Params::from(&v.limit), hits: *hits, shadow: false };
                let raw =
                    run(&pool, &check, &key, store::check_command(&[&item], "", Some(*at as f64))).await;
                let g = store::parse_group(&[0], &raw).unwrap();
                assert_eq!(g.outcomes[0].1, expected(*expect), "{}: call {}", v.name, n + 1);
            }
        }
    }

    #[tokio::test]
    async fn a_give_back_takes_back_exactly_once_and_stops_a_late_check() {
        let pool = pool().await;
        let (check, undo) = (Script::from_lua(store::CHECK_LUA), Script::from_lua(store::UNDO_LUA));
        let key = format!("{}rl:{{undo}}", mesh_testkit::redis_prefix());
        let lim = limit(Algorithm::FixedWindow, 10, 0);
        let item = |hits| RedisItem { key: &key, params: Params::from(&lim), hits, shadow: false };
        let at = (T0 + 1_000) as f64;
        let peek = async |at: f64| {
            let raw = run(&pool, &check, &key, store::check_command(&[&item(0)], "", Some(at))).await;
            store::parse_group(&[0], &raw).unwrap().outcomes[0].1.remaining
        };
        // Call "a" writes 3 hits; its give-back, run twice, takes back 3.
        let raw = run(&pool, &check, &key, store::check_command(&[&item(3)], "a", Some(at))).await;
        assert_eq!(raw[0], 1);
        assert_eq!(peek(at).await, 7);
        for given in [3, 0] {
            let raw = run(&pool, &undo, &key, store::undo_command(&[&item(3)], "a", Some(at + 10.0))).await;
            assert_eq!(raw, [given]);
            assert_eq!(peek(at).await, 10);
        }
        // Call "b"'s give-back lands before its check: the check writes nothing.
        run(&pool, &undo, &key, store::undo_command(&[&item(2)], "b", Some(at))).await;
        let raw = run(&pool, &check, &key, store::check_command(&[&item(2)], "b", Some(at + 5.0))).await;
        assert_eq!(raw[0], 0, "a check after its give-back is not applied");
        assert_eq!(peek(at).await, 10);
        // A record older than its lifetime is final: no give-back.
        run(&pool, &check, &key, store::check_command(&[&item(4)], "c", Some(at))).await;
        let late = at + store::RECORD_TTL.as_millis() as f64 + 1.0;
        let raw = run(&pool, &undo, &key, store::undo_command(&[&item(4)], "c", Some(late))).await;
        assert_eq!(raw, [0]);
        assert_eq!(peek(at + 2.0).await, 6);

        // A token bucket gets its emission time back, once.
        let key = format!("{}rl:{{undo-bucket}}", mesh_testkit::redis_prefix());
        let lim = limit(Algorithm::TokenBucket, 6, 3);
        let item = |hits| RedisItem { key: &key, params: Params::from(&lim), hits, shadow: false };
        let remaining = async |hits: u32, id: &str| {
            let raw = run(&pool, &check, &key, store::check_command(&[&item(hits)], id, Some(at))).await;
            store::parse_group(&[0], &raw).unwrap().outcomes[0].1.remaining
        };
        assert_eq!(remaining(2, "d").await, 1);
        for given in [2, 0] {
            let raw = run(&pool, &undo, &key, store::undo_command(&[&item(2)], "d", Some(at))).await;
            assert_eq!(raw, [given]);
            assert_eq!(remaining(0, "").await, 3);
        }
    }
}

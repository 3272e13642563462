//! The generic cell rate algorithm, as pure integer maths (DESIGN §3). No I/O, no clock.
//!
//! State per key is one number, the theoretical arrival time (TAT), in microseconds on the
//! store's clock. `0` stands for "no state", which behaves exactly like a TAT in the past.
//! All arithmetic saturates, so a clock that steps backwards or a corrupted TAT can never wrap
//! or admit more than the quota allows. The Redis script in `lua/` mirrors this function line
//! by line; the shared test table checks that both agree.

use crate::decision::{Decision, Outcome};
use crate::quota::Quota;

/// What one GCRA step decided, and the TAT to store (only when something was charged).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Step {
    pub(crate) decision: Decision,
    /// `Some(new_tat)` when the store must write; `None` on denial and peeks.
    pub(crate) write: Option<u64>,
}

/// One GCRA decision for `cost` units at `now`, against the stored TAT (`0` = none).
#[inline]
pub(crate) fn step(stored: u64, now: u64, quota: &Quota, cost: u32) -> Step {
    let t = quota.interval_micros();
    let b = u64::from(quota.capacity());
    // Both at most 100 years in µs (Quota validates), so these products cannot overflow.
    let tolerance = t * b;
    let n = u64::from(cost);
    let tat = stored.max(now);
    let used = tat - now;
    if n > b {
        return Step {
            decision: Decision::new(Outcome::Impossible, quota, used, 0),
            write: None,
        };
    }
    let new_used = used.saturating_add(n * t);
    // A peek (cost 0) is never denied, even when a clock that stepped backwards left the state
    // beyond the tolerance: it reports, it does not ask to pass.
    if new_used <= tolerance || n == 0 {
        Step {
            decision: Decision::new(Outcome::Allowed, quota, new_used, 0),
            write: (n > 0).then(|| tat.saturating_add(n * t)),
        }
    } else {
        Step {
            decision: Decision::new(Outcome::Denied, quota, used, new_used - tolerance),
            write: None,
        }
    }
}

/// One atomic decision over every quota of a policy: admitted only if each quota admits it;
/// then every TAT is written (`writes`), otherwise none. `stored` holds one TAT per quota.
pub(crate) fn step_all(stored: &[u64], now: u64, quotas: &[Quota], cost: u32) -> MultiStep {
    let steps: Vec<Step> = quotas
        .iter()
        .zip(stored)
        .map(|(q, &tat)| step(tat, now, q, cost))
        .collect();
    let admitted = steps.iter().all(|s| s.decision.is_allowed());
    let per_quota: Vec<Decision> = if admitted {
        steps.iter().map(|s| s.decision.clone()).collect()
    } else {
        // Nothing is charged: quotas that would have admitted report their state unchanged.
        steps
            .iter()
            .zip(quotas.iter().zip(stored))
            .map(|(s, (q, &tat))| {
                if s.decision.is_allowed() {
                    step(tat, now, q, 0).decision
                } else {
                    s.decision.clone()
                }
            })
            .collect()
    };
    let primary = most_restrictive(&per_quota).clone();
    let writes = (admitted && cost > 0).then(|| {
        steps
            .iter()
            .zip(stored)
            .map(|(s, &tat)| s.write.unwrap_or(tat))
            .collect()
    });
    MultiStep {
        decision: Decision::combined(primary, per_quota),
        writes,
    }
}

/// The decision that speaks for a policy: an impossible one first, else the longest wait among
/// denials, else the fewest remaining (ties: the longest until reset).
pub(crate) fn most_restrictive(decisions: &[Decision]) -> &Decision {
    use crate::decision::Outcome::{Allowed, Denied, Impossible};
    let rank = |d: &Decision| match d.outcome() {
        Impossible => (2, std::time::Duration::ZERO, 0, std::time::Duration::ZERO),
        Denied => (1, d.retry_after().unwrap_or_default(), 0, d.reset_after()),
        Allowed => (
            0,
            std::time::Duration::ZERO,
            u32::MAX - d.remaining(),
            d.reset_after(),
        ),
    };
    decisions
        .iter()
        .max_by_key(|d| rank(d))
        .unwrap_or(&decisions[0])
}

/// The result of [`step_all`].
#[derive(Debug, Clone)]
pub(crate) struct MultiStep {
    pub(crate) decision: Decision,
    /// `Some(new_tats)` (one per quota) when the store must write.
    pub(crate) writes: Option<Vec<u64>>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::time::Duration;

    fn quota(limit: u32, period_ms: u64, capacity: u32) -> Quota {
        Quota::new(limit, Duration::from_millis(period_ms))
            .unwrap()
            .with_capacity(capacity)
            .unwrap()
    }

    proptest! {
        /// Never more than capacity + elapsed / T units admitted over any run.
        #[test]
        fn never_admits_more_than_capacity_plus_rate(
            interval_ms in 1u64..2_000,
            capacity in 1u32..20,
            steps in proptest::collection::vec((0u64..3_000, 0u32..25), 1..200),
        ) {
            let q = quota(1, interval_ms, capacity);
            let t = q.interval_micros();
            let (mut tat, mut now, mut admitted) = (0u64, 1_000_000u64, 0u64);
            let start = now;
            for (dt_ms, cost) in steps {
                now += dt_ms * 1_000;
                let s = step(tat, now, &q, cost);
                if s.decision.is_allowed() {
                    admitted += u64::from(cost);
                }
                if let Some(w) = s.write { tat = w; }
                let bound = u64::from(capacity) + (now - start) / t;
                prop_assert!(admitted <= bound, "admitted {admitted} > bound {bound}");
            }
        }

        /// A denied request passes exactly at retry_after and not one microsecond earlier.
        #[test]
        fn allowed_exactly_at_retry_after(
            interval_ms in 1u64..2_000,
            capacity in 1u32..20,
            used in 0u32..20,
            cost in 1u32..20,
        ) {
            prop_assume!(cost <= capacity);
            let q = quota(1, interval_ms, capacity);
            let now = 5_000_000u64;
            let mut tat = 0;
            for _ in 0..used {
                if let Some(w) = step(tat, now, &q, 1).write { tat = w; }
            }
            let s = step(tat, now, &q, cost);
            if let Some(retry) = s.decision.retry_after() {
                let retry = u64::try_from(retry.as_micros()).unwrap();
                prop_assert!(retry > 0);
                prop_assert!(!step(tat, now + retry - 1, &q, cost).decision.is_allowed());
                prop_assert!(step(tat, now + retry, &q, cost).decision.is_allowed());
            } else {
                prop_assert!(s.decision.is_allowed());
            }
        }

        /// A peek (cost 0) never writes and reports the same remaining as the state implies.
        #[test]
        fn peek_never_changes_state(stored in 0u64..10_000_000, now in 0u64..10_000_000) {
            let q = quota(5, 1_000, 5);
            let s = step(stored, now, &q, 0);
            prop_assert!(s.write.is_none());
            prop_assert!(s.decision.is_allowed());
            let after = step(stored, now, &q, 1);
            if after.decision.is_allowed() {
                prop_assert_eq!(after.decision.remaining() + 1, s.decision.remaining());
            }
        }

        /// A clock stepping backwards never admits a request the later clock denied.
        #[test]
        fn backwards_clock_never_admits_extra(
            back_ms in 0u64..100_000,
            steps in 1usize..30,
        ) {
            let q = quota(5, 5_000, 5);
            let mut tat = 0;
            let now = 200_000_000u64;
            for _ in 0..steps {
                if let Some(w) = step(tat, now, &q, 1).write { tat = w; }
            }
            let forward = step(tat, now, &q, 1).decision.is_allowed();
            let earlier = now.saturating_sub(back_ms * 1_000);
            let backward = step(tat, earlier, &q, 1).decision.is_allowed();
            prop_assert!(!backward || forward, "an earlier clock admitted what now denies");
        }
    }

    #[test]
    fn extreme_inputs_do_not_panic() {
        let q = quota(1, 1, 1);
        for stored in [0, 1, u64::MAX - 1, u64::MAX] {
            for now in [0, 1, u64::MAX / 2, u64::MAX] {
                for cost in [0, 1, 2, u32::MAX] {
                    let _ = step(stored, now, &q, cost);
                }
            }
        }
        let year = Quota::new(1, Duration::from_secs(365 * 24 * 3600)).unwrap();
        let big = year.with_capacity(99).unwrap();
        let s = step(0, 10, &big, u32::MAX);
        assert_eq!(s.decision.outcome(), Outcome::Impossible);
    }
}

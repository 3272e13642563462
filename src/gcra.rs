//! The generic cell rate algorithm as pure integer maths: what a store runs to turn
//! its stored state into a [`Decision`]. No I/O, no clock, no allocation for one quota.
//!
//! Every store that ships with tollgate decides through these functions, and a store of your
//! own should too: [`Decision`] has no public constructor, so [`step`] (one quota) and
//! [`step_all`] (every quota of a [`Policy`](crate::Policy)) are how a [`Store`](crate::Store)
//! builds the decisions it returns, with exactly the numbers the built-in stores report.
//!
//! # The state
//! One `u64` per (policy, client key, quota): the *theoretical arrival time* (TAT), in
//! microseconds on the store's clock. `0` means "no state" and behaves exactly like a TAT in the
//! past, so a store answers an unknown key by passing `0`. `now` is read from the same clock
//! (any epoch, as long as it never reads 0 in practice and all app servers sharing the state
//! read the same clock: a Redis-backed store uses the Redis server's `TIME`, never the app
//! server's). All arithmetic saturates, so a clock that steps backwards or a corrupted TAT can
//! never wrap or admit more than the quota allows.
//!
//! # When to write
//! A [`Step`] carries `write: Some(tat)` exactly when the request was admitted and charged
//! (cost > 0): store that TAT in place of the one you passed in. A denial, an impossible
//! request and a peek (cost 0) write nothing (`None`). Read, decide and write must be atomic per
//! key: under a lock, a compare-and-swap of the TAT you decided on (retrying on conflict), or a
//! server-side script. [`step_all`] is all-or-nothing over a policy's quotas: `writes` holds
//! every quota's new TAT, or is `None` and nothing may be written.
//!
//! # When state may expire
//! A written state is worth keeping for `reset_after` (the decision's
//! [`reset_after`](Decision::reset_after), which is `tat - now` for the TAT just written; for a
//! policy of several quotas each quota's own, in
//! [`Decision::per_quota`]); after that it is indistinguishable from no state. A store with
//! key expiry sets the TTL to [`ceil_ms`]`(reset_after)`: rounded up to a whole millisecond,
//! never 0, never rounded down (a state forgotten early would admit extra requests).
//!
//! # Example: a tiny store
//! ```
//! use std::collections::HashMap;
//! use std::time::Duration;
//! use tollgate::{Outcome, Quota, gcra};
//!
//! let quota: Quota = "5/s".parse()?; // T = 200 ms, capacity 5
//! let mut tats: HashMap<&str, u64> = HashMap::new(); // client -> TAT (µs)
//! let mut ttls: HashMap<&str, u64> = HashMap::new(); // client -> TTL (ms), for a store that expires keys
//!
//! let now = 1_000_000; // µs on the store's clock
//! let mut check = |client, now, cost| {
//!     // In a real store, these three lines are atomic per key.
//!     let step = gcra::step(tats.get(client).copied().unwrap_or(0), now, &quota, cost);
//!     if let Some(tat) = step.write {
//!         tats.insert(client, tat);
//!         ttls.insert(client, gcra::ceil_ms(step.decision.reset_after()));
//!     }
//!     step.decision
//! };
//!
//! for left in (0..5).rev() {
//!     assert_eq!(check("alice", now, 1).remaining(), left);
//! }
//! let denied = check("alice", now, 1);
//! assert_eq!(denied.outcome(), Outcome::Denied);
//! assert_eq!(denied.retry_after(), Some(Duration::from_millis(200)));
//! assert_eq!(check("alice", now, 0).remaining(), 0); // a peek: never denied, never charged
//! assert_eq!(check("alice", now + 200_000, 1).remaining(), 0); // one more after T
//! assert_eq!(check("bob", now, 6).outcome(), Outcome::Impossible); // cost above capacity
//! assert_eq!(ttls["alice"], 1_000); // the state expires when it is fresh again
//! # Ok::<(), tollgate::QuotaError>(())
//! ```
//!
//! For a whole policy, pass every quota's TAT to [`step_all`] and write back every TAT of
//! [`MultiStep::writes`], or none; `tests/custom_store.rs` is a complete [`Store`](crate::Store)
//! built this way, which passes the conformance kit (`tollgate::store::conformance`, feature
//! `test-util`).
//!
//! The Redis script in `lua/` mirrors these functions line by line; the conformance kit checks
//! that every store agrees with them.

use std::time::Duration;

use crate::decision::{Decision, Outcome};
use crate::quota::Quota;

/// What one GCRA step decided, and the TAT to store.
///
/// Fields may be added in later versions (the struct is `#[non_exhaustive]`).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Step {
    /// The decision to return for this request.
    pub decision: Decision,
    /// `Some(new_tat)` when the store must replace the stored TAT with `new_tat` (the request
    /// was admitted with a cost above 0); `None` on denials, impossible requests and peeks,
    /// which must write nothing.
    pub write: Option<u64>,
}

/// One GCRA decision for `cost` units at `now` (µs on the store's clock), against the stored
/// TAT `stored_tat` (`0` = no state), under `quota`. A cost of 0 is a peek (never denied, never
/// writes); a cost above the quota's capacity is [`Outcome::Impossible`].
#[inline]
pub fn step(stored_tat: u64, now: u64, quota: &Quota, cost: u32) -> Step {
    let t = quota.interval_micros();
    let b = u64::from(quota.capacity());
    // Both at most 100 years in µs (Quota validates), so these products cannot overflow.
    let tolerance = t * b;
    let n = u64::from(cost);
    let tat = stored_tat.max(now);
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

/// One atomic decision over every quota of a policy (in the policy's order,
/// [`Policy::quotas`](crate::Policy::quotas)): admitted only if each quota admits it; then every
/// quota is charged ([`MultiStep::writes`]), otherwise none is.
///
/// `stored` holds one TAT per quota, in the same order (`0` = no state; a missing entry counts
/// as `0`, extra entries are ignored). The decision speaks for the most restrictive quota (an
/// impossible one, else the longest wait, else the fewest remaining) and carries every quota's
/// own in [`Decision::per_quota`]; when the request is denied, quotas that would have admitted
/// it report their state unchanged. For a single quota it is exactly [`step`]'s decision.
///
/// # Panics
/// If `quotas` is empty (a [`Policy`](crate::Policy) never is).
pub fn step_all(stored: &[u64], now: u64, quotas: &[Quota], cost: u32) -> MultiStep {
    let tat_of = |i: usize| stored.get(i).copied().unwrap_or(0);
    if let [quota] = quotas {
        let Step { decision, write } = step(tat_of(0), now, quota, cost);
        return MultiStep {
            decision,
            writes: write.map(|tat| vec![tat]),
        };
    }
    let steps: Vec<Step> = quotas
        .iter()
        .enumerate()
        .map(|(i, q)| step(tat_of(i), now, q, cost))
        .collect();
    let admitted = steps.iter().all(|s| s.decision.is_allowed());
    let per_quota: Vec<Decision> = if admitted {
        steps.iter().map(|s| s.decision.clone()).collect()
    } else {
        // Nothing is charged: quotas that would have admitted report their state unchanged.
        steps
            .iter()
            .zip(quotas)
            .enumerate()
            .map(|(i, (s, q))| {
                if s.decision.is_allowed() {
                    step(tat_of(i), now, q, 0).decision
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
            .enumerate()
            .map(|(i, s)| s.write.unwrap_or(tat_of(i)))
            .collect()
    });
    MultiStep {
        decision: Decision::combined(primary, per_quota),
        writes,
    }
}

/// The most debt an unconditional charge ([`adjust`] with `delta > 0`) can leave on one quota:
/// `tat - now` never exceeds this (100 years in µs), so every value stays below 2^53 and exact
/// in the Redis script's doubles.
pub const MAX_DEBT_MICROS: u64 = crate::quota::MAX_TOLERANCE_MICROS;

/// Adjusts a state after the fact, by `delta` units at `now`: what a store runs for
/// [`Store::adjust`](crate::Store::adjust) (a refund, or the difference between a reserved and
/// an actual cost).
///
/// - `delta > 0` charges unconditionally: `new_tat = max(tat, now) + delta*T`, admitted or not,
///   so the state can go beyond the capacity (debt): the next requests are then denied until
///   it is paid off, with a `retry_after` that counts the debt. The debt is capped at
///   [`MAX_DEBT_MICROS`].
/// - `delta < 0` gives back `-delta` units: `new_tat = max(tat - (-delta)*T, now)`. The TAT never
///   goes below `now`, so a refund never leaves a client better off than a fresh one, and a
///   state that is already fresh is left alone.
/// - `delta == 0` changes nothing.
///
/// The [`Step`]'s decision is a peek of the state after the adjustment (cost 0: outcome
/// [`Allowed`](Outcome::Allowed), `remaining` 0 while in debt). `write` is `Some(new_tat)` when
/// the state changed; a `new_tat` equal to `now` is a fresh state, which a store with key
/// expiry deletes instead of writing (its TTL would be 0).
///
/// ```
/// use tollgate::{Quota, gcra};
///
/// let quota: Quota = "5/s".parse()?; // T = 200 ms
/// let now = 1_000_000;
/// let charged = gcra::step(0, now, &quota, 3).write.unwrap(); // 3 used, 2 left
/// let refunded = gcra::adjust(charged, now, &quota, -2);
/// assert_eq!(refunded.decision.remaining(), 4);
/// // Never below fresh: giving back more than is used leaves the state fresh.
/// assert_eq!(gcra::adjust(charged, now, &quota, -100).write, Some(now));
/// // Debt: 9 units on a capacity of 5; the next request waits for 5 of them.
/// let debt = gcra::adjust(charged, now, &quota, 6).write.unwrap();
/// let next = gcra::step(debt, now, &quota, 1).decision;
/// assert_eq!(next.retry_after(), Some(std::time::Duration::from_millis(1_000)));
/// # Ok::<(), tollgate::QuotaError>(())
/// ```
pub fn adjust(stored_tat: u64, now: u64, quota: &Quota, delta: i64) -> Step {
    let t = quota.interval_micros();
    let used = stored_tat.max(now) - now;
    let amount = delta.unsigned_abs().saturating_mul(t);
    let new_used = match delta.signum() {
        1 => used.saturating_add(amount).min(MAX_DEBT_MICROS.max(used)),
        -1 if used > 0 => used.saturating_sub(amount),
        _ => used,
    };
    let write = (new_used != used).then(|| now.saturating_add(new_used));
    Step {
        decision: step(now.saturating_add(new_used), now, quota, 0).decision,
        write,
    }
}

/// [`adjust`] over every quota of a policy, in the policy's order (`stored` as for
/// [`step_all`]): each quota is adjusted by `delta` units of its own. `writes` holds every
/// quota's new TAT (unchanged ones included) when any changed, else `None`; the decision is
/// the policy's peek after the adjustment.
///
/// # Panics
/// If `quotas` is empty (a [`Policy`](crate::Policy) never is).
pub fn adjust_all(stored: &[u64], now: u64, quotas: &[Quota], delta: i64) -> MultiStep {
    let tat_of = |i: usize| stored.get(i).copied().unwrap_or(0);
    let steps: Vec<Step> = quotas
        .iter()
        .enumerate()
        .map(|(i, q)| adjust(tat_of(i), now, q, delta))
        .collect();
    let changed = steps.iter().any(|s| s.write.is_some());
    let writes = changed.then(|| {
        steps
            .iter()
            .enumerate()
            .map(|(i, s)| s.write.unwrap_or(tat_of(i)))
            .collect()
    });
    let per_quota: Vec<Decision> = steps.into_iter().map(|s| s.decision).collect();
    let decision = match per_quota.as_slice() {
        [one] => one.clone(),
        many => Decision::combined(most_restrictive(many).clone(), per_quota.clone()),
    };
    MultiStep { decision, writes }
}

/// `d` in whole milliseconds, rounded up: the TTL of a state written with
/// [`reset_after`](Decision::reset_after) `d`. At least 1, saturating at `u64::MAX`.
///
/// ```
/// use std::time::Duration;
/// use tollgate::gcra::ceil_ms;
///
/// assert_eq!(ceil_ms(Duration::from_micros(1)), 1);
/// assert_eq!(ceil_ms(Duration::from_micros(3_900_000)), 3_900);
/// assert_eq!(ceil_ms(Duration::from_micros(3_900_001)), 3_901);
/// ```
pub fn ceil_ms(d: Duration) -> u64 {
    let ms = d.as_micros().div_ceil(1_000).max(1);
    u64::try_from(ms).unwrap_or(u64::MAX)
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

/// What [`step_all`] decided over a policy's quotas, and the TATs to store.
///
/// Fields may be added in later versions (the struct is `#[non_exhaustive]`).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct MultiStep {
    /// The decision to return for this request (every quota's in [`Decision::per_quota`]).
    pub decision: Decision,
    /// `Some(new_tats)`, one per quota in the policy's order, when the store must replace every
    /// stored TAT with these (all of them, atomically); `None` when nothing may be written.
    pub writes: Option<Vec<u64>>,
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

    proptest! {
        /// Over any run of charges, refunds and reconciliations: the units admitted never exceed
        /// capacity + elapsed / T + the units refunds actually gave back (measured on the TAT),
        /// the state never goes below fresh, and `remaining` never exceeds the capacity.
        #[test]
        fn adjustments_never_admit_more_than_they_gave_back(
            interval_ms in 1u64..2_000,
            capacity in 1u32..20,
            ops in proptest::collection::vec((0u64..3_000, 0u32..25, 0u8..4, -30i64..30), 1..200),
        ) {
            let q = quota(1, interval_ms, capacity);
            let t = q.interval_micros();
            let (mut tat, mut now) = (0u64, 1_000_000u64);
            let start = now;
            let (mut admitted, mut given_back_us) = (0u64, 0u64);
            for (dt_ms, cost, op, delta) in ops {
                now += dt_ms * 1_000;
                let before = tat.max(now) - now;
                match op {
                    // A check, then (half the time) its settlement: a refund of what it was
                    // charged, or a reconciliation by `delta`.
                    0 | 1 => {
                        let s = step(tat, now, &q, cost);
                        if let Some(w) = s.write {
                            tat = w;
                            admitted += u64::from(cost);
                            if op == 1 {
                                let d = if delta < 0 { -i64::from(cost) } else { delta };
                                let used = tat - now;
                                let a = adjust(tat, now, &q, d);
                                prop_assert!(a.write.is_none_or(|w| w >= now), "below fresh");
                                if let Some(w) = a.write { tat = w; }
                                let after = tat.max(now) - now;
                                given_back_us += used.saturating_sub(after);
                            }
                        }
                    }
                    // An adjustment out of the blue.
                    _ => {
                        let a = adjust(tat, now, &q, delta);
                        prop_assert!(a.write.is_none_or(|w| w >= now), "below fresh");
                        if let Some(w) = a.write { tat = w; }
                        let after = tat.max(now) - now;
                        given_back_us += before.saturating_sub(after);
                        prop_assert!(a.decision.remaining() <= capacity);
                        if delta < 0 {
                            prop_assert!(after <= before, "a refund added debt");
                            prop_assert!(before - after <= delta.unsigned_abs() * t,
                                "gave back more than asked");
                        }
                    }
                }
                let bound = u64::from(capacity) + (now - start) / t + given_back_us.div_ceil(t);
                prop_assert!(admitted <= bound, "admitted {admitted} > bound {bound}");
            }
        }

        /// `adjust` by a positive amount then the same negative amount (at one instant) is the
        /// identity on a state that was not fresh, and never below fresh on any.
        #[test]
        fn charge_then_refund_round_trips(
            used_units in 0u64..20,
            n in 1i64..40,
        ) {
            let q = quota(1, 100, 10);
            let now = 10_000_000u64;
            let tat = now + used_units * q.interval_micros();
            let charged = adjust(tat, now, &q, n).write.unwrap();
            prop_assert_eq!(charged, tat + n.unsigned_abs() * q.interval_micros());
            let back = adjust(charged, now, &q, -n).write.unwrap_or(charged);
            prop_assert_eq!(back, tat);
            let far = adjust(charged, now, &q, -n - 100).write.unwrap();
            prop_assert_eq!(far, now, "floored at fresh");
        }
    }

    #[test]
    fn adjust_leaves_fresh_and_zero_alone_and_caps_debt() {
        let q = quota(5, 5_000, 5); // T = 1 s
        let now = 50_000_000;
        // A fresh or past state gives nothing back.
        assert_eq!(adjust(0, now, &q, -3).write, None);
        assert_eq!(adjust(now - 1, now, &q, -3).write, None);
        assert_eq!(adjust(now + 7, now, &q, 0).write, None);
        assert_eq!(adjust(0, now, &q, -3).decision.remaining(), 5);
        // Debt is capped at 100 years, even from i64::MAX units.
        let debt = adjust(0, now, &q, i64::MAX).write.unwrap();
        assert_eq!(debt - now, MAX_DEBT_MICROS);
        let denied = step(debt, now, &q, 1).decision;
        assert_eq!(denied.outcome(), Outcome::Denied);
        assert_eq!(adjust(debt, now, &q, i64::MIN).write, Some(now));
        for stored in [0, 1, u64::MAX] {
            for delta in [i64::MIN, -1, 1, i64::MAX] {
                let _ = adjust(stored, u64::MAX, &q, delta);
                let _ = adjust(stored, 0, &q, delta);
            }
        }
    }

    #[test]
    fn adjust_all_adjusts_every_quota_by_its_own_interval() {
        let qs = [quota(2, 1_000, 2), quota(5, 3_600_000, 5)]; // T = 500 ms and 720 s
        let now = 1_000_000_000;
        let charged = step_all(&[0, 0], now, &qs, 2).writes.unwrap();
        let refunded = adjust_all(&charged, now, &qs, -1);
        assert_eq!(
            refunded.writes,
            Some(vec![now + 500_000, now + 720_000_000])
        );
        let remaining: Vec<u32> = refunded
            .decision
            .per_quota()
            .iter()
            .map(Decision::remaining)
            .collect();
        assert_eq!(remaining, [1, 4]);
        assert_eq!(refunded.decision.remaining(), 1);
        // Nothing to give back anywhere: nothing to write.
        assert_eq!(adjust_all(&[0, 0], now, &qs, -1).writes, None);
        let one = adjust_all(&[now + 5], now, &qs[..1], 3);
        assert_eq!(one.decision, adjust(now + 5, now, &qs[0], 3).decision);
    }

    #[test]
    fn step_all_of_one_quota_is_step() {
        let q = quota(5, 5_000, 5);
        for (stored, now, cost) in [(0, 10, 1), (5_000_000, 0, 1), (0, 0, 6), (4_000_000, 0, 0)] {
            let one = step(stored, now, &q, cost);
            let all = step_all(&[stored], now, &[q], cost);
            assert_eq!(all.decision, one.decision);
            assert_eq!(all.writes, one.write.map(|w| vec![w]));
        }
    }

    #[test]
    fn step_all_counts_missing_tats_as_fresh() {
        let qs = [quota(2, 1_000, 2), quota(5, 3_600_000, 5)];
        let short = step_all(&[], 7, &qs, 1);
        assert_eq!(short, step_all(&[0, 0], 7, &qs, 1));
        assert_eq!(short.writes.map(|w| w.len()), Some(2));
        let long = step_all(&[0, 0, 99], 7, &qs, 1);
        assert_eq!(long, step_all(&[0, 0], 7, &qs, 1));
    }

    #[test]
    fn ceil_ms_rounds_up_and_is_never_zero() {
        assert_eq!(ceil_ms(Duration::ZERO), 1);
        assert_eq!(ceil_ms(Duration::from_micros(999)), 1);
        assert_eq!(ceil_ms(Duration::from_micros(1_000)), 1);
        assert_eq!(ceil_ms(Duration::from_micros(1_001)), 2);
        assert_eq!(ceil_ms(Duration::MAX), u64::MAX);
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

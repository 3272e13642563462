//! [`Decision`]: what a store decided about one request.

use std::sync::Arc;
use std::time::Duration;

use crate::quota::Quota;

/// Whether a request may pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Outcome {
    /// Admitted, and charged its cost.
    Allowed,
    /// Over the limit now; it would pass after [`Decision::retry_after`]. Nothing was charged.
    Denied,
    /// Its cost is larger than the quota's capacity, so it can never pass. Nothing was charged.
    Impossible,
}

/// The result of checking one request against a policy's quota (or, for a policy of several
/// quotas, against the most restrictive of them: the one with the longest wait when denied, the
/// fewest remaining when admitted; see [`Decision::per_quota`]).
///
/// The layer puts the decision into the request's extensions, so handlers can read it:
///
/// ```
/// use axum::{Extension, response::IntoResponse};
/// use tollgate::Decision;
///
/// async fn handler(Extension(decision): Extension<Decision>) -> impl IntoResponse {
///     format!("{} requests left", decision.remaining())
/// }
/// ```
///
/// With several layers stacked, the innermost layer's decision is the one in the extensions
/// (the most specific limit, usually a route's).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Decision {
    // The raw GCRA quantities, in microseconds; everything else is derived on access, so a
    // caller that only needs `is_allowed` pays for no division.
    outcome: Outcome,
    pub(crate) degraded: bool,
    capacity: u32,
    /// `T`, at least 1.
    interval: u64,
    /// Time until the state is fresh (`reset_after`).
    used: u64,
    /// For a denial: time until the same request would pass.
    retry: u64,
    /// For a policy of several quotas: each quota's own decision, in the policy's order.
    per_quota: Option<Arc<[Decision]>>,
}

impl Decision {
    /// A decision from the GCRA quantities: `used` is the reset_after and `retry` the
    /// retry_after (ignored unless denied), both in microseconds.
    #[inline]
    pub(crate) fn new(outcome: Outcome, quota: &Quota, used: u64, retry: u64) -> Self {
        Self {
            outcome,
            degraded: false,
            capacity: quota.capacity(),
            interval: quota.interval_micros(),
            used,
            retry,
            per_quota: None,
        }
    }

    /// A policy-wide decision: `primary` (the most restrictive quota's) carrying every quota's.
    pub(crate) fn combined(mut primary: Decision, per_quota: Vec<Decision>) -> Self {
        primary.per_quota = Some(per_quota.into());
        primary
    }

    /// Each quota's decision, in the policy's order: for a single-quota policy just this one.
    ///
    /// When a policy of several quotas denies a request, the quotas that would have admitted it
    /// report their state unchanged (nothing was charged).
    pub fn per_quota(&self) -> &[Decision] {
        match &self.per_quota {
            Some(all) => all,
            None => std::slice::from_ref(self),
        }
    }

    /// Allowed, denied or impossible.
    pub const fn outcome(&self) -> Outcome {
        self.outcome
    }

    /// The request was admitted.
    pub const fn is_allowed(&self) -> bool {
        matches!(self.outcome, Outcome::Allowed)
    }

    /// The quota's capacity: the most requests admitted at once (`X-RateLimit-Limit`).
    pub const fn capacity(&self) -> u32 {
        self.capacity
    }

    /// Requests of cost 1 that could still pass right now.
    pub fn remaining(&self) -> u32 {
        let b = u64::from(self.capacity);
        let tolerance = self.interval.saturating_mul(b);
        let remaining = (tolerance.saturating_sub(self.used) / self.interval.max(1)).min(b);
        // At most `capacity`, a u32.
        remaining as u32
    }

    /// Time until the client's state is as fresh as a new client's (full capacity again).
    pub const fn reset_after(&self) -> Duration {
        Duration::from_micros(self.used)
    }

    /// For a denied request: how long until the same request would pass. `None` when allowed
    /// and when the request can never pass.
    pub const fn retry_after(&self) -> Option<Duration> {
        match self.outcome {
            Outcome::Denied => Some(Duration::from_micros(self.retry)),
            _ => None,
        }
    }

    /// Time until one more request of cost 1 becomes available (zero when at full capacity).
    /// This is the `t` parameter of the IETF `RateLimit` field.
    pub fn next_available(&self) -> Duration {
        let b = u64::from(self.capacity);
        let remaining = u64::from(self.remaining());
        if remaining >= b {
            return Duration::ZERO;
        }
        let later = (b - remaining - 1).saturating_mul(self.interval);
        Duration::from_micros(self.used.saturating_sub(later))
    }

    /// How far this admitted request is beyond the first `n` requests of a burst, in time:
    /// `reset_after - n × T`, saturating at zero. The layer's `delay_after` waits this long.
    pub(crate) fn excess_over(&self, n: u32) -> Duration {
        let undelayed = self.interval.saturating_mul(u64::from(n));
        Duration::from_micros(self.used.saturating_sub(undelayed))
    }

    /// The decision was made without the shared store: by a fallback limiter because the store
    /// failed, or as a fail-open verdict.
    pub const fn is_degraded(&self) -> bool {
        self.degraded
    }

    /// An allow-everything decision used when the store fails in [`FailMode::Open`](crate::FailMode).
    pub(crate) fn fail_open(quota: &Quota) -> Self {
        Self {
            degraded: true,
            ..Self::new(Outcome::Allowed, quota, 0, 0)
        }
    }
}

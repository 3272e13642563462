//! [`Decision`]: what a store decided about one request.

use std::time::Duration;

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

/// The result of checking one request against one quota.
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Decision {
    pub(crate) outcome: Outcome,
    pub(crate) capacity: u32,
    pub(crate) remaining: u32,
    pub(crate) reset_after: Duration,
    pub(crate) retry_after: Option<Duration>,
    pub(crate) next_available: Duration,
    pub(crate) degraded: bool,
}

impl Decision {
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
    pub const fn remaining(&self) -> u32 {
        self.remaining
    }

    /// Time until the client's state is as fresh as a new client's (full capacity again).
    pub const fn reset_after(&self) -> Duration {
        self.reset_after
    }

    /// For a denied request: how long until the same request would pass. `None` when allowed
    /// and when the request can never pass.
    pub const fn retry_after(&self) -> Option<Duration> {
        self.retry_after
    }

    /// Time until one more request of cost 1 becomes available (zero when at full capacity).
    /// This is the `t` parameter of the IETF `RateLimit` field.
    pub const fn next_available(&self) -> Duration {
        self.next_available
    }

    /// The decision was made by a fallback limiter because the shared store failed, or is a
    /// fail-open / fail-closed verdict without any store.
    pub const fn is_degraded(&self) -> bool {
        self.degraded
    }

    /// An allow-everything decision used when the store fails in [`FailMode::Open`](crate::FailMode).
    pub(crate) fn fail_open(capacity: u32) -> Self {
        Self {
            outcome: Outcome::Allowed,
            capacity,
            remaining: capacity,
            reset_after: Duration::ZERO,
            retry_after: None,
            next_available: Duration::ZERO,
            degraded: true,
        }
    }
}

//! [`Decision`]: what a store decided about one request.

use std::sync::Arc;
use std::time::Duration;

use smallvec::SmallVec;

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
/// The layer puts the decision into the request's extensions, so handlers can read it. A route
/// that the layer skips (or whose key extractor returns `None`) has no decision, so take it as
/// an `Option`: a plain `Extension<Decision>` answers such requests with a 500.
///
/// ```
/// use axum::{Extension, response::IntoResponse};
/// use tollgate::Decision;
///
/// async fn handler(decision: Option<Extension<Decision>>) -> impl IntoResponse {
///     match decision {
///         Some(Extension(d)) => format!("{} requests left under {:?}", d.remaining(), d.policy()),
///         None => "not limited".to_owned(),
///     }
/// }
/// ```
///
/// With several layers stacked, the innermost layer's decision is the one found as
/// `Extension<Decision>` (the most specific limit, usually a route's); every layer's decision,
/// in the order the layers ran, is in [`Decisions`]: in the response's extensions, so outer
/// layers and `map_response` see them, and in the request's when more than one layer decided.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Decision {
    // The raw GCRA quantities, in microseconds; everything else is derived on access, so a
    // caller that only needs `is_allowed` pays for no division.
    outcome: Outcome,
    pub(crate) degraded: bool,
    /// The quota decided against (for a policy of several, the most restrictive one's).
    quota: Quota,
    /// The policy's name, set by the layer that decided; `None` straight from a store.
    policy: Option<Arc<str>>,
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
            quota: *quota,
            policy: None,
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

    /// The name of the policy that decided, as sent in the `RateLimit` fields. Set by the layer;
    /// `None` for a decision taken straight from a [`Store`](crate::Store).
    pub fn policy(&self) -> Option<&str> {
        self.policy.as_deref()
    }

    /// Names the decision (and each quota's) after the policy that made it.
    pub(crate) fn set_policy(&mut self, name: &Arc<str>) {
        self.policy = Some(Arc::clone(name));
    }

    /// The quota this decision was made against.
    pub const fn quota(&self) -> &Quota {
        &self.quota
    }

    /// The quota's limit: requests per [`period`](Self::period) (`q` in `RateLimit-Policy`).
    pub const fn limit(&self) -> u32 {
        self.quota.limit()
    }

    /// The quota's period (`w` in `RateLimit-Policy`).
    pub const fn period(&self) -> Duration {
        self.quota.period()
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
        self.quota.capacity()
    }

    /// Requests of cost 1 that could still pass right now.
    pub fn remaining(&self) -> u32 {
        let b = u64::from(self.capacity());
        let interval = self.quota.interval_micros();
        let tolerance = interval.saturating_mul(b);
        let remaining = (tolerance.saturating_sub(self.used) / interval.max(1)).min(b);
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
        Duration::from_micros(self.remaining_and_next_micros().1)
    }

    /// [`remaining`](Self::remaining) and [`next_available`](Self::next_available) in
    /// microseconds, worked out together (the `RateLimit` field needs both).
    #[inline]
    pub(crate) fn remaining_and_next_micros(&self) -> (u32, u64) {
        let remaining = self.remaining();
        let b = u64::from(self.capacity());
        if u64::from(remaining) >= b {
            return (remaining, 0);
        }
        let later = (b - u64::from(remaining) - 1).saturating_mul(self.quota.interval_micros());
        (remaining, self.used.saturating_sub(later))
    }

    /// How far this admitted request is beyond the first `n` requests of a burst, in time:
    /// `reset_after - n × T`, saturating at zero. The layer's `delay_after` waits this long.
    pub(crate) fn excess_over(&self, n: u32) -> Duration {
        let undelayed = self.quota.interval_micros().saturating_mul(u64::from(n));
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

/// Every stacked layer's decision about one request, in the order the layers ran (outermost
/// first). Found in the response's extensions (for outer layers, `map_response` and logging
/// middleware; unless [`Builder::response_decisions(false)`](crate::Builder::response_decisions)),
/// and, when more than one layer decided, in the request's (for handlers; a single layer's
/// is its `Extension<Decision>`).
///
/// ```
/// use axum::{Router, middleware::map_response, response::Response, routing::get};
/// use tollgate::{Decisions, RateLimitLayer};
///
/// async fn log_decisions(response: Response) -> Response {
///     if let Some(all) = response.extensions().get::<Decisions>() {
///         for d in all {
///             println!("{:?}: {:?}, {} left", d.policy(), d.outcome(), d.remaining());
///         }
///     }
///     response
/// }
///
/// let app: Router = Router::new()
///     .route("/", get(|| async { "hi" }))
///     .layer(RateLimitLayer::builder("60/m".parse()?).build()?)
///     .layer(map_response(log_decisions));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Decisions {
    /// Inline for the usual one or two layers: recording a decision allocates nothing beyond
    /// the extension itself.
    list: SmallVec<[Decision; 2]>,
    /// On a response: a layer answered the request itself with its rejection.
    rejected: bool,
}

impl Decisions {
    /// The decisions, outermost layer first.
    pub fn as_slice(&self) -> &[Decision] {
        &self.list
    }

    /// Iterates outermost layer first.
    pub fn iter(&self) -> std::slice::Iter<'_, Decision> {
        self.list.iter()
    }

    /// How many layers decided.
    pub fn len(&self) -> usize {
        self.list.len()
    }

    /// No layer decided.
    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// The decision of the layer whose policy is called `policy`.
    pub fn get(&self, policy: &str) -> Option<&Decision> {
        self.list.iter().find(|d| d.policy() == Some(policy))
    }

    /// Records a layer's `decision` in a request's extensions: as the [`Decision`] (the
    /// innermost so far) and, when an outer layer decided too, in `Decisions` after every
    /// earlier one. A single layer inserts only its `Decision`: one extension, no clone.
    pub(crate) fn record_request(extensions: &mut http::Extensions, decision: Decision) {
        let Some(outer) = extensions.insert(decision) else {
            return;
        };
        let inner = extensions.get::<Decision>().cloned();
        match (extensions.get_mut::<Self>(), inner) {
            (Some(all), Some(inner)) => all.list.push(inner),
            (None, Some(inner)) => {
                let mut list = SmallVec::new();
                list.push(outer);
                list.push(inner);
                extensions.insert(Self {
                    list,
                    rejected: false,
                });
            }
            (_, None) => {}
        }
    }

    /// Adds the decision of a layer that ran before (outside) those already listed: on the
    /// way back out, inner layers have recorded theirs first.
    pub(crate) fn push_outer(extensions: &mut http::Extensions, decision: Decision) {
        Self::push(extensions, decision, false);
    }

    /// [`push_outer`](Self::push_outer) for the layer whose rejection the response is.
    pub(crate) fn push_rejection(extensions: &mut http::Extensions, decision: Decision) {
        Self::push(extensions, decision, true);
    }

    fn push(extensions: &mut http::Extensions, decision: Decision, rejected: bool) {
        match extensions.get_mut::<Self>() {
            Some(all) => {
                all.list.insert(0, decision);
                all.rejected |= rejected;
            }
            None => {
                let mut list = SmallVec::new();
                list.push(decision);
                extensions.insert(Self { list, rejected });
            }
        }
    }

    /// Whether the response these decisions came with is a layer's rejection: one of the
    /// layers denied the request and answered it without calling the service (never true for
    /// a dry-run denial, which lets the request through). The outer layers give their charges
    /// back for such a response, as nginx charges none of its `limit_req` zones when one
    /// rejects.
    pub fn is_rejection(&self) -> bool {
        self.rejected
    }

    /// [`is_rejection`](Self::is_rejection) of a response's decisions, if it has any.
    #[inline]
    pub(crate) fn rejected_in(extensions: &http::Extensions) -> bool {
        extensions.get::<Self>().is_some_and(|all| all.rejected)
    }
}

impl<'a> IntoIterator for &'a Decisions {
    type Item = &'a Decision;
    type IntoIter = std::slice::Iter<'a, Decision>;

    fn into_iter(self) -> Self::IntoIter {
        self.list.iter()
    }
}

//! [`RateLimitLayer`] and its builder: everything about a layer is decided here, at build time.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use http::StatusCode;
use http::request::Parts;
use tower_layer::Layer;
use tracing::Level;

use crate::MemoryStore;
use crate::error::ConfigError;
use crate::headers::{HeaderStyle, PolicyFields, ResetStyle};
use crate::key::{ClientIp, KeyExtractor};
use crate::quota::Quota;
use crate::response::{Rejection, RejectionBody};
use crate::service::RateLimit;
use crate::store::{FailMode, Policy, Store};

type CostFn = dyn Fn(&Parts) -> u32 + Send + Sync;
type SkipFn = dyn Fn(&Parts) -> bool + Send + Sync;

/// A Tower layer that rate-limits requests by key, with one [`Policy`] and one [`Store`].
///
/// ```
/// use axum::{Router, routing::get};
/// use tollgate::{Quota, RateLimitLayer, key::ClientIp};
///
/// let app: Router = Router::new()
///     .route("/", get(|| async { "hello" }))
///     .layer(RateLimitLayer::new(Quota::per_minute(60)?, ClientIp::new()));
/// # Ok::<(), tollgate::QuotaError>(())
/// ```
///
/// Every clone of the layer, and every service it makes, shares one store and one set of
/// counters. Several layers stack: all must admit a request, and a request denied by one layer
/// is never charged by a layer that has not run yet (inner layers run after outer ones).
pub struct RateLimitLayer<St = MemoryStore, K = ClientIp> {
    pub(crate) shared: Arc<Shared<St, K>>,
}

impl<St, K> Clone for RateLimitLayer<St, K> {
    fn clone(&self) -> Self {
        Self {
            shared: Arc::clone(&self.shared),
        }
    }
}

impl<St, K> fmt::Debug for RateLimitLayer<St, K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimitLayer")
            .field("policy", &self.shared.policy)
            .field("fail_mode", &self.shared.fail_mode)
            .field("dry_run", &self.shared.dry_run)
            .finish_non_exhaustive()
    }
}

/// Everything a layer's services share.
pub(crate) struct Shared<St, K> {
    pub(crate) policy: Policy,
    pub(crate) fields: PolicyFields,
    pub(crate) store: St,
    pub(crate) key: K,
    pub(crate) cost: Option<Arc<CostFn>>,
    pub(crate) skip: Option<Arc<SkipFn>>,
    pub(crate) fail_mode: FailMode,
    /// The local limiter for [`FailMode::Fallback`], with the divided quota.
    pub(crate) fallback: Option<(MemoryStore, Policy)>,
    pub(crate) dry_run: bool,
    /// Delay admitted requests beyond the first `n` of a burst (nginx without `nodelay`).
    pub(crate) delay_after: Option<u32>,
    pub(crate) header_style: HeaderStyle,
    pub(crate) reset_style: ResetStyle,
    pub(crate) headers_on_allowed: bool,
    pub(crate) degraded_header: bool,
    pub(crate) rejection: Rejection,
    pub(crate) log_level: Level,
    pub(crate) counters: Counters,
    /// Microseconds (monotonic, since `started`) of the last store-failure warning.
    pub(crate) last_warning: AtomicU64,
    pub(crate) started: std::time::Instant,
}

/// Live counters of one layer, striped over cache lines: each thread counts in its own stripe,
/// so requests served on different cores never write the same line; a snapshot sums them.
pub(crate) struct Counters {
    /// A power of two of them, so a thread's stripe is its index masked.
    stripes: Box<[Stripe]>,
}

/// One thread's share of the counters, alone on its cache line(s).
#[derive(Default)]
#[repr(align(128))]
struct Stripe([AtomicU64; Counter::COUNT]);

/// What a layer counts.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Counter {
    Allowed,
    Denied,
    DryRunDenied,
    Unlimited,
    StoreErrors,
    Degraded,
    Delayed,
}

impl Counter {
    const COUNT: usize = 7;
}

/// The most stripes a layer gets (8 KiB of counters).
const MAX_STRIPES: usize = 64;

impl Counters {
    pub(crate) fn new() -> Self {
        let cores = std::thread::available_parallelism().map_or(8, std::num::NonZeroUsize::get);
        let stripes = cores.next_power_of_two().min(MAX_STRIPES);
        Self {
            stripes: (0..stripes).map(|_| Stripe::default()).collect(),
        }
    }

    /// Counts one event in this thread's stripe.
    #[inline]
    pub(crate) fn add(&self, counter: Counter) {
        let stripe = thread_stripe() & (self.stripes.len() - 1);
        if let Some(Stripe(counts)) = self.stripes.get(stripe) {
            counts[counter as usize].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The sum over every stripe.
    pub(crate) fn get(&self, counter: Counter) -> u64 {
        self.stripes
            .iter()
            .map(|Stripe(counts)| counts[counter as usize].load(Ordering::Relaxed))
            .fold(0, u64::wrapping_add)
    }
}

/// This thread's stripe number: threads are numbered in the order they first count, so the
/// threads of a runtime land on different stripes.
#[inline]
fn thread_stripe() -> usize {
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    thread_local! {
        static STRIPE: std::cell::Cell<usize> = const { std::cell::Cell::new(usize::MAX) };
    }
    STRIPE.with(|stripe| {
        let mut n = stripe.get();
        if n == usize::MAX {
            n = NEXT.fetch_add(1, Ordering::Relaxed) % MAX_STRIPES;
            stripe.set(n);
        }
        n
    })
}

/// A snapshot of a layer's counters since it was built.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct Stats {
    /// Requests admitted (including those admitted degraded).
    pub allowed: u64,
    /// Requests answered with the rejection status.
    pub denied: u64,
    /// Requests that would have been denied, let through by dry-run mode.
    pub dry_run_denied: u64,
    /// Requests skipped, or whose key extractor returned `None`.
    pub unlimited: u64,
    /// Store failures (each then handled by the fail mode).
    pub store_errors: u64,
    /// Decisions made without the store: fail-open, fail-closed or by the fallback limiter.
    pub degraded: u64,
    /// Admitted requests that were delayed before being served (see [`Builder::delay_after`]).
    pub delayed: u64,
}

impl<K: KeyExtractor> RateLimitLayer<MemoryStore, K> {
    /// `quota` per client as `key` identifies them, in a new [`MemoryStore`], policy
    /// `"default"`, every other setting at its default.
    pub fn new(quota: Quota, key: K) -> Self {
        let policy = Policy::named_default(quota);
        Self::from_parts(Builder::new(quota).key(key).parts(policy))
    }
}

impl RateLimitLayer {
    /// A builder for every setting; call [`Builder::build`] to get the layer.
    pub fn builder(quota: Quota) -> Builder {
        Builder::new(quota)
    }
}

impl<St, K> RateLimitLayer<St, K> {
    fn from_parts(shared: Shared<St, K>) -> Self {
        Self {
            shared: Arc::new(shared),
        }
    }

    /// The layer's policy (name and quota).
    pub fn policy(&self) -> &Policy {
        &self.shared.policy
    }

    /// The store the layer decides with.
    pub fn store(&self) -> &St {
        &self.shared.store
    }

    /// The layer's counters so far.
    pub fn stats(&self) -> Stats {
        let c = &self.shared.counters;
        Stats {
            allowed: c.get(Counter::Allowed),
            denied: c.get(Counter::Denied),
            dry_run_denied: c.get(Counter::DryRunDenied),
            unlimited: c.get(Counter::Unlimited),
            store_errors: c.get(Counter::StoreErrors),
            degraded: c.get(Counter::Degraded),
            delayed: c.get(Counter::Delayed),
        }
    }
}

impl<S, St, K> Layer<S> for RateLimitLayer<St, K> {
    type Service = RateLimit<S, St, K>;

    fn layer(&self, inner: S) -> Self::Service {
        RateLimit::new(inner, Arc::clone(&self.shared))
    }
}

/// Configures a [`RateLimitLayer`]. Invalid settings are reported by [`Builder::build`].
///
/// ```
/// use axum::{Router, routing::get};
/// use tollgate::{FailMode, HeaderStyle, Quota, RateLimitLayer, RejectionBody, key::Header};
///
/// let layer = RateLimitLayer::builder("100/m;capacity=20".parse()?)
///     .policy("api")
///     .key(Header::new("x-api-key")?)
///     .cost(|req| if req.method == http::Method::POST { 5 } else { 1 })
///     .skip(|req| req.uri.path() == "/healthz")
///     .headers(HeaderStyle::Both)
///     .body(RejectionBody::Json)
///     .fail_mode(FailMode::Closed)
///     .build()?;
/// let app: Router = Router::new().route("/", get(|| async { "hi" })).layer(layer);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[must_use]
pub struct Builder<St = MemoryStore, K = ClientIp> {
    settings: Settings,
    store: St,
    key: K,
}

/// Everything a builder holds besides its store and key extractor.
struct Settings {
    quota: Quota,
    more_quotas: Vec<Quota>,
    policy_name: Option<String>,
    cost: Option<Arc<CostFn>>,
    skip: Option<Arc<SkipFn>>,
    fail_mode: FailMode,
    dry_run: bool,
    delay_after: Option<u32>,
    header_style: HeaderStyle,
    reset_style: ResetStyle,
    headers_on_allowed: bool,
    degraded_header: bool,
    status: u16,
    body: RejectionBody,
    log_level: Level,
}

impl<St, K> fmt::Debug for Builder<St, K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Builder")
            .field("quota", &self.settings.quota)
            .field("policy_name", &self.settings.policy_name)
            .finish_non_exhaustive()
    }
}

impl Builder {
    fn new(quota: Quota) -> Self {
        Self {
            settings: Settings {
                quota,
                more_quotas: Vec::new(),
                policy_name: None,
                cost: None,
                skip: None,
                fail_mode: FailMode::default(),
                dry_run: false,
                delay_after: None,
                header_style: HeaderStyle::default(),
                reset_style: ResetStyle::default(),
                headers_on_allowed: true,
                degraded_header: false,
                status: 429,
                body: RejectionBody::default(),
                log_level: Level::INFO,
            },
            store: MemoryStore::new(),
            key: ClientIp::new(),
        }
    }
}

impl<St, K> Builder<St, K> {
    /// The policy name, sent in `RateLimit` headers and used to namespace store keys
    /// (default `"default"`). 1 to 64 characters of ASCII letters, digits and `-_.:`.
    pub fn policy(mut self, name: &str) -> Self {
        self.settings.policy_name = Some(name.to_owned());
        self
    }

    /// Adds another quota that every request must also satisfy, checked in the same atomic
    /// step (e.g. `"10/s;capacity=20"` and also `"1000/d"`). A denial by any quota charges
    /// none of them; the response reports every quota and `Retry-After` is the longest wait.
    ///
    /// ```
    /// use tollgate::RateLimitLayer;
    ///
    /// let layer = RateLimitLayer::builder("10/s;capacity=20".parse()?)
    ///     .and_quota("1000/d".parse()?)
    ///     .policy("api")
    ///     .build()?;
    /// assert_eq!(layer.policy().quotas().len(), 2);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn and_quota(mut self, quota: Quota) -> Self {
        self.settings.more_quotas.push(quota);
        self
    }

    /// How clients are identified (default: [`ClientIp`] with no trusted proxies).
    pub fn key<K2: KeyExtractor>(self, key: K2) -> Builder<St, K2> {
        Builder {
            settings: self.settings,
            store: self.store,
            key,
        }
    }

    /// Where state lives (default: a new [`MemoryStore`]). Pass a clone of one store to several
    /// layers to share it; each layer's policy name keeps their keys apart.
    pub fn store<St2: Store>(self, store: St2) -> Builder<St2, K> {
        Builder {
            settings: self.settings,
            store,
            key: self.key,
        }
    }

    /// What each request costs (default 1). A cost of 0 is a peek: the request is checked and
    /// gets headers, but consumes nothing. A cost above the capacity can never pass.
    pub fn cost(mut self, cost: impl Fn(&Parts) -> u32 + Send + Sync + 'static) -> Self {
        self.settings.cost = Some(Arc::new(cost));
        self
    }

    /// Requests for which `skip` returns true pass unlimited, without headers.
    pub fn skip(mut self, skip: impl Fn(&Parts) -> bool + Send + Sync + 'static) -> Self {
        self.settings.skip = Some(Arc::new(skip));
        self
    }

    /// What to do when the store fails (default [`FailMode::Open`]).
    pub fn fail_mode(mut self, mode: FailMode) -> Self {
        self.settings.fail_mode = mode;
        self
    }

    /// Evaluate, log and send headers, but never deny (nginx `limit_req_dry_run`). Requests
    /// that would have been denied are counted in [`Stats::dry_run_denied`] and charge nothing.
    pub fn dry_run(mut self, on: bool) -> Self {
        self.settings.dry_run = on;
        self
    }

    /// Smooth bursts instead of admitting them at once: the first `n` requests of a burst are
    /// served immediately, each later one (up to the capacity) waits until it conforms to the
    /// rate, and requests beyond the capacity are still rejected. This is nginx `limit_req`
    /// without `nodelay`: nginx `burst=b delay=d` is capacity `b + 1` with `delay_after(d + 1)`,
    /// and plain `burst=b` is `delay_after(1)`. Off by default (nginx `nodelay`).
    ///
    /// ```
    /// use tollgate::RateLimitLayer;
    ///
    /// // nginx: limit_req zone=z burst=12 delay=8; with rate=5r/s
    /// let layer = RateLimitLayer::builder("5/s;capacity=13".parse()?)
    ///     .delay_after(9)
    ///     .build()?;
    /// # let _ = layer;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    ///
    /// Delays hold the request in the service (a tokio timer; the runtime needs its time
    /// driver, as axum's has). `build` rejects `n = 0`.
    pub fn delay_after(mut self, n: u32) -> Self {
        self.settings.delay_after = Some(n);
        self
    }

    /// Which rate-limit header fields to send (default IETF draft-10).
    pub fn headers(mut self, style: HeaderStyle) -> Self {
        self.settings.header_style = style;
        self
    }

    /// How `X-RateLimit-Reset` is written (default: delta seconds).
    pub fn reset_style(mut self, style: ResetStyle) -> Self {
        self.settings.reset_style = style;
        self
    }

    /// Send the rate-limit fields on admitted responses too (default true).
    pub fn headers_on_allowed(mut self, on: bool) -> Self {
        self.settings.headers_on_allowed = on;
        self
    }

    /// Mark responses decided without the store (because it failed) with
    /// `X-RateLimit-Degraded: fallback`, `fail-open` or `fail-closed` (default false). The
    /// [`Decision`](crate::Decision) in the request extensions says so too
    /// ([`Decision::is_degraded`](crate::Decision::is_degraded)), and a `tollgate::store`
    /// warning is logged at most once a second.
    pub fn degraded_header(mut self, on: bool) -> Self {
        self.settings.degraded_header = on;
        self
    }

    /// The status of a limited request's response (default 429; 400..=599).
    pub fn status(mut self, status: u16) -> Self {
        self.settings.status = status;
        self
    }

    /// The body of a limited request's response (default short text).
    pub fn body(mut self, body: RejectionBody) -> Self {
        self.settings.body = body;
        self
    }

    /// The level of the `tollgate::limited` event logged for each denied request (default
    /// `INFO`; nginx's `limit_req_log_level`).
    pub fn log_level(mut self, level: Level) -> Self {
        self.settings.log_level = level;
        self
    }

    fn parts(self, policy: Policy) -> Shared<St, K> {
        Shared {
            fields: PolicyFields::new(&policy),
            policy,
            store: self.store,
            key: self.key,
            cost: self.settings.cost,
            skip: self.settings.skip,
            fail_mode: self.settings.fail_mode,
            fallback: None,
            dry_run: self.settings.dry_run,
            delay_after: self.settings.delay_after,
            header_style: self.settings.header_style,
            reset_style: self.settings.reset_style,
            headers_on_allowed: self.settings.headers_on_allowed,
            degraded_header: self.settings.degraded_header,
            rejection: Rejection {
                status: StatusCode::from_u16(self.settings.status)
                    .unwrap_or(StatusCode::TOO_MANY_REQUESTS),
                body: self.settings.body,
            },
            log_level: self.settings.log_level,
            counters: Counters::new(),
            last_warning: AtomicU64::new(0),
            started: std::time::Instant::now(),
        }
    }
}

impl<St: Store, K: KeyExtractor> Builder<St, K> {
    /// The layer.
    ///
    /// # Errors
    /// [`ConfigError`] for an invalid policy name, a status outside 400..=599, a custom body
    /// without a content type, or a fallback divisor of 0.
    pub fn build(self) -> Result<RateLimitLayer<St, K>, ConfigError> {
        if !(400..=599).contains(&self.settings.status) {
            return Err(ConfigError::Status(self.settings.status));
        }
        if self.settings.delay_after == Some(0) {
            return Err(ConfigError::Invalid(
                "delay_after must be at least 1: the first request of a burst is never delayed"
                    .into(),
            ));
        }
        let name = self.settings.policy_name.as_deref().unwrap_or("default");
        let quotas =
            std::iter::once(self.settings.quota).chain(self.settings.more_quotas.iter().copied());
        let policy = Policy::multi(name, quotas)?;
        let fallback = match self.settings.fail_mode {
            FailMode::Fallback { divisor } => Some((MemoryStore::new(), policy.divided(divisor)?)),
            _ => None,
        };
        let mut shared = self.parts(policy);
        shared.fallback = fallback;
        Ok(RateLimitLayer::from_parts(shared))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn striped_counters_lose_no_count_across_threads() {
        let counters = Counters::new();
        assert!(counters.stripes.len().is_power_of_two());
        // More threads than stripes, so some share a stripe and their adds contend.
        let threads = counters.stripes.len() * 2 + 3;
        std::thread::scope(|s| {
            for t in 0..threads {
                let counters = &counters;
                s.spawn(move || {
                    for _ in 0..1_000 {
                        counters.add(Counter::Allowed);
                    }
                    for _ in 0..t {
                        counters.add(Counter::Denied);
                    }
                });
            }
        });
        assert_eq!(counters.get(Counter::Allowed), 1_000 * threads as u64);
        assert_eq!(
            counters.get(Counter::Denied),
            (0..threads as u64).sum::<u64>()
        );
        assert_eq!(counters.get(Counter::Delayed), 0);
    }
}

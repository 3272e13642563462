//! What a store's answer becomes: admit, delay, reject or degrade, with the layer's counters and
//! log events. [`Shared`] is everything a layer's services share; the response future calls
//! [`Shared::verdict`] once the store has answered, and nothing else decides.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use crossbeam_utils::CachePadded;
use http::request::Parts;
use http::{HeaderMap, HeaderValue, Response};
use tracing::Level;

use crate::MemoryStore;
use crate::clock::once_a_second;
use crate::decision::{Decision, Outcome};
use crate::error::StoreError;
use crate::headers::{self, HeaderStyle, PolicyFields, ResetStyle};
use crate::key::{Key, KeyError};
use crate::response::{RateLimitBody, Rejector, misconfigured, store_unavailable};
use crate::settle::{ActualCost, Charge, RefundFn};
use crate::store::{FailMode, Policy, Store};
use crate::telemetry::{LayerMetrics, Outcome as Metric};
use crate::tier::Tiering;

/// What a request costs, from its parts.
pub(crate) type CostFn = dyn Fn(&Parts) -> u32 + Send + Sync;
/// Whether a request passes unlimited, from its parts.
pub(crate) type SkipFn = dyn Fn(&Parts) -> bool + Send + Sync;

/// Everything a layer's services share: its policy, store, key extractor, rejection and
/// settings, all fixed when the layer is built, and its live counters.
pub(crate) struct Shared<St, K, R> {
    /// The layer's policy, or its tiers: never empty, the first is the default.
    pub(crate) tiers: Box<[TierEntry]>,
    /// How a request's tier is picked, for a layer of several tiers.
    pub(crate) tiering: Option<Tiering>,
    pub(crate) store: St,
    pub(crate) key: K,
    pub(crate) cost: Option<Arc<CostFn>>,
    pub(crate) skip: Option<Arc<SkipFn>>,
    /// Gives an admitted request's charge back when its response says so.
    pub(crate) refund: Option<Arc<RefundFn>>,
    /// Charges (or gives back) the difference between the reserved cost and the
    /// [`ActualCost`] a response reports.
    pub(crate) reconcile: bool,
    /// `refund` or `reconcile`: admitted requests keep their charge for the response.
    pub(crate) settles: bool,
    pub(crate) fail_mode: FailMode,
    /// The local limiter for [`FailMode::Fallback`] (each tier has its divided policy).
    pub(crate) fallback: Option<MemoryStore>,
    pub(crate) dry_run: bool,
    /// Delay admitted requests beyond the first `n` of a burst (nginx without `nodelay`).
    pub(crate) delay_after: Option<u32>,
    pub(crate) header_style: HeaderStyle,
    pub(crate) reset_style: ResetStyle,
    pub(crate) headers_on_allowed: bool,
    pub(crate) degraded_header: bool,
    pub(crate) rejector: R,
    /// Add `Retry-After` and the rate-limit fields to the rejector's responses.
    pub(crate) rejection_fields: bool,
    /// Record every layer's decision in the response's extensions.
    pub(crate) response_decisions: bool,
    pub(crate) log_level: Level,
    /// Which requests are answered the gRPC way.
    #[cfg(feature = "tonic")]
    pub(crate) grpc: crate::grpc::GrpcMode,
    /// Log client keys as they are instead of their fingerprints (an explicit opt-in).
    pub(crate) log_raw_keys: bool,
    pub(crate) counters: Counters,
    /// The layer's metrics (no-ops without the `metrics` feature or a recorder).
    pub(crate) metrics: LayerMetrics,
    /// Microseconds (monotonic, since `started`) of the last store-failure warning.
    pub(crate) last_warning: AtomicU64,
    /// The same, for requests whose client could not be identified.
    pub(crate) last_key_error: AtomicU64,
    pub(crate) started: Instant,
}

/// One tier of a layer (a layer without tiers has one): its policy, the parts of its header
/// fields worked out once, and its policy divided for the fallback limiter.
pub(crate) struct TierEntry {
    pub(crate) policy: Policy,
    pub(crate) fields: PolicyFields,
    pub(crate) fallback: Option<Policy>,
    /// Its position in the layer's tiers.
    pub(crate) index: usize,
}

impl TierEntry {
    pub(crate) fn new(
        policy: Policy,
        index: usize,
        fail_mode: FailMode,
    ) -> Result<Self, crate::QuotaError> {
        let fallback = match fail_mode {
            FailMode::Fallback { divisor } => Some(policy.divided(divisor)?),
            _ => None,
        };
        Ok(Self {
            fields: PolicyFields::new(&policy),
            policy,
            fallback,
            index,
        })
    }
}

/// What to do with a request once the store (or the fail mode) has decided.
pub(crate) enum Verdict {
    /// Call the inner service; `fields` says whether the decision's fields go on the response
    /// (not for fail-open verdicts); `outcome` is how it is counted (unless it is delayed).
    Pass {
        decision: Decision,
        fields: bool,
        outcome: Metric,
    },
    /// Answer with the rejection of this denial.
    Deny(Decision),
    /// The store failed and the fail mode is closed: answer with [`Shared::unavailable`].
    Unavailable,
}

/// How a layer answers a request without its service: the HTTP way, or (feature `tonic`) the
/// gRPC way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Answer {
    Http,
    #[cfg(feature = "tonic")]
    Grpc,
}

/// How a settlement went: done (with the state after it, when the store gave one), or on its
/// way.
pub(crate) enum Settled {
    Now(Option<Decision>),
    Later(SettleFuture),
}

/// A settlement on its way; it completes even if this future is dropped (when it runs as a
/// task of its own).
pub(crate) type SettleFuture = Pin<Box<dyn Future<Output = Option<Decision>> + Send>>;

/// What the fail mode makes of a request whose store failed.
enum Degraded {
    /// The fallback limiter's decision, to be treated as the store's.
    Fallback(Decision),
    /// Fail-open: admitted, without rate-limit fields.
    Open(Decision),
    /// Fail-closed: 503.
    Closed,
}

impl<St, K, R> Shared<St, K, R> {
    /// The layer's policy (its default tier's, for a layer of tiers).
    pub(crate) fn policy(&self) -> &Policy {
        &self.tier(0).policy
    }

    /// Tier `index` (the default tier for an index out of range, which cannot happen).
    #[inline]
    pub(crate) fn tier(&self, index: usize) -> &TierEntry {
        match self.tiers.get(index) {
            Some(tier) => tier,
            None => &self.tiers[0],
        }
    }

    /// The verdict on a request of tier `tier` whose store check gave `result`.
    pub(crate) fn verdict(
        &self,
        result: Result<Decision, StoreError>,
        tier: &TierEntry,
        key: &Key,
        cost: u32,
    ) -> Verdict {
        let mut decision = match result {
            Ok(decision) => decision,
            Err(error) => match self.degrade(&error, tier, key, cost) {
                Degraded::Fallback(decision) => decision,
                Degraded::Open(decision) => {
                    return Verdict::Pass {
                        decision,
                        fields: false,
                        outcome: Metric::FailOpen,
                    };
                }
                Degraded::Closed => {
                    self.metrics.request(tier.index, Metric::FailClosed);
                    return Verdict::Unavailable;
                }
            },
        };
        decision.set_policy(tier.policy.name_arc());
        let degraded = decision.is_degraded();
        if decision.outcome() == Outcome::Allowed {
            self.counters.add(Counter::Allowed);
            tracing::trace!(
                target: "tollgate::decision",
                policy = tier.policy.name(),
                key = %self.log_key(key),
                cost,
                remaining = decision.remaining(),
                degraded,
                "request admitted"
            );
            return Verdict::Pass {
                decision,
                fields: true,
                outcome: if degraded {
                    Metric::FallbackAllowed
                } else {
                    Metric::Allowed
                },
            };
        }
        self.log_limited(tier, key, cost, &decision);
        if self.dry_run {
            self.counters.add(Counter::DryRunDenied);
            return Verdict::Pass {
                decision,
                fields: true,
                outcome: Metric::DryRunDenied,
            };
        }
        self.counters.add(Counter::Denied);
        self.metrics.request(
            tier.index,
            if degraded {
                Metric::FallbackDenied
            } else {
                Metric::Denied
            },
        );
        Verdict::Deny(decision)
    }

    /// The store failed: what the fail mode makes of the request.
    fn degrade(&self, error: &StoreError, tier: &TierEntry, key: &Key, cost: u32) -> Degraded {
        self.counters.add(Counter::StoreErrors);
        self.metrics.store_error(error.kind());
        self.counters.add(Counter::Degraded);
        self.warn_store_failure(error, tier, key);
        match (&self.fail_mode, &self.fallback, &tier.fallback) {
            (FailMode::Closed, _, _) => Degraded::Closed,
            (FailMode::Fallback { .. }, Some(store), Some(policy)) => {
                let mut decision = store.check_now(policy, key, cost);
                decision.degraded = true;
                Degraded::Fallback(decision)
            }
            _ => {
                self.counters.add(Counter::Allowed);
                let mut decision = Decision::fail_open(tier.policy.quota());
                decision.set_policy(tier.policy.name_arc());
                Degraded::Open(decision)
            }
        }
    }

    /// The rejection of a denied (or impossible) request, with `Retry-After`, this layer's
    /// fields and the decision in its extensions.
    pub(crate) fn reject<B>(
        &self,
        tier: &TierEntry,
        decision: Decision,
        parts: &Parts,
    ) -> Response<RateLimitBody<B>>
    where
        R: Rejector<B>,
    {
        let mut response = match self.answer(&parts.headers) {
            Answer::Http => self.rejector.reject(&decision, parts),
            #[cfg(feature = "tonic")]
            Answer::Grpc => crate::grpc::limited(&decision),
        };
        if self.rejection_fields {
            let headers = response.headers_mut();
            if let Some(retry) = decision.retry_after()
                && !headers.contains_key(http::header::RETRY_AFTER)
            {
                headers.insert(http::header::RETRY_AFTER, headers::retry_after_value(retry));
            }
            if self.header_style == HeaderStyle::Both {
                // Seven fields or more: room for them at once (a map grows past 6 otherwise).
                headers.reserve(8);
            }
            headers::apply(
                headers,
                self.header_style,
                self.reset_style,
                &tier.fields,
                &decision,
            );
        }
        if decision.is_degraded() {
            self.mark_degraded(response.headers_mut(), "fallback");
        }
        if self.response_decisions {
            crate::decision::Decisions::push_rejection(response.extensions_mut(), decision);
        }
        response
    }

    /// The answer to a request whose client the key extractor could not identify (a
    /// misconfiguration, such as a server that provides no peer address): 500, and an error
    /// logged at most once a second.
    pub(crate) fn unidentified<B>(
        &self,
        error: &KeyError,
        parts: &Parts,
    ) -> Response<RateLimitBody<B>> {
        self.counters.add(Counter::KeyErrors);
        self.metrics.request(0, Metric::Unidentified);
        if once_a_second(&self.last_key_error, self.started) {
            tracing::error!(
                target: "tollgate::key",
                policy = self.policy().name(),
                error = %error,
                "rate limiter cannot identify the client; answering 500 (gRPC: INTERNAL)"
            );
        }
        match self.answer(&parts.headers) {
            Answer::Http => misconfigured(),
            #[cfg(feature = "tonic")]
            Answer::Grpc => crate::grpc::misconfigured(),
        }
    }

    /// The answer to a request whose store failed under [`FailMode::Closed`]: 503 with
    /// `Retry-After: 1` (gRPC: `UNAVAILABLE`), marked degraded when the layer shows it.
    pub(crate) fn unavailable<B>(&self, parts: &Parts) -> Response<RateLimitBody<B>> {
        let mut response = match self.answer(&parts.headers) {
            Answer::Http => store_unavailable(),
            #[cfg(feature = "tonic")]
            Answer::Grpc => crate::grpc::store_unavailable(),
        };
        self.mark_degraded(response.headers_mut(), "fail-closed");
        response
    }

    /// How a request with `headers` is answered when the layer answers it without the service.
    /// Only called then, so an admitted request never pays for the `content-type` lookup.
    #[inline]
    fn answer(&self, headers: &HeaderMap) -> Answer {
        #[cfg(feature = "tonic")]
        if self.grpc.applies(headers) {
            return Answer::Grpc;
        }
        let _ = headers;
        Answer::Http
    }

    /// Adds the rate-limit fields of an admitted request's `decision` to its response, marks a
    /// degraded one, and records the decision in the response's extensions.
    pub(crate) fn finish_admitted<B>(
        &self,
        response: &mut Response<B>,
        tier: usize,
        decision: Decision,
        fields: bool,
    ) {
        if fields && self.headers_on_allowed {
            headers::apply(
                response.headers_mut(),
                self.header_style,
                self.reset_style,
                &self.tier(tier).fields,
                &decision,
            );
        }
        if decision.is_degraded() {
            self.mark_degraded(
                response.headers_mut(),
                if fields { "fallback" } else { "fail-open" },
            );
        }
        if self.response_decisions {
            crate::decision::Decisions::push_outer(response.extensions_mut(), decision);
        }
    }

    /// The charge of an admitted request, held until its response is known: settled then by a
    /// layer with a refund rule or reconciliation, and given back when an inner layer rejected
    /// the request. `None` for requests that charged nothing (fail-open, dry-run denials, a
    /// cost of 0 without reconciliation).
    #[inline]
    pub(crate) fn charge(
        &self,
        decision: &Decision,
        fields: bool,
        key: Key,
        cost: u32,
        tier: usize,
    ) -> Option<Charge> {
        if !fields || !decision.is_allowed() || (cost == 0 && !self.reconcile) {
            return None;
        }
        Some(Charge {
            key,
            tier,
            cost,
            fallback: decision.is_degraded(),
            at: Instant::now(),
            reset_after: decision.reset_after(),
        })
    }

    /// What `response` asks of `charge`: all of it back when an inner layer rejected the
    /// request (it never reached the service), else what this layer's refund rule or
    /// reconciliation says.
    #[inline]
    pub(crate) fn settlement_of<B>(&self, charge: &Charge, response: &Response<B>) -> Option<i64> {
        if crate::decision::Decisions::rejected_in(response.extensions()) {
            return crate::settle::give_back(charge);
        }
        if !self.settles {
            return None;
        }
        self.settlement(charge, response)
    }

    /// What `response` asks of `charge`: the signed units to adjust it by, if any.
    pub(crate) fn settlement<B>(&self, charge: &Charge, response: &Response<B>) -> Option<i64> {
        crate::settle::delta(
            charge,
            self.refund.as_deref(),
            self.reconcile,
            response.status(),
            response.headers(),
            response.extensions().get::<ActualCost>(),
        )
    }

    /// Adjusts `charge` by `delta` units, once: at once when the store answers at once (the
    /// memory stores), otherwise in a future that completes even if the caller drops it (a
    /// task of its own on a Tokio runtime). Yields the state after it, when the store gave one.
    pub(crate) fn settle(
        self: &Arc<Self>,
        charge: Charge,
        delta: i64,
        cx: &mut Context<'_>,
    ) -> Settled
    where
        St: Store,
        K: Send + Sync + 'static,
        R: Send + Sync + 'static,
    {
        let tier = self.tier(charge.tier);
        if charge.fallback {
            // Charged by the fallback limiter: settled there.
            let (Some(store), Some(policy)) = (&self.fallback, &tier.fallback) else {
                return Settled::Now(None);
            };
            let mut decision = store.adjust_now(policy, &charge.key, delta);
            decision.degraded = true;
            return Settled::Now(self.settled(&charge, delta, Ok(decision)));
        }
        let Some(fut) = self.store.adjust(&tier.policy, &charge.key, delta) else {
            self.settle_failed(&charge, delta, None);
            return Settled::Now(None);
        };
        let mut fut = Box::pin(fut);
        if let Poll::Ready(result) = fut.as_mut().poll(cx) {
            return Settled::Now(self.settled(&charge, delta, result));
        }
        let shared = Arc::clone(self);
        let task = async move {
            let result = fut.await;
            shared.settled(&charge, delta, result)
        };
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                let task = runtime.spawn(task);
                Settled::Later(Box::pin(async move { task.await.ok().flatten() }))
            }
            Err(_) => Settled::Later(Box::pin(task)),
        }
    }

    /// Counts a settlement the store answered, or reports its failure.
    fn settled(
        &self,
        charge: &Charge,
        delta: i64,
        result: Result<Decision, StoreError>,
    ) -> Option<Decision> {
        match result {
            Ok(mut decision) => {
                self.counters.add(if delta < 0 {
                    Counter::Refunds
                } else {
                    Counter::ExtraCharges
                });
                decision.set_policy(self.tier(charge.tier).policy.name_arc());
                tracing::trace!(
                    target: "tollgate::decision",
                    policy = self.tier(charge.tier).policy.name(),
                    key = %self.log_key(&charge.key),
                    delta,
                    remaining = decision.remaining(),
                    "charge settled"
                );
                Some(decision)
            }
            Err(error) => {
                self.settle_failed(charge, delta, Some(&error));
                None
            }
        }
    }

    /// A settlement that could not be made: the charge stands as it was made. Counted, logged
    /// at most once a second, never retried.
    fn settle_failed(&self, charge: &Charge, delta: i64, error: Option<&StoreError>) {
        self.counters.add(Counter::SettleFailures);
        if let Some(error) = error {
            self.metrics.store_error(error.kind());
        }
        if !once_a_second(&self.last_warning, self.started) {
            return;
        }
        let policy = self.tier(charge.tier).policy.name();
        let key = self.log_key(&charge.key);
        match error {
            Some(error) => tracing::warn!(
                target: "tollgate::store",
                policy,
                key = %key,
                delta,
                kind = ?error.kind(),
                error = %error,
                "rate-limit store failed to settle a charge; the charge stands as made \
                 (settlements are never retried)"
            ),
            None => tracing::warn!(
                target: "tollgate::store",
                policy,
                key = %key,
                delta,
                "the rate-limit store cannot adjust charges (Store::adjust returned None); \
                 the charge stands as made"
            ),
        }
    }

    /// Adds `x-ratelimit-degraded: <how>` when the layer is configured to show degraded
    /// decisions.
    fn mark_degraded(&self, headers: &mut HeaderMap, how: &'static str) {
        if self.degraded_header {
            headers.insert(
                headers::X_RATELIMIT_DEGRADED.clone(),
                HeaderValue::from_static(how),
            );
        }
    }

    pub(crate) fn count_unlimited(&self) {
        self.counters.add(Counter::Unlimited);
        self.metrics.request(0, Metric::Unlimited);
    }

    /// The span of one asynchronous store call (`tollgate.store`, at DEBUG).
    pub(crate) fn store_span(&self, tier: usize) -> tracing::Span
    where
        St: crate::Store,
    {
        tracing::debug_span!(
            target: "tollgate::store",
            "tollgate.store",
            policy = self.tier(tier).policy.name(),
            store = self.store.name()
        )
    }

    /// Counts an admitted request once it is known whether it waits.
    #[inline]
    pub(crate) fn count_pass(&self, tier: &TierEntry, outcome: Metric, delay: Option<Duration>) {
        match delay {
            Some(wait) => {
                self.metrics.request(tier.index, Metric::Delayed);
                self.metrics.delay(tier.index, wait);
            }
            None => self.metrics.request(tier.index, outcome),
        }
    }

    /// How long an admitted request waits before it is served (nginx `limit_req` without
    /// `nodelay`): `None` unless the layer delays and the request is beyond the first
    /// `delay_after` of a burst.
    pub(crate) fn delay_for(
        &self,
        tier: &TierEntry,
        decision: &Decision,
        key: &Key,
    ) -> Option<Duration> {
        let after = self.delay_after?;
        if !decision.is_allowed() || decision.is_degraded() {
            return None;
        }
        let delay = decision
            .per_quota()
            .iter()
            .map(|d| d.excess_over(after))
            .max()
            .filter(|d| !d.is_zero())?;
        self.counters.add(Counter::Delayed);
        let key = self.log_key(key);
        // nginx logs delays one level below rejections.
        macro_rules! delayed {
            ($level:expr) => {
                tracing::event!(
                    target: "tollgate::limited",
                    $level,
                    policy = tier.policy.name(),
                    key = %key,
                    delay_ms = delay.as_millis() as u64,
                    "request delayed"
                )
            };
        }
        match self.log_level {
            Level::ERROR => delayed!(Level::WARN),
            Level::WARN => delayed!(Level::INFO),
            Level::INFO => delayed!(Level::DEBUG),
            _ => delayed!(Level::TRACE),
        }
        Some(delay)
    }

    fn log_limited(&self, tier: &TierEntry, key: &Key, cost: u32, decision: &Decision) {
        let key = self.log_key(key);
        macro_rules! limited {
            ($level:expr) => {
                tracing::event!(
                    target: "tollgate::limited",
                    $level,
                    policy = tier.policy.name(),
                    key = %key,
                    cost,
                    outcome = ?decision.outcome(),
                    retry_after_ms = decision.retry_after().map(|r| r.as_millis() as u64),
                    dry_run = self.dry_run,
                    degraded = decision.is_degraded(),
                    "request limited"
                )
            };
        }
        match self.log_level {
            Level::ERROR => limited!(Level::ERROR),
            Level::WARN => limited!(Level::WARN),
            Level::INFO => limited!(Level::INFO),
            Level::DEBUG => limited!(Level::DEBUG),
            Level::TRACE => limited!(Level::TRACE),
        }
    }

    /// Warns about a store failure at most once a second per layer.
    fn warn_store_failure(&self, error: &StoreError, tier: &TierEntry, key: &Key) {
        if !once_a_second(&self.last_warning, self.started) {
            return;
        }
        tracing::warn!(
            target: "tollgate::store",
            policy = tier.policy.name(),
            key = %self.log_key(key),
            kind = ?error.kind(),
            fail_mode = ?self.fail_mode,
            error = %error,
            "rate-limit store failed; the fail mode decides"
        );
    }

    /// How `key` appears in log events: its fingerprint, unless the layer was told to log
    /// raw keys.
    fn log_key<'k>(&self, key: &'k Key) -> LogKey<'k> {
        LogKey {
            key,
            raw: self.log_raw_keys,
        }
    }
}

/// A client key in a log event: `fp:<fingerprint>`, or the raw key when explicitly enabled.
struct LogKey<'k> {
    key: &'k Key,
    raw: bool,
}

impl fmt::Display for LogKey<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.raw {
            write!(f, "{}", self.key.raw())
        } else {
            write!(f, "fp:{}", self.key.fingerprint())
        }
    }
}

/// Live counters of one layer, striped over cache lines: each thread counts in its own stripe,
/// so requests served on different cores never write the same line; a snapshot sums them.
pub(crate) struct Counters {
    /// A power of two of them, so a thread's stripe is its index masked.
    stripes: Box<[CachePadded<[AtomicU64; Counter::COUNT]>]>,
}

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
    KeyErrors,
    Refunds,
    ExtraCharges,
    SettleFailures,
}

impl Counter {
    const COUNT: usize = 11;
}

/// The most stripes a layer gets.
const MAX_STRIPES: usize = 64;

impl Counters {
    pub(crate) fn new() -> Self {
        let cores = std::thread::available_parallelism().map_or(8, std::num::NonZeroUsize::get);
        let stripes = cores.next_power_of_two().min(MAX_STRIPES);
        Self {
            stripes: (0..stripes).map(|_| CachePadded::default()).collect(),
        }
    }

    /// Counts one event in this thread's stripe.
    #[inline]
    pub(crate) fn add(&self, counter: Counter) {
        let stripe = thread_stripe() & (self.stripes.len() - 1);
        if let Some(counts) = self.stripes.get(stripe) {
            counts[counter as usize].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The sum over every stripe.
    pub(crate) fn get(&self, counter: Counter) -> u64 {
        self.stripes
            .iter()
            .map(|counts| counts[counter as usize].load(Ordering::Relaxed))
            .fold(0, u64::wrapping_add)
    }

    /// A snapshot of every counter.
    pub(crate) fn stats(&self) -> Stats {
        Stats {
            allowed: self.get(Counter::Allowed),
            denied: self.get(Counter::Denied),
            dry_run_denied: self.get(Counter::DryRunDenied),
            unlimited: self.get(Counter::Unlimited),
            store_errors: self.get(Counter::StoreErrors),
            degraded: self.get(Counter::Degraded),
            delayed: self.get(Counter::Delayed),
            unidentified: self.get(Counter::KeyErrors),
            refunds: self.get(Counter::Refunds),
            extra_charges: self.get(Counter::ExtraCharges),
            settle_failures: self.get(Counter::SettleFailures),
        }
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
    /// Admitted requests that were delayed before being served (see
    /// [`Builder::delay_after`](crate::Builder::delay_after)).
    pub delayed: u64,
    /// Requests answered 500 because the key extractor could not identify the client (see
    /// [`KeyError`]).
    pub unidentified: u64,
    /// Admitted requests whose charge was given back, wholly or in part, after the response
    /// (see [`crate::settle`]).
    pub refunds: u64,
    /// Admitted requests charged more after the response: an [`ActualCost`] above the
    /// reservation.
    pub extra_charges: u64,
    /// Settlements the store failed or could not make: each charge stood as made (see
    /// [`crate::settle`]).
    pub settle_failures: u64,
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

    #[test]
    fn each_stripe_has_a_cache_line_of_its_own() {
        let counters = Counters::new();
        let size = std::mem::size_of_val(&counters.stripes[0]);
        assert!(size >= 64 && size.is_multiple_of(64), "{size}");
    }
}

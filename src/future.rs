//! [`ResponseFuture`]: waits for the store, applies the fail mode, then either answers the
//! rejection or calls the inner service and adds the rate-limit fields to its response.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll, ready};

use http::{Request, Response};
use pin_project_lite::pin_project;
use tower_service::Service;
use tracing::Level;

use crate::decision::{Decision, Outcome};
use crate::error::StoreError;
use crate::headers;
use crate::key::Key;
use crate::layer::{Counter, Shared};
use crate::response::{RateLimitBody, store_unavailable};
use crate::store::{FailMode, Store};

pin_project! {
    /// The future of a [`RateLimit`](crate::RateLimit) service's response.
    pub struct ResponseFuture<S, St, K, ReqBody, ResBody>
    where
        S: Service<Request<ReqBody>>,
        St: Store,
    {
        #[pin]
        state: State<St::Future, S, ReqBody, S::Future, ResBody>,
        shared: Arc<Shared<St, K>>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<C, S, ReqBody, F, ResBody> {
        Checking {
            #[pin]
            check: C,
            pending: Option<(S, Request<ReqBody>, Key)>,
            cost: u32,
        },
        Delaying {
            #[pin]
            sleep: tokio::time::Sleep,
            pending: Option<(S, Request<ReqBody>, Decision)>,
        },
        Calling {
            #[pin]
            fut: F,
            // The decision, and whether its rate-limit fields go on the response (not for
            // fail-open verdicts); `None` for unlimited requests.
            decision: Option<(Decision, bool)>,
        },
        // Answered without the inner service (a rejection or a 503).
        Ready {
            response: Option<Response<RateLimitBody<ResBody>>>,
        },
        Done,
    }
}

impl<S, St, K, ReqBody, ResBody> ResponseFuture<S, St, K, ReqBody, ResBody>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone,
    St: Store,
{
    /// The store answered at once (see [`Store::check_ready`]): decide now, so the request goes
    /// straight to the inner service (`inner`, polled ready) without waiting in this future.
    pub(crate) fn decided(
        result: Result<Decision, StoreError>,
        inner: &mut S,
        req: Request<ReqBody>,
        key: &Key,
        cost: u32,
        shared: Arc<Shared<St, K>>,
    ) -> Self {
        let state = next_state(
            &shared,
            result,
            ReadyInner::InService(inner),
            req,
            key,
            cost,
        );
        Self { state, shared }
    }

    pub(crate) fn checking(
        check: St::Future,
        inner: S,
        req: Request<ReqBody>,
        key: Key,
        cost: u32,
        shared: Arc<Shared<St, K>>,
    ) -> Self {
        Self {
            state: State::Checking {
                check,
                pending: Some((inner, req, key)),
                cost,
            },
            shared,
        }
    }

    pub(crate) fn unlimited(fut: S::Future, shared: Arc<Shared<St, K>>) -> Self {
        Self {
            state: State::Calling {
                fut,
                decision: None,
            },
            shared,
        }
    }
}

/// The instance of the inner service that was polled ready: still in the service (a request
/// decided at once) or already owned by the future (after the store's future).
enum ReadyInner<'a, S> {
    InService(&'a mut S),
    Owned(S),
}

impl<S: Clone> ReadyInner<'_, S> {
    /// The ready instance, to keep; a service left without it gets a fresh clone.
    fn take(self) -> S {
        match self {
            Self::InService(inner) => std::mem::replace(inner, inner.clone()),
            Self::Owned(inner) => inner,
        }
    }

    /// Gives the ready instance up (its request was answered without it), so that whatever it
    /// reserved when polled ready (a `Buffer` slot, a concurrency permit) is released now, not
    /// at the service's next call.
    fn release(self) {
        drop(self.take());
    }

    fn call<R>(self, req: R) -> S::Future
    where
        S: Service<R>,
    {
        match self {
            Self::InService(inner) => inner.call(req),
            Self::Owned(mut inner) => inner.call(req),
        }
    }
}

/// What follows a decision: the rejection, a delay, or the call to the inner service (the
/// ready instance: called here, kept through the delay, or released with the rejection).
fn next_state<S, St, K, ReqBody, ResBody>(
    shared: &Shared<St, K>,
    result: Result<Decision, StoreError>,
    inner: ReadyInner<'_, S>,
    mut req: Request<ReqBody>,
    key: &Key,
    cost: u32,
) -> State<St::Future, S, ReqBody, S::Future, ResBody>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone,
    St: Store,
{
    match shared.verdict(result, key, cost) {
        Verdict::Pass { decision, headers } => {
            req.extensions_mut().insert(decision.clone());
            if headers && let Some(delay) = shared.delay_for(&decision, key) {
                return State::Delaying {
                    sleep: tokio::time::sleep(delay),
                    pending: Some((inner.take(), req, decision)),
                };
            }
            State::Calling {
                fut: inner.call(req),
                decision: Some((decision, headers)),
            }
        }
        Verdict::Respond(response) => {
            inner.release();
            State::Ready {
                response: Some(response),
            }
        }
    }
}

impl<S, St, K, ReqBody, ResBody> Future for ResponseFuture<S, St, K, ReqBody, ResBody>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone,
    St: Store,
{
    type Output = Result<Response<RateLimitBody<ResBody>>, S::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                StateProj::Checking {
                    check,
                    pending,
                    cost,
                } => {
                    let result = ready!(check.poll(cx));
                    let cost = *cost;
                    let next = match pending.take() {
                        Some((inner, req, key)) => next_state(
                            this.shared,
                            result,
                            ReadyInner::Owned(inner),
                            req,
                            &key,
                            cost,
                        ),
                        None => State::Done,
                    };
                    this.state.set(next);
                }
                StateProj::Delaying { sleep, pending } => {
                    ready!(sleep.poll(cx));
                    let Some((mut inner, req, decision)) = pending.take() else {
                        this.state.set(State::Done);
                        continue;
                    };
                    let fut = inner.call(req);
                    this.state.set(State::Calling {
                        fut,
                        decision: Some((decision, true)),
                    });
                }
                StateProj::Calling { fut, decision } => {
                    let response = ready!(fut.poll(cx))?;
                    let decision = decision.take();
                    this.state.set(State::Done);
                    let mut response = response.map(RateLimitBody::inner);
                    let shared = &**this.shared;
                    if let Some((decision, fields)) = decision {
                        if fields && shared.headers_on_allowed {
                            headers::apply(
                                response.headers_mut(),
                                shared.header_style,
                                shared.reset_style,
                                &shared.fields,
                                &decision,
                            );
                        }
                        if decision.is_degraded() {
                            shared.mark_degraded(
                                response.headers_mut(),
                                if fields { "fallback" } else { "fail-open" },
                            );
                        }
                    }
                    return Poll::Ready(Ok(response));
                }
                StateProj::Ready { response } => {
                    let response = response.take();
                    this.state.set(State::Done);
                    if let Some(response) = response {
                        return Poll::Ready(Ok(response));
                    }
                }
                StateProj::Done => {
                    // Polled after completion: tower futures are not fused, but never panic.
                    return Poll::Pending;
                }
            }
        }
    }
}

/// What to do with a request once the store (or the fail mode) has decided.
enum Verdict<B> {
    /// Call the inner service; `headers` says whether the decision's fields go on the response.
    Pass { decision: Decision, headers: bool },
    /// Answer without calling the inner service.
    Respond(Response<RateLimitBody<B>>),
}

impl<St, K> Shared<St, K> {
    pub(crate) fn count_unlimited(&self) {
        self.counters.add(Counter::Unlimited);
    }

    fn verdict<B>(&self, result: Result<Decision, StoreError>, key: &Key, cost: u32) -> Verdict<B> {
        let decision = match result {
            Ok(decision) => decision,
            Err(error) => {
                self.counters.add(Counter::StoreErrors);
                self.counters.add(Counter::Degraded);
                self.warn_store_failure(&error);
                match (&self.fail_mode, &self.fallback) {
                    (FailMode::Closed, _) => {
                        let mut response = store_unavailable();
                        self.mark_degraded(response.headers_mut(), "fail-closed");
                        return Verdict::Respond(response);
                    }
                    (FailMode::Fallback { .. }, Some((store, policy))) => {
                        let mut decision = store.check_now(policy, key, cost);
                        decision.degraded = true;
                        decision
                    }
                    _ => {
                        self.counters.add(Counter::Allowed);
                        let decision = Decision::fail_open(self.policy.quota());
                        return Verdict::Pass {
                            decision,
                            headers: false,
                        };
                    }
                }
            }
        };
        if decision.outcome() == Outcome::Allowed {
            self.counters.add(Counter::Allowed);
            return Verdict::Pass {
                decision,
                headers: true,
            };
        }
        self.log_limited(key, cost, &decision);
        if self.dry_run {
            self.counters.add(Counter::DryRunDenied);
            return Verdict::Pass {
                decision,
                headers: true,
            };
        }
        self.counters.add(Counter::Denied);
        let mut response = self
            .rejection
            .response(self.policy.name(), decision.retry_after());
        if self.header_style == headers::HeaderStyle::Both {
            // Seven fields or more: room for them at once (a map grows past 6 otherwise).
            response.headers_mut().reserve(8);
        }
        headers::apply(
            response.headers_mut(),
            self.header_style,
            self.reset_style,
            &self.fields,
            &decision,
        );
        if decision.is_degraded() {
            self.mark_degraded(response.headers_mut(), "fallback");
        }
        Verdict::Respond(response)
    }

    /// Adds `x-ratelimit-degraded: <how>` when the layer is configured to show degraded
    /// decisions.
    fn mark_degraded(&self, headers: &mut http::HeaderMap, how: &'static str) {
        if self.degraded_header {
            headers.insert(
                headers::X_RATELIMIT_DEGRADED.clone(),
                http::HeaderValue::from_static(how),
            );
        }
    }

    /// How long an admitted request waits before it is served (nginx `limit_req` without
    /// `nodelay`): `None` unless the layer delays and the request is beyond the first
    /// `delay_after` of a burst.
    fn delay_for(&self, decision: &Decision, key: &Key) -> Option<std::time::Duration> {
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
        // nginx logs delays one level below rejections.
        macro_rules! delayed {
            ($level:expr) => {
                tracing::event!(
                    target: "tollgate::limited",
                    $level,
                    policy = self.policy.name(),
                    key = %key.fingerprint(),
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

    fn log_limited(&self, key: &Key, cost: u32, decision: &Decision) {
        macro_rules! limited {
            ($level:expr) => {
                tracing::event!(
                    target: "tollgate::limited",
                    $level,
                    policy = self.policy.name(),
                    key = %key.fingerprint(),
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
    fn warn_store_failure(&self, error: &StoreError) {
        let now = u64::try_from(self.started.elapsed().as_micros()).unwrap_or(u64::MAX);
        let last = self.last_warning.load(Ordering::Relaxed);
        if (last != 0 && now.saturating_sub(last) < 1_000_000)
            || self
                .last_warning
                .compare_exchange(last, now.max(1), Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            return;
        }
        tracing::warn!(
            target: "tollgate::store",
            policy = self.policy.name(),
            kind = ?error.kind(),
            fail_mode = ?self.fail_mode,
            error = %error,
            "rate-limit store failed; the fail mode decides"
        );
    }
}

//! [`ResponseFuture`]: waits for the store, applies the fail mode, then either answers the
//! rejection or calls the inner service and adds the rate-limit fields to its response.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use http::{Request, Response};
use pin_project_lite::pin_project;
use tower_service::Service;

use crate::decide::{SettleFuture, Settled, Shared, Verdict};
use crate::decision::{Decision, Decisions};
use crate::error::StoreError;
use crate::key::Key;
use crate::response::{RateLimitBody, Rejector};
use crate::settle::Charge;
use crate::store::Store;
use crate::telemetry::Started;
use crate::tier::LookupFuture;

pin_project! {
    /// The future of a [`RateLimit`](crate::RateLimit) service's response.
    pub struct ResponseFuture<S, St, K, R, ReqBody, ResBody>
    where
        S: Service<Request<ReqBody>>,
        St: Store,
    {
        #[pin]
        state: State<St::Future, S, ReqBody, S::Future, ResBody>,
        shared: Arc<Shared<St, K, R>>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<C, S, ReqBody, F, ResBody> {
        // Waiting for the tier resolver.
        Resolving {
            #[pin]
            lookup: LookupFuture,
            pending: Option<(S, Request<ReqBody>, Key)>,
            cost: u32,
        },
        Checking {
            #[pin]
            check: C,
            pending: Option<(S, Request<ReqBody>, Key)>,
            cost: u32,
            tier: usize,
            started: Started,
            // `tollgate.store`, entered while the store's future is polled.
            span: tracing::Span,
        },
        Delaying {
            #[pin]
            sleep: tokio::time::Sleep,
            pending: Option<(S, Request<ReqBody>, Decision)>,
            tier: usize,
            charge: Option<Charge>,
        },
        Calling {
            #[pin]
            fut: F,
            // The decision, its tier, and whether its rate-limit fields go on the response
            // (not for fail-open verdicts); `None` for unlimited requests.
            decision: Option<(Decision, usize, bool)>,
            // The charge to settle from the response (a refund rule, reconciliation, or an inner
            // layer's rejection).
            charge: Option<Charge>,
        },
        // The response is in; its charge is being settled before it is handed on.
        Settling {
            settle: SettleFuture,
            response: Option<Response<RateLimitBody<ResBody>>>,
            decision: Option<(Decision, usize, bool)>,
        },
        // Answered without the inner service (a rejection or a 503).
        Ready {
            response: Option<Response<RateLimitBody<ResBody>>>,
        },
        Done,
    }
}

impl<S, St, K, R, ReqBody, ResBody> ResponseFuture<S, St, K, R, ReqBody, ResBody>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone,
    St: Store,
    R: Rejector<ResBody>,
{
    /// The store answered at once (see [`Store::check_ready`]): decide now, so the request goes
    /// straight to the inner service (`inner`, polled ready) without waiting in this future.
    pub(crate) fn decided(
        result: Result<Decision, StoreError>,
        inner: &mut S,
        req: Request<ReqBody>,
        key: &Key,
        cost: u32,
        tier: usize,
        shared: Arc<Shared<St, K, R>>,
    ) -> Self {
        let state = next_state(
            &shared,
            result,
            ReadyInner::InService(inner),
            req,
            key,
            cost,
            tier,
        );
        Self { state, shared }
    }

    pub(crate) fn checking(
        check: St::Future,
        inner: S,
        req: Request<ReqBody>,
        key: Key,
        cost: u32,
        tier: usize,
        shared: Arc<Shared<St, K, R>>,
    ) -> Self {
        let started = shared.metrics.start();
        let span = shared.store_span(tier);
        Self {
            state: State::Checking {
                check,
                pending: Some((inner, req, key)),
                cost,
                tier,
                started,
                span,
            },
            shared,
        }
    }

    /// The request's tier is being looked up; the store check follows.
    pub(crate) fn resolving(
        lookup: LookupFuture,
        inner: S,
        req: Request<ReqBody>,
        key: Key,
        cost: u32,
        shared: Arc<Shared<St, K, R>>,
    ) -> Self {
        Self {
            state: State::Resolving {
                lookup,
                pending: Some((inner, req, key)),
                cost,
            },
            shared,
        }
    }

    pub(crate) fn unlimited(fut: S::Future, shared: Arc<Shared<St, K, R>>) -> Self {
        Self {
            state: State::Calling {
                fut,
                decision: None,
                charge: None,
            },
            shared,
        }
    }

    /// Answered at once, without the inner service (a request whose client is unknown).
    pub(crate) fn respond(
        response: Response<RateLimitBody<ResBody>>,
        shared: Arc<Shared<St, K, R>>,
    ) -> Self {
        Self {
            state: State::Ready {
                response: Some(response),
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
fn next_state<S, St, K, R, ReqBody, ResBody>(
    shared: &Shared<St, K, R>,
    result: Result<Decision, StoreError>,
    inner: ReadyInner<'_, S>,
    mut req: Request<ReqBody>,
    key: &Key,
    cost: u32,
    tier: usize,
) -> State<St::Future, S, ReqBody, S::Future, ResBody>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone,
    St: Store,
    R: Rejector<ResBody>,
{
    let entry = shared.tier(tier);
    match shared.verdict(result, entry, key, cost) {
        Verdict::Pass {
            decision,
            fields,
            outcome,
        } => {
            let delay = fields
                .then(|| shared.delay_for(entry, &decision, key))
                .flatten();
            shared.count_pass(entry, outcome, delay);
            let charge = shared.charge(&decision, fields, key.clone(), cost, tier);
            Decisions::record_request(req.extensions_mut(), decision.clone());
            if let Some(delay) = delay {
                return State::Delaying {
                    sleep: tokio::time::sleep(delay),
                    pending: Some((inner.take(), req, decision)),
                    tier,
                    charge,
                };
            }
            State::Calling {
                fut: inner.call(req),
                decision: Some((decision, tier, fields)),
                charge,
            }
        }
        Verdict::Deny(decision) => {
            inner.release();
            let (parts, _body) = req.into_parts();
            State::Ready {
                response: Some(shared.reject(entry, decision, &parts)),
            }
        }
        Verdict::Unavailable => {
            inner.release();
            let (parts, _body) = req.into_parts();
            State::Ready {
                response: Some(shared.unavailable(&parts)),
            }
        }
    }
}

/// The state after a settlement replaces the admission's decision in the response's fields.
fn settled(decision: &mut Option<(Decision, usize, bool)>, after: Option<Decision>) {
    if let (Some((decision, _, _)), Some(after)) = (decision, after) {
        *decision = after;
    }
}

/// An admitted request's response, with its decision's fields.
fn finish<St, K, R, B>(
    shared: &Shared<St, K, R>,
    mut response: Response<B>,
    decision: Option<(Decision, usize, bool)>,
) -> Response<B> {
    if let Some((decision, tier, fields)) = decision {
        shared.finish_admitted(&mut response, tier, decision, fields);
    }
    response
}

impl<S, St, K, R, ReqBody, ResBody> Future for ResponseFuture<S, St, K, R, ReqBody, ResBody>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone,
    St: Store,
    K: crate::key::KeyExtractor,
    R: Rejector<ResBody>,
{
    type Output = Result<Response<RateLimitBody<ResBody>>, S::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                StateProj::Resolving {
                    lookup,
                    pending,
                    cost,
                } => {
                    let resolved = ready!(lookup.poll(cx));
                    let cost = *cost;
                    let Some((inner, req, key)) = pending.take() else {
                        this.state.set(State::Done);
                        continue;
                    };
                    let shared = &**this.shared;
                    let next = match resolved {
                        Ok(tier) => {
                            let policy = &shared.tier(tier).policy;
                            match shared.store.check_ready(policy, &key, cost) {
                                Some(result) => next_state(
                                    shared,
                                    result,
                                    ReadyInner::Owned(inner),
                                    req,
                                    &key,
                                    cost,
                                    tier,
                                ),
                                None => State::Checking {
                                    check: shared.store.check(policy, &key, cost),
                                    pending: Some((inner, req, key)),
                                    cost,
                                    tier,
                                    started: shared.metrics.start(),
                                    span: shared.store_span(tier),
                                },
                            }
                        }
                        // A resolver that fails is a store failure: the fail mode decides, for
                        // the default tier.
                        Err(error) => next_state(
                            shared,
                            Err(error),
                            ReadyInner::Owned(inner),
                            req,
                            &key,
                            cost,
                            0,
                        ),
                    };
                    this.state.set(next);
                }
                StateProj::Checking {
                    check,
                    pending,
                    cost,
                    tier,
                    started,
                    span,
                } => {
                    let result = {
                        let _entered = span.enter();
                        ready!(check.poll(cx))
                    };
                    let (cost, tier) = (*cost, *tier);
                    let failed = result.as_ref().err().map(StoreError::kind);
                    this.shared.metrics.finish(*started, failed);
                    let next = match pending.take() {
                        Some((inner, req, key)) => next_state(
                            this.shared,
                            result,
                            ReadyInner::Owned(inner),
                            req,
                            &key,
                            cost,
                            tier,
                        ),
                        None => State::Done,
                    };
                    this.state.set(next);
                }
                StateProj::Delaying {
                    sleep,
                    pending,
                    tier,
                    charge,
                } => {
                    ready!(sleep.poll(cx));
                    let tier = *tier;
                    let charge = charge.take();
                    let Some((mut inner, req, decision)) = pending.take() else {
                        this.state.set(State::Done);
                        continue;
                    };
                    let fut = inner.call(req);
                    this.state.set(State::Calling {
                        fut,
                        decision: Some((decision, tier, true)),
                        charge,
                    });
                }
                StateProj::Calling {
                    fut,
                    decision,
                    charge,
                } => {
                    let response = ready!(fut.poll(cx))?;
                    let mut decision = decision.take();
                    let charge = charge.take();
                    this.state.set(State::Done);
                    let response = response.map(RateLimitBody::inner);
                    if let Some(charge) = charge
                        && let Some(delta) = this.shared.settlement_of(&charge, &response)
                    {
                        match this.shared.settle(charge, delta, cx) {
                            Settled::Now(after) => settled(&mut decision, after),
                            Settled::Later(settle) => {
                                this.state.set(State::Settling {
                                    settle,
                                    response: Some(response),
                                    decision,
                                });
                                continue;
                            }
                        }
                    }
                    return Poll::Ready(Ok(finish(this.shared, response, decision)));
                }
                StateProj::Settling {
                    settle,
                    response,
                    decision,
                } => {
                    let after = ready!(settle.as_mut().poll(cx));
                    let mut decision = decision.take();
                    let response = response.take();
                    this.state.set(State::Done);
                    settled(&mut decision, after);
                    if let Some(response) = response {
                        return Poll::Ready(Ok(finish(this.shared, response, decision)));
                    }
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

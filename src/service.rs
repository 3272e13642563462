//! [`RateLimit`]: the middleware service. A request is decided in [`RateLimit::call`], which
//! extracts the key and starts the store's check; [`ResponseFuture`](crate::future::ResponseFuture)
//! waits for the store if it must, and `decide.rs` turns the store's answer into the verdict.

use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};
use tower_service::Service;

use crate::decide::Shared;
use crate::future::ResponseFuture;
use crate::key::KeyExtractor;
use crate::response::{DefaultRejection, RateLimitBody, Rejector};
use crate::store::Store;
use crate::tier::Pick;

/// A service rate-limited by a [`RateLimitLayer`](crate::RateLimitLayer).
///
/// Limited requests get an `Ok` response (429 by default), so the inner service's error type
/// is unchanged and axum needs no `HandleErrorLayer`.
pub struct RateLimit<S, St, K, R = DefaultRejection> {
    inner: S,
    shared: Arc<Shared<St, K, R>>,
}

impl<S, St, K, R> RateLimit<S, St, K, R> {
    pub(crate) fn new(inner: S, shared: Arc<Shared<St, K, R>>) -> Self {
        Self { inner, shared }
    }

    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The wrapped service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// The wrapped service, unwrapped.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S: Clone, St, K, R> Clone for RateLimit<S, St, K, R> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            shared: Arc::clone(&self.shared),
        }
    }
}

impl<S: std::fmt::Debug, St, K, R> std::fmt::Debug for RateLimit<S, St, K, R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimit")
            .field("inner", &self.inner)
            .field("policy", self.shared.policy())
            .finish_non_exhaustive()
    }
}

impl<S, St, K, R, ReqBody, ResBody> Service<Request<ReqBody>> for RateLimit<S, St, K, R>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone,
    St: Store,
    K: KeyExtractor,
    R: Rejector<ResBody>,
{
    type Response = Response<RateLimitBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<S, St, K, R, ReqBody, ResBody>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        let shared = &self.shared;
        let (parts, body) = req.into_parts();
        let key = if shared.skip.as_ref().is_some_and(|skip| skip(&parts)) {
            None
        } else {
            match shared.key.try_extract(&parts) {
                Ok(key) => key,
                Err(error) => {
                    // Answered without the inner service: give up the ready instance now, so
                    // that whatever it reserved is released with this response.
                    let clone = self.inner.clone();
                    drop(std::mem::replace(&mut self.inner, clone));
                    let response = shared.unidentified(&error, &parts);
                    return ResponseFuture::respond(response, Arc::clone(shared));
                }
            }
        };
        let Some(key) = key else {
            shared.count_unlimited();
            let fut = self.inner.call(Request::from_parts(parts, body));
            return ResponseFuture::unlimited(fut, Arc::clone(shared));
        };
        let cost = shared.cost.as_ref().map_or(1, |cost| cost(&parts));
        let tier = match shared.tiering.as_ref().map(|t| t.pick(&parts, &key)) {
            None => 0,
            Some(Pick::Now(tier)) => tier,
            Some(Pick::Lookup(lookup)) => {
                // The tier is looked up first; the future owns the ready instance meanwhile.
                let clone = self.inner.clone();
                let inner = std::mem::replace(&mut self.inner, clone);
                let req = Request::from_parts(parts, body);
                return ResponseFuture::resolving(
                    lookup,
                    inner,
                    req,
                    key,
                    cost,
                    Arc::clone(shared),
                );
            }
        };
        let policy = &shared.tier(tier).policy;
        if let Some(result) = shared.store.check_ready(policy, &key, cost) {
            // Decided at once: the instance that was polled ready is called right here (or
            // handed to the future only if the request must wait), so nothing is cloned.
            let req = Request::from_parts(parts, body);
            return ResponseFuture::decided(
                result,
                &mut self.inner,
                req,
                &key,
                cost,
                tier,
                Arc::clone(shared),
            );
        }
        // The future owns the instance that was polled ready; this one keeps a fresh clone.
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        let check = shared.store.check(policy, &key, cost);
        ResponseFuture::checking(
            check,
            inner,
            Request::from_parts(parts, body),
            key,
            cost,
            tier,
            Arc::clone(shared),
        )
    }
}

//! Reference layers that are not rate limiters, for measuring what any such middleware costs
//! under axum whatever it decides (used by `benches/middleware.rs` and
//! `examples/bench_server.rs`):
//!
//! - [`passthrough`] only wraps the response body in a type of its own, as every layer that can
//!   answer by itself must (axum boxes such a body once more);
//! - [`floor`] also puts a value as large as a `tollgate::Decision` into the request's
//!   extensions and two fixed `RateLimit-Policy` / `RateLimit` fields, as long as tollgate's,
//!   onto the response: the least work that yields what tollgate's admitted responses carry.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use axum::body::Body;
use bytes::Bytes;
use http::{HeaderValue, Request, Response};
use http_body_util::{Either, Full};
use tower::util::MapResponseLayer;

/// The `passthrough` layer.
pub(crate) fn passthrough() -> MapResponseLayer<fn(Response<Body>) -> Response<Wrapped>> {
    MapResponseLayer::new(wrap_body)
}

/// The `floor` layer.
pub(crate) fn floor()
-> tower::layer::LayerFn<fn(axum::routing::Route) -> Floor<axum::routing::Route>> {
    tower::layer::layer_fn(|inner| Floor { inner })
}

/// The body type of a layer that may answer with a body of its own.
pub(crate) type Wrapped = Either<Body, Full<Bytes>>;

pub(crate) fn wrap_body(res: Response<Body>) -> Response<Wrapped> {
    res.map(Either::Left)
}

/// The `floor` layer: a value as large as a `tollgate::Decision` into the request's
/// extensions, two fixed header fields onto the response, and the body wrapped.
#[derive(Clone)]
pub(crate) struct Floor<S> {
    inner: S,
}

/// What `floor` puts into the extensions.
#[derive(Clone)]
pub(crate) struct FloorMarker(#[allow(dead_code)] [u64; 6]);

impl<S> tower::Service<Request<Body>> for Floor<S>
where
    S: tower::Service<Request<Body>, Response = Response<Body>>,
{
    type Response = Response<Wrapped>;
    type Error = S::Error;
    type Future = FloorFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<Body>) -> Self::Future {
        req.extensions_mut().insert(FloorMarker([0; 6]));
        FloorFuture {
            inner: self.inner.call(req),
        }
    }
}

pin_project_lite::pin_project! {
    /// The `floor` layer's response future.
    pub(crate) struct FloorFuture<F> {
        #[pin]
        inner: F,
    }
}

impl<F, E> Future for FloorFuture<F>
where
    F: Future<Output = Result<Response<Body>, E>>,
{
    type Output = Result<Response<Wrapped>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut res = wrap_body(std::task::ready!(self.project().inner.poll(cx))?);
        let headers = res.headers_mut();
        headers.insert(
            http::HeaderName::from_static("ratelimit-policy"),
            HeaderValue::from_static("\"default\";q=1000000;w=1"),
        );
        headers.insert(
            http::HeaderName::from_static("ratelimit"),
            HeaderValue::from_static("\"default\";r=999999999;t=0"),
        );
        Poll::Ready(Ok(res))
    }
}

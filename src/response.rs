//! The response for a limited request: the [`Rejector`] that builds it (tollgate's own
//! [`DefaultRejection`], your closure, or with the `axum` feature anything `IntoResponse`), and
//! the [`RateLimitBody`] that carries either it or the inner service's body.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::request::Parts;
use http::{HeaderValue, Response, StatusCode, header};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

use crate::decision::Decision;
use crate::headers::{ceil_secs, decimal_len, retry_after_value};

/// Builds the response to a denied request. The layer then adds `Retry-After` (unless the
/// response has one) and its rate-limit fields, unless told not to with
/// [`Builder::rejection_fields`](crate::Builder::rejection_fields), and puts the [`Decision`]
/// into the response's extensions.
///
/// Implemented by [`DefaultRejection`] (status, text or JSON body), by [`RejectWith`] for a
/// closure returning the inner service's response type, and with the `axum` feature by
/// [`RejectIntoResponse`] for a closure returning anything `IntoResponse`.
///
/// With the `tonic` feature, denied gRPC calls get tollgate's gRPC status instead (see
/// `tollgate::grpc`), unless the layer is built with `Builder::grpc(GrpcMode::Never)`.
pub trait Rejector<B>: Send + Sync + 'static {
    /// The response for `decision` (denied, or impossible: [`Decision::retry_after`] is `None`
    /// then) about the request with `parts`.
    fn reject(&self, decision: &Decision, parts: &Parts) -> Response<RateLimitBody<B>>;
}

/// tollgate's own rejection: a status (default 429), `Retry-After`, and a short text or JSON
/// body ([`RejectionBody`]). Configured with [`Builder::status`](crate::Builder::status) and
/// [`Builder::body`](crate::Builder::body).
#[derive(Debug, Clone)]
pub struct DefaultRejection {
    pub(crate) rejection: Rejection,
}

impl<B: 'static> Rejector<B> for DefaultRejection {
    fn reject(&self, decision: &Decision, _parts: &Parts) -> Response<RateLimitBody<B>> {
        let policy = decision.policy().unwrap_or("default");
        self.rejection.response(policy, decision.retry_after())
    }
}

/// A closure `Fn(&Decision, &Parts) -> http::Response<B>` that answers denied requests, with
/// `B` the inner service's body type. Made by [`Builder::reject_with`](crate::Builder::reject_with).
#[derive(Clone)]
pub struct RejectWith<F>(pub(crate) F);

impl<F> std::fmt::Debug for RejectWith<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RejectWith(..)")
    }
}

impl<F, B> Rejector<B> for RejectWith<F>
where
    F: Fn(&Decision, &Parts) -> Response<B> + Send + Sync + 'static,
{
    fn reject(&self, decision: &Decision, parts: &Parts) -> Response<RateLimitBody<B>> {
        (self.0)(decision, parts).map(RateLimitBody::inner)
    }
}

/// A closure returning anything axum can turn into a response, for axum routers (feature
/// `axum`). Made by [`Builder::reject_into_response`](crate::Builder::reject_into_response).
#[cfg(feature = "axum")]
#[derive(Clone)]
pub struct RejectIntoResponse<F>(pub(crate) F);

#[cfg(feature = "axum")]
impl<F> std::fmt::Debug for RejectIntoResponse<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RejectIntoResponse(..)")
    }
}

#[cfg(feature = "axum")]
impl<F, T> Rejector<axum::body::Body> for RejectIntoResponse<F>
where
    F: Fn(&Decision, &Parts) -> T + Send + Sync + 'static,
    T: axum::response::IntoResponse,
{
    fn reject(
        &self,
        decision: &Decision,
        parts: &Parts,
    ) -> Response<RateLimitBody<axum::body::Body>> {
        (self.0)(decision, parts)
            .into_response()
            .map(RateLimitBody::inner)
    }
}

/// What a limited request's body says.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum RejectionBody {
    /// `text/plain`: `Too Many Requests: policy "default", retry after 3 s` (the default).
    #[default]
    Text,
    /// `application/json`: `{"error":"rate_limited","policy":"default","retry_after":3}`
    /// (`retry_after` is `null` for a request that can never pass).
    Json,
    /// A fixed body with its content type.
    Custom {
        /// The `Content-Type` value.
        content_type: HeaderValue,
        /// The body bytes.
        body: Bytes,
    },
    /// No body.
    Empty,
}

/// How limited requests are answered.
#[derive(Debug, Clone)]
pub(crate) struct Rejection {
    pub(crate) status: StatusCode,
    pub(crate) body: RejectionBody,
}

impl Rejection {
    /// The response for a denied (`retry = Some`) or impossible (`None`) request.
    pub(crate) fn response<B>(
        &self,
        policy: &str,
        retry: Option<Duration>,
    ) -> Response<RateLimitBody<B>> {
        let (content_type, body) = match &self.body {
            RejectionBody::Text => {
                let secs = retry.map(|r| ceil_secs(r).max(1));
                let tail: &[u8] = match secs {
                    Some(_) => b"\", retry after ",
                    None => b"\", this request costs more than the policy ever admits at once\n",
                };
                let head = b"Too Many Requests: policy \"";
                let len = head.len()
                    + policy.len()
                    + tail.len()
                    + secs.map_or(0, |s| decimal_len(s) + b" s\n".len());
                // Exactly `len` bytes, so the body is made from them without another allocation.
                let mut text = Vec::with_capacity(len);
                text.extend_from_slice(head);
                text.extend_from_slice(policy.as_bytes());
                text.extend_from_slice(tail);
                if let Some(secs) = secs {
                    text.extend_from_slice(itoa::Buffer::new().format(secs).as_bytes());
                    text.extend_from_slice(b" s\n");
                }
                (
                    Some(HeaderValue::from_static("text/plain; charset=utf-8")),
                    Bytes::from(text),
                )
            }
            RejectionBody::Json => {
                let retry = match retry {
                    Some(r) => ceil_secs(r).max(1).to_string(),
                    None => "null".to_owned(),
                };
                let json = format!(
                    "{{\"error\":\"rate_limited\",\"policy\":\"{policy}\",\"retry_after\":{retry}}}"
                );
                (
                    Some(HeaderValue::from_static("application/json")),
                    Bytes::from(json.into_bytes().into_boxed_slice()),
                )
            }
            RejectionBody::Custom { content_type, body } => {
                (Some(content_type.clone()), body.clone())
            }
            RejectionBody::Empty => (None, Bytes::new()),
        };
        let mut res = Response::new(RateLimitBody::rejection(body));
        *res.status_mut() = self.status;
        if let Some(ct) = content_type {
            res.headers_mut().insert(header::CONTENT_TYPE, ct);
        }
        if let Some(r) = retry {
            res.headers_mut()
                .insert(header::RETRY_AFTER, retry_after_value(r));
        }
        res
    }
}

/// `500 Internal Server Error`: the key extractor could not identify the client, which is a
/// misconfiguration (the log says which).
pub(crate) fn misconfigured<B>() -> Response<RateLimitBody<B>> {
    let mut res = Response::new(RateLimitBody::rejection(Bytes::from_static(
        b"Internal Server Error: the rate limiter cannot identify the client (see the server log)\n",
    )));
    *res.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    res
}

/// `503 Service Unavailable` with `Retry-After: 1`: the store failed and the fail mode is closed.
pub(crate) fn store_unavailable<B>() -> Response<RateLimitBody<B>> {
    let mut res = Response::new(RateLimitBody::rejection(Bytes::from_static(
        b"Service Unavailable: the rate limiter cannot decide right now\n",
    )));
    *res.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    res.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    res
}

pin_project! {
    /// The response body of a rate-limited service: the inner service's body, or the short body
    /// of a rejection.
    pub struct RateLimitBody<B> {
        #[pin]
        kind: Kind<B>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<B> {
        Inner {
            #[pin]
            body: B,
        },
        Rejection {
            body: Option<Bytes>,
        },
    }
}

impl<B> RateLimitBody<B> {
    pub(crate) fn inner(body: B) -> Self {
        Self {
            kind: Kind::Inner { body },
        }
    }

    pub(crate) fn rejection(body: Bytes) -> Self {
        Self {
            kind: Kind::Rejection {
                body: (!body.is_empty()).then_some(body),
            },
        }
    }
}

impl<B> Body for RateLimitBody<B>
where
    B: Body<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match self.project().kind.project() {
            KindProj::Inner { body } => body.poll_frame(cx),
            KindProj::Rejection { body } => Poll::Ready(body.take().map(|b| Ok(Frame::data(b)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Inner { body } => body.is_end_stream(),
            Kind::Rejection { body } => body.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Inner { body } => body.size_hint(),
            Kind::Rejection { body } => {
                SizeHint::with_exact(body.as_ref().map_or(0, |b| b.len() as u64))
            }
        }
    }
}

impl<B> std::fmt::Debug for RateLimitBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.kind {
            Kind::Inner { .. } => f.write_str("RateLimitBody::Inner"),
            Kind::Rejection { .. } => f.write_str("RateLimitBody::Rejection"),
        }
    }
}

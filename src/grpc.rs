//! gRPC (feature `tonic`): the same limits on tonic services, answered the way gRPC clients
//! understand.
//!
//! A [`RateLimitLayer`](crate::RateLimitLayer) is a `tower` layer over `http::Request`, so it
//! goes in front of a tonic server as it goes in front of an axum router, and one layer (one
//! store, one policy) can guard both in one process: a client's HTTP and gRPC calls then share
//! one limit.
//!
//! ```no_run
//! use tollgate::{RateLimitLayer, key::{ApiKeyOrIp, ClientIp, Header}};
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let layer = RateLimitLayer::builder("100/m".parse()?)
//!     .key(ApiKeyOrIp::new(Header::new("x-api-key")?, ClientIp::new()))
//!     .build()?;
//! let (_reporter, health) = tonic_health::server::health_reporter();
//! tonic::transport::Server::builder()
//!     .layer(layer.clone()) // the same layer can also go on an axum Router
//!     .add_service(health)
//!     .serve("127.0.0.1:50051".parse()?)
//!     .await?;
//! # Ok(()) }
//! ```
//!
//! ## What a limited call gets
//! A denied gRPC call is answered without calling the service, as a *trailers-only* gRPC
//! response: HTTP status 200, `content-type: application/grpc`, `grpc-status: 8`
//! (`RESOURCE_EXHAUSTED`), a `grpc-message`, and `grpc-status-details-bin` carrying a
//! `google.rpc.Status` with two details:
//!
//! - `google.rpc.RetryInfo`: `retry_delay` is the wait until the same call would pass, rounded
//!   up to the millisecond and never 0 (a retry after exactly that delay is admitted). A call
//!   that can never pass (its cost exceeds the capacity) gets no `RetryInfo`, so clients do not
//!   retry it.
//! - `google.rpc.QuotaFailure`: one violation per exhausted quota of the policy, with subject
//!   `policy:<name>` and a description of the quota. The client's identity (its API key or
//!   address) never appears in it.
//!
//! The layer adds `Retry-After` and its rate-limit fields (`RateLimit`, `RateLimit-Policy`, or
//! the legacy ones, as [`Builder::headers`](crate::Builder::headers) says) to that response, and
//! to admitted calls' response headers, so gRPC clients read them from the response metadata.
//! With tonic, decode the details with `tonic_types::StatusExt`:
//!
//! ```
//! use tonic_types::StatusExt;
//!
//! # fn check(status: tonic::Status) {
//! if status.code() == tonic::Code::ResourceExhausted {
//!     let wait = status.get_details_retry_info().and_then(|r| r.retry_delay);
//!     let policy = status.get_details_quota_failure().map(|q| q.violations[0].subject.clone());
//!     # let _ = (wait, policy);
//! }
//! # }
//! ```
//!
//! The other answers the layer gives without the service are gRPC statuses too: a store that
//! fails under [`FailMode::Closed`](crate::FailMode::Closed) gives `UNAVAILABLE` (14) with a
//! `RetryInfo` of one second (HTTP: 503), and a key extractor that cannot identify the client
//! (a misconfiguration, see [`KeyError`](crate::KeyError)) gives `INTERNAL` (13) (HTTP: 500).
//!
//! ## Which calls are gRPC
//! By default ([`GrpcMode::Auto`]) a request is a gRPC call when its `content-type` starts with
//! `application/grpc` (`application/grpc`, `application/grpc+proto`, `application/grpc-web`…);
//! every other request through the same layer gets the layer's HTTP rejection (429). The header
//! is read only when the layer answers without the service, never on an admitted request.
//! [`Builder::grpc`](crate::Builder::grpc) forces it per layer: [`GrpcMode::Always`] answers
//! every request the gRPC way, [`GrpcMode::Never`] hands every denial to the layer's
//! [`Rejector`](crate::Rejector). Under `Auto` and `Always`, gRPC calls get the gRPC answer
//! whatever rejector the layer has (an HTTP body means nothing to a gRPC client); a rejector of
//! your own for gRPC calls goes with `Never`, and [`limited_status`] builds the same status.
//!
//! ## Keys
//! - The peer address: [`ClientIp`](crate::key::ClientIp) reads tonic's
//!   `tonic::transport::server::TcpConnectInfo`, which tonic puts in every request's extensions
//!   for TCP connections, with `serve` and with `serve_with_incoming` over a TCP listener.
//! - Metadata is HTTP headers: [`Header::new("x-api-key")`](crate::key::Header) keys by the
//!   `x-api-key` metadata entry, and [`ApiKeyOrIp`](crate::key::ApiKeyOrIp) by it else the peer.
//!
//! ## Per-method policies and costs
//! A gRPC call's path is `/package.Service/Method`. A layer that limits one method only skips
//! the others; a cost closure weights methods:
//!
//! ```
//! use tollgate::{RateLimitLayer, key::Header};
//!
//! // Every call: 600/m per API key, Search calls costing 5.
//! let all = RateLimitLayer::builder("600/m".parse()?)
//!     .policy("grpc")
//!     .key(Header::new("x-api-key")?)
//!     .cost(|req| match req.uri.path() {
//!         "/shop.v1.Catalog/Search" => 5,
//!         _ => 1,
//!     })
//!     .build()?;
//! // Checkout only: 10/m more.
//! let checkout = RateLimitLayer::builder("10/m".parse()?)
//!     .policy("checkout")
//!     .key(Header::new("x-api-key")?)
//!     .skip(|req| req.uri.path() != "/shop.v1.Orders/Checkout")
//!     .build()?;
//! // Server::builder().layer(all).layer(checkout).add_service(..)
//! # let _ = (all, checkout);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! ## Streaming calls
//! A call is charged once, when it starts (when its request headers arrive), whatever kind it
//! is: unary, server streaming, client streaming or bidirectional. The messages of a stream are
//! not counted, and a stream that has started is never cut off by the limit: limit how many
//! streams a client opens, and weight long-lived or heavy streaming methods with a cost closure
//! as above.

use std::time::Duration;

use bytes::Bytes;
use http::request::Parts;
use http::{HeaderMap, Response};
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, QuotaViolation, StatusExt};

use crate::decision::Decision;
use crate::response::RateLimitBody;

/// Which requests a layer answers the gRPC way when it answers without the service; set with
/// [`Builder::grpc`](crate::Builder::grpc). See [the module docs](self).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum GrpcMode {
    /// Requests whose `content-type` starts with `application/grpc` (the default).
    #[default]
    Auto,
    /// Every request: for a layer in front of a gRPC server only.
    Always,
    /// None: the layer's [`Rejector`](crate::Rejector) answers every denial, and the store and
    /// key failures are answered with HTTP 503 and 500.
    Never,
}

impl GrpcMode {
    /// Whether a request with `headers` is answered the gRPC way.
    pub(crate) fn applies(self, headers: &HeaderMap) -> bool {
        match self {
            GrpcMode::Auto => is_grpc_headers(headers),
            GrpcMode::Always => true,
            GrpcMode::Never => false,
        }
    }
}

/// Whether the request is a gRPC call: its `content-type` starts with `application/grpc`
/// (compared without regard to case).
///
/// ```
/// let call = http::Request::post("/grpc.health.v1.Health/Check")
///     .header("content-type", "application/grpc+proto")
///     .body(())?;
/// assert!(tollgate::grpc::is_grpc(&call.into_parts().0));
/// # Ok::<(), http::Error>(())
/// ```
pub fn is_grpc(parts: &Parts) -> bool {
    is_grpc_headers(&parts.headers)
}

fn is_grpc_headers(headers: &HeaderMap) -> bool {
    crate::headers::is_grpc_content(headers)
}

/// The status a denied gRPC call gets: `RESOURCE_EXHAUSTED`, with `google.rpc.RetryInfo` (the
/// wait, rounded up to the millisecond, never 0; none for a call that can never pass) and
/// `google.rpc.QuotaFailure` (subject `policy:<name>` for each exhausted quota). For a
/// [`Rejector`](crate::Rejector) of your own under [`GrpcMode::Never`].
///
/// ```
/// use std::time::Duration;
/// use tollgate::{MemoryStore, Policy, Quota, Store, Key};
/// use tonic_types::StatusExt;
///
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// let store = MemoryStore::new();
/// let policy = Policy::new("api", Quota::per_second(1)?)?;
/// let key = Key::from_static("client");
/// store.check(&policy, &key, 1).await?;
/// let denied = store.check(&policy, &key, 1).await?;
/// let status = tollgate::grpc::limited_status(&denied);
/// assert_eq!(status.code(), tonic::Code::ResourceExhausted);
/// let wait = status.get_details_retry_info().and_then(|r| r.retry_delay).unwrap();
/// assert!(wait > Duration::ZERO && wait <= Duration::from_secs(1));
/// # Ok(()) }
/// # tokio::runtime::Runtime::new().unwrap().block_on(run()).unwrap();
/// ```
pub fn limited_status(decision: &Decision) -> Status {
    let policy = decision.policy().unwrap_or("default");
    let subject = format!("policy:{policy}");
    let mut details = ErrorDetails::new();
    let violations: Vec<QuotaViolation> = decision
        .per_quota()
        .iter()
        .filter(|d| !d.is_allowed())
        .map(|d| violation(&subject, policy, d))
        .collect();
    if violations.is_empty() {
        details.set_quota_failure(vec![violation(&subject, policy, decision)]);
    } else {
        details.set_quota_failure(violations);
    }
    let message = match decision.retry_after() {
        Some(wait) => {
            let wait = retry_delay(wait);
            details.set_retry_info(Some(wait));
            format!(
                "rate limited: policy \"{policy}\", retry after {} ms",
                wait.as_millis()
            )
        }
        None => format!(
            "rate limited: policy \"{policy}\": this call costs more than the policy ever admits \
             at once"
        ),
    };
    Status::with_error_details(Code::ResourceExhausted, message, details)
}

/// The violation of one quota of policy `policy`.
fn violation(subject: &str, policy: &str, decision: &Decision) -> QuotaViolation {
    let mut violation = QuotaViolation::new(
        subject,
        format!(
            "quota {} of policy \"{policy}\" exhausted",
            decision.quota()
        ),
    );
    violation.quota_id = policy.to_owned();
    violation
}

/// The wait as `RetryInfo` says it: rounded up to the millisecond, at least 1 ms.
fn retry_delay(wait: Duration) -> Duration {
    let millis = wait.as_nanos().div_ceil(1_000_000).max(1);
    Duration::from_millis(u64::try_from(millis).unwrap_or(u64::MAX))
}

/// The trailers-only response carrying `status`.
fn respond<B>(status: Status) -> Response<RateLimitBody<B>> {
    let mut response = status.into_http::<()>();
    // tonic keeps the Status in the extensions; the headers carry all of it.
    response.extensions_mut().clear();
    response.map(|()| RateLimitBody::rejection(Bytes::new()))
}

/// The answer to a denied (or impossible) gRPC call.
pub(crate) fn limited<B>(decision: &Decision) -> Response<RateLimitBody<B>> {
    respond(limited_status(decision))
}

/// `UNAVAILABLE` with a `RetryInfo` of one second: the store failed and the fail mode is closed.
pub(crate) fn store_unavailable<B>() -> Response<RateLimitBody<B>> {
    respond(Status::with_error_details(
        Code::Unavailable,
        "the rate limiter cannot decide right now",
        ErrorDetails::with_retry_info(Some(Duration::from_secs(1))),
    ))
}

/// `INTERNAL`: the key extractor could not identify the client (the log says why).
pub(crate) fn misconfigured<B>() -> Response<RateLimitBody<B>> {
    respond(Status::internal(
        "the rate limiter cannot identify the client (see the server log)",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_delay_rounds_up_to_the_millisecond_and_is_never_zero() {
        assert_eq!(retry_delay(Duration::ZERO), Duration::from_millis(1));
        assert_eq!(
            retry_delay(Duration::from_nanos(1)),
            Duration::from_millis(1)
        );
        assert_eq!(
            retry_delay(Duration::from_micros(1_001)),
            Duration::from_millis(2)
        );
        assert_eq!(retry_delay(Duration::from_secs(3)), Duration::from_secs(3));
    }

    #[test]
    fn grpc_content_types_are_recognised_without_regard_to_case() {
        let mut headers = HeaderMap::new();
        assert!(!is_grpc_headers(&headers));
        for (ct, grpc) in [
            ("application/grpc", true),
            ("application/grpc+proto", true),
            ("Application/GRPC-web", true),
            ("application/json", false),
            ("application/grp", false),
            ("text/plain", false),
        ] {
            headers.insert(http::header::CONTENT_TYPE, ct.parse().unwrap());
            assert_eq!(is_grpc_headers(&headers), grpc, "{ct}");
        }
        assert!(GrpcMode::Always.applies(&HeaderMap::new()));
        assert!(!GrpcMode::Never.applies(&headers));
    }
}

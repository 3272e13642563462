//! Charging after the response: refunds decided from how a request ended, and reserved costs
//! reconciled with what the handler reports.
//!
//! A request is still charged when it arrives, so N concurrent attempts can never all pass
//! (admission bounds concurrency, as without refunds). Once the inner service has answered,
//! a layer built with a refund rule or with reconciliation settles that charge, **before the
//! response is handed on**, so the client's next request always sees it:
//!
//! - [`Builder::refund_when`](crate::Builder::refund_when) (and the presets
//!   [`skip_successful`](crate::Builder::skip_successful),
//!   [`skip_failed`](crate::Builder::skip_failed),
//!   [`skip_server_errors`](crate::Builder::skip_server_errors)) looks at the response's status
//!   and headers; when it says so, the request's whole charge is given back.
//! - [`Builder::reconcile`](crate::Builder::reconcile): the cost charged at admission
//!   ([`Builder::cost`](crate::Builder::cost)) is a reservation; the handler reports what the
//!   request really cost by putting an [`ActualCost`] into the response's extensions, and the
//!   layer charges the difference unconditionally (the client may go into debt: its next
//!   requests wait, or are denied with a `Retry-After` that counts the debt) or gives it back.
//!   A response without an `ActualCost` keeps the reservation.
//!
//! The layer settles through [`Store::adjust`](crate::Store::adjust), one atomic store call
//! (a compare-and-swap in memory, one Lua script on Redis); the response then carries the
//! settled state in its rate-limit fields, and a peek reports it.
//!
//! # Exactly once, and never more than was charged
//!
//! | what happens | what the client is charged |
//! |---|---|
//! | the request is denied (or dry-run denied, or admitted fail-open) | nothing was charged, nothing is settled: a denial is never refunded |
//! | the response says refund | its whole charge is given back, once |
//! | an inner layer rejected the request (its response is that layer's rejection: [`Decisions::is_rejection`](crate::Decisions::is_rejection)) | its whole charge is given back, once, by every layer, with or without a refund rule: the request never reached the service |
//! | the handler reports `ActualCost(n)` | `n` in all: the reservation plus or minus the difference, once |
//! | the handler panics, the inner service returns an error, the client disconnects or the response future is dropped before the inner service answered | the admission charge stands, as made (there is no response to judge, so nothing is given back) |
//! | the response future is dropped while the settlement is in flight | it completes anyway, exactly once: a settlement that does not finish at once (Redis) runs as a Tokio task of its own; the memory stores settle synchronously. (Outside a Tokio runtime it runs inside the response future, and dropping that future mid-way leaves it unknown whether it was applied.) |
//! | the store fails the settlement (an error, a timeout, an open [`CircuitBreaker`](crate::CircuitBreaker), a store without [`Store::adjust`](crate::Store::adjust)) | the charge stands as made; the failure is logged at most once a second (`tollgate::store`, with the key's fingerprint) and counted in [`Stats::settle_failures`](crate::Stats::settle_failures); it is **never retried**: a timed-out refund may have been applied, and a second one would give back what other requests were charged |
//! | the response comes after the whole charge has regenerated (slower than its `reset_after`) | nothing is given back: the charge no longer holds anything, and a refund would only cancel other requests' charges |
//!
//! A refund never leaves a client better off than a fresh one (the stored TAT never goes below
//! now). It gives back exactly the units this request was charged; when other requests of the
//! same client were charged while it ran, and part of its own charge has already regenerated,
//! the refund can shorten their wait by at most the time the request took (the store holds one
//! TAT, not a list of charges).
//!
//! Requests admitted by the fallback limiter ([`FailMode::Fallback`](crate::FailMode)) are
//! settled there, as they were charged there.

use std::time::{Duration, Instant};

use http::{HeaderMap, StatusCode};

use crate::key::Key;

/// What a request really cost, reported by the handler in the response's extensions, for a
/// layer built with [`Builder::reconcile`](crate::Builder::reconcile): the layer charged the
/// reserved (estimated) cost at admission and now charges or gives back the difference.
///
/// ```
/// use axum::{Router, response::IntoResponse, routing::get};
/// use tollgate::{ActualCost, RateLimitLayer};
///
/// async fn complete() -> impl IntoResponse {
///     let tokens_used = 42; // e.g. what the model reported
///     (axum::Extension(ActualCost(tokens_used)), "done")
/// }
///
/// let layer = RateLimitLayer::builder("1000/m".parse()?)
///     .policy("tokens")
///     .cost(|_| 100) // reserved at admission
///     .reconcile(true)
///     .build()?;
/// let app: Router = Router::new().route("/complete", get(complete)).layer(layer);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ActualCost(pub u32);

/// How a response ended, as the refund presets judge it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ended {
    Success,
    /// The client's side: a 4xx, or a gRPC status that is not a server error.
    ClientError,
    /// The server's side: a 5xx, or gRPC UNKNOWN, DEADLINE_EXCEEDED, INTERNAL, UNAVAILABLE or
    /// DATA_LOSS.
    ServerError,
}

/// How the response with `status` and `headers` ended. A gRPC response (`content-type:
/// application/grpc*`) is HTTP 200 however the call ended, so it is judged by its
/// `grpc-status` header, which a call that ends without a message (trailers-only: an error
/// status from tonic, or tollgate's own gRPC answers) carries there. A gRPC response without
/// one sends its status in the trailers, after the response is handed on: it counts as a
/// success, which is all that can be known then.
pub(crate) fn ended(status: StatusCode, headers: &HeaderMap) -> Ended {
    if status == StatusCode::OK && crate::headers::is_grpc_content(headers) {
        return match headers.get("grpc-status").map(|v| v.as_bytes()) {
            None | Some(b"0") => Ended::Success,
            Some(b"2" | b"4" | b"13" | b"14" | b"15") => Ended::ServerError,
            Some(_) => Ended::ClientError,
        };
    }
    if status.is_server_error() {
        Ended::ServerError
    } else if status.as_u16() >= 400 {
        Ended::ClientError
    } else {
        Ended::Success
    }
}

/// Whether a response's charge is given back, from its status and headers.
pub(crate) type RefundFn = dyn Fn(StatusCode, &HeaderMap) -> bool + Send + Sync;

/// One admitted request's charge, held until its response is known.
pub(crate) struct Charge {
    pub(crate) key: Key,
    pub(crate) tier: usize,
    /// The units charged at admission.
    pub(crate) cost: u32,
    /// Charged by the fallback limiter, not the store.
    pub(crate) fallback: bool,
    pub(crate) at: Instant,
    /// The decision's `reset_after`: after that, the charge has fully regenerated.
    pub(crate) reset_after: Duration,
}

/// The whole charge back (an inner layer rejected the request), unless it has already
/// regenerated: then it holds nothing, and giving it back would cancel other requests' charges.
pub(crate) fn give_back(charge: &Charge) -> Option<i64> {
    (charge.cost > 0 && charge.at.elapsed() < charge.reset_after).then(|| -i64::from(charge.cost))
}

/// What the response asks of a charge: the signed units to adjust by, if any.
pub(crate) fn delta(
    charge: &Charge,
    refund: Option<&RefundFn>,
    reconcile: bool,
    status: StatusCode,
    headers: &HeaderMap,
    actual: Option<&ActualCost>,
) -> Option<i64> {
    let charged = i64::from(charge.cost);
    let delta = if refund.is_some_and(|refund| refund(status, headers)) {
        -charged
    } else if reconcile {
        actual.map_or(0, |actual| i64::from(actual.0) - charged)
    } else {
        0
    };
    if delta < 0 && charge.at.elapsed() >= charge.reset_after {
        return None;
    }
    (delta != 0).then_some(delta)
}

#[cfg(test)]
mod ended_tests {
    use super::{Ended, ended};
    use http::{HeaderMap, HeaderValue, StatusCode};

    fn grpc(status: Option<&'static str>) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            "content-type",
            HeaderValue::from_static("application/grpc+proto"),
        );
        if let Some(s) = status {
            h.insert("grpc-status", HeaderValue::from_static(s));
        }
        h
    }

    #[test]
    fn http_statuses() {
        let h = HeaderMap::new();
        assert_eq!(ended(StatusCode::OK, &h), Ended::Success);
        assert_eq!(ended(StatusCode::FOUND, &h), Ended::Success);
        assert_eq!(ended(StatusCode::UNAUTHORIZED, &h), Ended::ClientError);
        assert_eq!(ended(StatusCode::TOO_MANY_REQUESTS, &h), Ended::ClientError);
        assert_eq!(
            ended(StatusCode::SERVICE_UNAVAILABLE, &h),
            Ended::ServerError
        );
    }

    #[test]
    fn grpc_calls_are_judged_by_grpc_status() {
        let ok = StatusCode::OK;
        assert_eq!(ended(ok, &grpc(None)), Ended::Success, "status in trailers");
        assert_eq!(ended(ok, &grpc(Some("0"))), Ended::Success);
        // UNAUTHENTICATED, PERMISSION_DENIED, RESOURCE_EXHAUSTED, INVALID_ARGUMENT.
        for code in ["16", "7", "8", "3"] {
            assert_eq!(ended(ok, &grpc(Some(code))), Ended::ClientError, "{code}");
        }
        // UNKNOWN, DEADLINE_EXCEEDED, INTERNAL, UNAVAILABLE, DATA_LOSS.
        for code in ["2", "4", "13", "14", "15"] {
            assert_eq!(ended(ok, &grpc(Some(code))), Ended::ServerError, "{code}");
        }
        // Not gRPC: the same header means nothing.
        let mut plain = HeaderMap::new();
        plain.insert("grpc-status", HeaderValue::from_static("16"));
        assert_eq!(ended(ok, &plain), Ended::Success);
        // A gRPC content type on an HTTP error is judged by the HTTP status.
        assert_eq!(
            ended(StatusCode::BAD_GATEWAY, &grpc(None)),
            Ended::ServerError
        );
    }
}

//! A fixed workload for counting instructions per request (`scripts/bench-instructions` runs
//! it under valgrind's callgrind): `N` requests through an axum hello-world router, driven by
//! `tower::ServiceExt::ready` and `Service::call` on one service, on one thread of a
//! current-thread tokio runtime, each response body read to the end, after a warm-up of 100
//! requests. Every request carries a `PeerAddr` extension, as in `benches/middleware_pairs.rs`.
//! It measures nothing itself: the script counts instructions only inside `measured` (the `N`
//! requests), and the count of a run of 2N requests minus that of N requests, divided by N, is
//! the cost of one request, with what is counted once per run cancelled out.
//!
//! Run: `instructions MODE N`, MODE one of
//! - `none`: no limiter;
//! - `allowed`: the default layer, one client far below its limit (fresh at every request);
//! - `no-fields`: the same with `headers_on_allowed(false)`;
//! - `busy`: the default layer, a client that is never fresh but never runs out;
//! - `denied`: the default layer, every request after the first answered 429;
//! - `boxed`: `allowed` through a `BoxStore` around a `MemoryStore`;
//! - `refund-kept`: `allowed` with a refund rule (`skip_failed`) that keeps every charge (the
//!   responses are 200): what a rule costs an admitted-and-kept request;
//! - `refunded`: `allowed` with `skip_successful`: every charge is given back after the
//!   response (one `MemoryStore::adjust_now` per request);
//! - `governor`, `governor-headers`, `governor-denied`: tower_governor 0.8 (the peer layer for
//!   axum) with the same quotas, plain, with `use_headers()`, and every request denied.
//!
//! Every request also carries axum's `ConnectInfo<SocketAddr>`, which tower_governor reads, so
//! that every mode builds the same request.
#![allow(missing_docs)] // a bench binary

use std::net::SocketAddr;

#[path = "support/peer.rs"]
mod peer;

use axum::{Router, body::Body, extract::ConnectInfo, routing::get};
use http_body_util::BodyExt;
use tollgate::key::{ClientIp, PeerAddr};
use tollgate::{BoxStore, MemoryStore, Quota, RateLimitLayer, TierCache, Tiers};
use tower::{Service, ServiceExt};

fn request() -> http::Request<Body> {
    let mut req = http::Request::builder()
        .uri("/")
        .header("host", "localhost")
        .body(Body::empty())
        .unwrap_or_default();
    let peer = SocketAddr::from(([127, 0, 0, 1], 40_000));
    req.extensions_mut().insert(PeerAddr(peer));
    req.extensions_mut().insert(ConnectInfo(peer));
    req
}

fn quota(text: &str) -> Quota {
    text.parse().unwrap_or_else(|e| panic!("{text}: {e}"))
}

fn app(mode: &str) -> Router {
    let hello = Router::new().route("/", get(|| async { "hello" }));
    // Fresh at every request (one emission interval is a microsecond, shorter than a request)
    // with a capacity no run exhausts: the quota of `benches/middleware_pairs.rs`.
    let allowed = quota("1000000/s;capacity=1000000000");
    // Never fresh (an interval of 1 ms, far longer than a request), never out of capacity.
    let busy = quota("1000/s;capacity=1000000000");
    match mode {
        "none" => hello,
        "allowed" => hello.layer(RateLimitLayer::new(allowed, ClientIp::new())),
        "no-fields" => hello.layer(
            RateLimitLayer::builder(allowed)
                .key(ClientIp::new())
                .headers_on_allowed(false)
                .build()
                .unwrap_or_else(|e| panic!("{e}")),
        ),
        "busy" => hello.layer(RateLimitLayer::new(busy, ClientIp::new())),
        "denied" => hello.layer(RateLimitLayer::new(quota("1/h"), ClientIp::new())),
        "boxed" => hello.layer(
            RateLimitLayer::builder(allowed)
                .key(ClientIp::new())
                .store(BoxStore::new(MemoryStore::new()))
                .build()
                .unwrap_or_else(|e| panic!("{e}")),
        ),
        // A refund rule that keeps every charge (every response is a 200).
        "refund-kept" => hello.layer(
            RateLimitLayer::builder(allowed)
                .key(ClientIp::new())
                .skip_failed()
                .build()
                .unwrap_or_else(|e| panic!("{e}")),
        ),
        // A refund rule that gives every charge back.
        "refunded" => hello.layer(
            RateLimitLayer::builder(allowed)
                .key(ClientIp::new())
                .skip_successful()
                .build()
                .unwrap_or_else(|e| panic!("{e}")),
        ),
        // The default layer without recording its decision on the response.
        "no-response-decisions" => hello.layer(
            RateLimitLayer::builder(allowed)
                .key(ClientIp::new())
                .response_decisions(false)
                .build()
                .unwrap_or_else(|e| panic!("{e}")),
        ),
        // Two tiers, the request's picked by a selector that reads a header it lacks (so the
        // default tier), the tier's own quota equal to `allowed`.
        "tiered" => {
            let tiers: Tiers = format!("free={allowed},pro={busy}")
                .parse()
                .unwrap_or_else(|e| panic!("{e}"));
            let pro = tiers.get("pro").unwrap_or_else(|| panic!("pro"));
            hello.layer(
                RateLimitLayer::builder(allowed)
                    .key(ClientIp::new())
                    .tiers(tiers)
                    .select_tier(move |req, _key| req.headers.get("x-plan").map(|_| pro))
                    .build()
                    .unwrap_or_else(|e| panic!("{e}")),
            )
        }
        // Two tiers found by an asynchronous resolver: after the warm-up, every request is a
        // cache hit.
        "resolved" => hello.layer(
            RateLimitLayer::builder(allowed)
                .key(ClientIp::new())
                .tiers(
                    format!("free={allowed},pro={busy}")
                        .parse::<Tiers>()
                        .unwrap_or_else(|e| panic!("{e}")),
                )
                .resolve_tier(
                    |_key| async { Ok::<_, std::io::Error>(Some("free".to_owned())) },
                    TierCache::default().ttl(std::time::Duration::from_secs(3600)),
                )
                .build()
                .unwrap_or_else(|e| panic!("{e}")),
        ),
        "governor" => peer::governor(hello, peer::Governor::Plain),
        "governor-headers" => peer::governor(hello, peer::Governor::Headers),
        "governor-denied" => peer::governor(hello, peer::Governor::Denied),
        // The default layer reporting into a Prometheus recorder (feature `metrics`).
        #[cfg(feature = "metrics")]
        "prometheus" => {
            let _handle = metrics_exporter_prometheus::PrometheusBuilder::new()
                .install_recorder()
                .unwrap_or_else(|e| panic!("{e}"));
            hello.layer(RateLimitLayer::new(allowed, ClientIp::new()))
        }
        other => {
            eprintln!(
                "unknown mode {other:?}: none, allowed, no-fields, busy, denied, boxed, \
                 no-response-decisions, tiered, resolved, governor, governor-headers, \
                 governor-denied, refund-kept, refunded"
            );
            std::process::exit(2)
        }
    }
}

fn main() {
    // `cargo bench` passes `--bench`: skip flags, take MODE and N from the rest.
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let mode = args.first().map_or("allowed", String::as_str);
    let n: usize = args
        .get(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1_000)
        .clamp(1, 10_000_000);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap_or_else(|e| panic!("runtime: {e}"));
    let mut svc = app(mode);
    // Warm up outside the counted part: lazy statics, the first (admitted) request of `denied`,
    // the store's first entry, allocator pools.
    let mut statuses = [0usize; 2]; // [2xx, other]
    rt.block_on(run(&mut svc, WARM_UP, &mut statuses));
    let mut counted = [0usize; 2];
    measured(&rt, &mut svc, n, &mut counted);
    println!(
        "{mode} {n}: {} 2xx, {} other (after {WARM_UP} warm-up requests: {} 2xx, {} other)",
        counted[0], counted[1], statuses[0], statuses[1]
    );
}

/// Requests sent before the counted ones.
const WARM_UP: usize = 100;

/// The counted part: `scripts/bench-instructions` collects only inside this function
/// (`--toggle-collect`), so that set-up whose cost depends on time (the TSC clock's
/// calibration) stays out of the count.
#[inline(never)]
fn measured(rt: &tokio::runtime::Runtime, svc: &mut Router, n: usize, statuses: &mut [usize; 2]) {
    rt.block_on(run(svc, n, statuses));
}

async fn run(svc: &mut Router, n: usize, statuses: &mut [usize; 2]) {
    for _ in 0..n {
        let ready = match ServiceExt::<http::Request<Body>>::ready(&mut *svc).await {
            Ok(ready) => ready,
            Err(never) => match never {},
        };
        let res = match ready.call(request()).await {
            Ok(res) => res,
            Err(never) => match never {},
        };
        statuses[usize::from(!res.status().is_success())] += 1;
        let (parts, body) = res.into_parts();
        std::hint::black_box(&parts.headers);
        let _ = std::hint::black_box(body.collect().await);
    }
}

//! The layer's cost per request inside one process, as paired figures: an axum hello-world
//! router called through `tower::ServiceExt::oneshot` (response body read to the end) with no
//! limiter, with two reference layers that decide nothing (`benches/support/reference.rs`), and
//! with tollgate admitting (with and without rate-limit fields, and for a client that is never
//! fresh) and denying, and with the peer, tower_governor 0.8, plain, with headers and denying
//! (`benches/support/peer.rs`). Every round runs each server for `REQUESTS` requests, starting one server
//! later than the round before; the report gives, per server, the median time per request and
//! the median of its per-round difference from the no-limiter run of the same round, with the
//! range. On a shared machine whose speed drifts this is steadier than criterion estimates
//! measured one after another.
//!
//! Run: `scripts/bench-middleware [ROUNDS] [REQUESTS]` (defaults 31 and 20000).
#![allow(missing_docs)] // a bench binary

use std::net::SocketAddr;
use std::time::Instant;

use axum::{Router, body::Body, routing::get};
use http_body_util::BodyExt;
use tollgate::key::{ClientIp, PeerAddr};
use tollgate::{Quota, RateLimitLayer};
use tower::ServiceExt;

#[path = "support/peer.rs"]
mod peer;
#[path = "support/reference.rs"]
mod reference;

fn request() -> http::Request<Body> {
    let mut req = http::Request::builder()
        .uri("/")
        .header("host", "localhost")
        .body(Body::empty())
        .unwrap_or_default();
    let peer = SocketAddr::from(([127, 0, 0, 1], 40_000));
    req.extensions_mut().insert(PeerAddr(peer));
    // What tower_governor reads.
    req.extensions_mut()
        .insert(axum::extract::ConnectInfo(peer));
    req
}

fn quota(text: &str) -> Quota {
    text.parse().unwrap_or_else(|e| panic!("{text}: {e}"))
}

fn servers() -> Vec<(&'static str, Router)> {
    let hello = || Router::new().route("/", get(|| async { "hello" }));
    // Admits everything: a client that is fresh at every request, or (busy) one that draws on
    // a capacity no run exhausts, so that every RateLimit value differs.
    let allowed = quota("1000000/s;capacity=1000000000");
    let busy = quota("1000/s;capacity=1000000000");
    let without_fields = RateLimitLayer::builder(allowed)
        .key(ClientIp::new())
        .headers_on_allowed(false)
        .build()
        .unwrap_or_else(|e| panic!("{e}"));
    vec![
        ("no limiter", hello()),
        (
            "reference: passthrough",
            hello().layer(reference::passthrough()),
        ),
        ("reference: floor", hello().layer(reference::floor())),
        ("allowed, no fields", hello().layer(without_fields)),
        (
            "allowed",
            hello().layer(RateLimitLayer::new(allowed, ClientIp::new())),
        ),
        (
            "allowed, busy client",
            hello().layer(RateLimitLayer::new(busy, ClientIp::new())),
        ),
        (
            "denied (429)",
            hello().layer(RateLimitLayer::new(quota("1/d"), ClientIp::new())),
        ),
        (
            "tower_governor",
            peer::governor(hello(), peer::Governor::Plain),
        ),
        (
            "tower_governor, headers",
            peer::governor(hello(), peer::Governor::Headers),
        ),
        (
            "tower_governor, denied",
            peer::governor(hello(), peer::Governor::Denied),
        ),
    ]
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn main() {
    // `cargo bench` passes `--bench`; the numbers are the first two other arguments.
    let numbers: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let rounds = numbers.first().copied().unwrap_or(31).clamp(1, 1_000);
    let requests = numbers
        .get(1)
        .copied()
        .unwrap_or(20_000)
        .clamp(100, 10_000_000);
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap_or_else(|e| panic!("runtime: {e}"));
    let servers = servers();
    let mut times: Vec<Vec<f64>> = vec![Vec::with_capacity(rounds); servers.len()];
    for round in 0..rounds {
        for k in 0..servers.len() {
            let i = (k + round) % servers.len();
            let app = servers[i].1.clone();
            let start = Instant::now();
            rt.block_on(async {
                for _ in 0..requests {
                    let res = match app.clone().oneshot(request()).await {
                        Ok(res) => res,
                        Err(never) => match never {},
                    };
                    let (parts, body) = res.into_parts();
                    std::hint::black_box(&parts.headers);
                    let _ = std::hint::black_box(body.collect().await);
                }
            });
            times[i].push(start.elapsed().as_nanos() as f64 / requests as f64);
        }
    }
    println!(
        "{rounds} rounds of {requests} requests per server, in process, one thread; \
         paired with the no-limiter run of the same round"
    );
    println!(
        "{:<24} {:>12}  over no limiter, ns (range)",
        "server", "ns/request"
    );
    for (i, (name, _)) in servers.iter().enumerate() {
        let deltas: Vec<f64> = (0..rounds).map(|r| times[i][r] - times[0][r]).collect();
        let (lo, hi) = deltas
            .iter()
            .fold((f64::MAX, f64::MIN), |(lo, hi), d| (lo.min(*d), hi.max(*d)));
        println!(
            "{:<24} {:>12.1}  {:+.1} ({:+.1} to {:+.1})",
            name,
            median(times[i].clone()),
            median(deltas),
            lo,
            hi
        );
    }
}

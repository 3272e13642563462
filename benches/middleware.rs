//! The layer's cost per request inside one process (no sockets): an axum hello-world router
//! called through `tower::ServiceExt::oneshot`, with no limiter, with a MemoryStore layer that
//! admits everything (with and without rate-limit fields on its responses), and with one that
//! denies everything, in one criterion group; then the same with two threads calling at once.
//! Beside them, two reference layers that decide nothing (`benches/support/reference.rs`):
//! `passthrough` only wraps the response body, `floor` also adds a request extension and two
//! fixed fields, the least any layer pays to give what tollgate's admitted responses carry.
//!
//! Run: `cargo bench --bench middleware`. For the same over real HTTP see `scripts/bench-http`.
#![allow(missing_docs)] // criterion_group! and the harness generate undocumented items

use std::net::SocketAddr;

use axum::{Router, body::Body, routing::get};
use criterion::{Criterion, criterion_group, criterion_main};
use tollgate::key::{ClientIp, PeerAddr};
use tollgate::{Quota, RateLimitLayer};
use tower::ServiceExt;

#[path = "support/reference.rs"]
mod reference;

fn request() -> http::Request<Body> {
    request_from(7)
}

/// A request from client `203.0.113.<client>`.
fn request_from(client: u8) -> http::Request<Body> {
    let mut req = http::Request::builder()
        .uri("/")
        .body(Body::empty())
        .unwrap_or_default();
    req.extensions_mut()
        .insert(PeerAddr(SocketAddr::from(([203, 0, 113, client], 40_000))));
    req
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap_or_else(|e| panic!("runtime: {e}"));
    let hello = || Router::new().route("/", get(|| async { "hello" }));
    let allowed: Quota = "1000000/s;capacity=1000000000"
        .parse()
        .unwrap_or_else(|e| panic!("{e}"));
    let denied: Quota = "1/d".parse().unwrap_or_else(|e| panic!("{e}"));
    let apps = [
        ("no limiter", hello()),
        (
            "allowed",
            hello().layer(RateLimitLayer::new(allowed, ClientIp::new())),
        ),
        (
            "denied (429)",
            hello().layer(RateLimitLayer::new(denied, ClientIp::new())),
        ),
    ];
    let without_fields = RateLimitLayer::builder(allowed)
        .key(ClientIp::new())
        .headers_on_allowed(false)
        .build()
        .unwrap_or_else(|e| panic!("{e}"));
    let references = [
        (
            "reference: passthrough",
            hello().layer(reference::passthrough()),
        ),
        ("reference: floor", hello().layer(reference::floor())),
        ("allowed, no fields", hello().layer(without_fields)),
    ];
    let mut group = c.benchmark_group("axum hello world, in process");
    for (name, app) in apps.iter().chain(&references).cloned() {
        group.bench_function(name, |b| {
            b.iter(|| {
                let app = app.clone();
                rt.block_on(async move {
                    let res = app.oneshot(request()).await;
                    std::hint::black_box(res.map(|r| r.status()))
                })
            })
        });
    }
    group.finish();

    // The same on two threads at once, each with its own runtime (as the workers of a server)
    // and its own client: what the layer's shared state costs when cores contend for it.
    let mut group = c.benchmark_group("axum hello world, in process, 2 threads");
    for (name, app) in apps {
        group.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let start = std::time::Instant::now();
                std::thread::scope(|s| {
                    for client in 1..=2 {
                        let app = app.clone();
                        s.spawn(move || {
                            let rt = tokio::runtime::Builder::new_current_thread()
                                .build()
                                .unwrap_or_else(|e| panic!("runtime: {e}"));
                            rt.block_on(async move {
                                for _ in 0..iters / 2 {
                                    let res = app.clone().oneshot(request_from(client)).await;
                                    let _ = std::hint::black_box(res.map(|r| r.status()));
                                }
                            })
                        });
                    }
                });
                start.elapsed()
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);

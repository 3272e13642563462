//! A hello-world axum server for measuring the middleware's overhead (used by
//! `scripts/bench-http`): `--mode none` has no limiter, `allowed` a MemoryStore layer that
//! admits everything, `allowed-no-headers` the same without rate-limit fields on allowed
//! responses (`headers_on_allowed(false)`, to show what the fields cost), `allowed-busy` one
//! that admits everything from a client that is never fresh (each request draws on a huge
//! capacity, so every `RateLimit` value differs and is built), `denied` one that
//! answers 429 to everything, and with the `redis` feature `redis-allowed` the same through a
//! RedisStore (`--redis-url`).
//!
//! Two reference layers that are not rate limiters show what any such middleware costs under
//! axum, whatever it decides: `passthrough` wraps the response body in its own type (as every
//! layer that can answer by itself must), and `floor` also puts a value into the request
//! extensions and two fixed header fields on the response: the least work that yields what
//! tollgate's allowed responses carry.
//!
//! The peer, tower_governor 0.8 (`benches/support/peer.rs`), with the same quotas: `governor`
//! (plain), `governor-headers` (`use_headers()`) and `governor-denied`.
//!
//! ```text
//! cargo run --release --example bench_server -- --mode allowed --listen 127.0.0.1:3001
//! ```

use std::net::SocketAddr;

use axum::{Router, routing::get};
use tollgate::key::ClientIp;
use tollgate::{Quota, RateLimitLayer};

#[path = "../benches/support/peer.rs"]
mod peer;
#[path = "../benches/support/reference.rs"]
mod reference;

fn main() {
    let mut mode = "none".to_owned();
    let mut listen: SocketAddr = "127.0.0.1:3001".parse().unwrap_or_else(|_| unreachable!());
    let mut redis_url = "redis://127.0.0.1:6379".to_owned();
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args.next().unwrap_or_default();
        match flag.as_str() {
            "--mode" => mode = value,
            "--listen" => match value.parse() {
                Ok(addr) => listen = addr,
                Err(e) => fail(&format!("--listen {value:?}: {e}")),
            },
            "--redis-url" => redis_url = value,
            other => fail(&format!("unknown flag {other:?}")),
        }
    }
    #[cfg(not(feature = "redis"))]
    drop(redis_url);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap_or_else(|e| fail(&format!("runtime: {e}")));
    runtime.block_on(async move {
        let hello = Router::new().route("/", get(|| async { "hello" }));
        // Allowed: a quota no benchmark exhausts. Denied: one request per day, already used.
        let allowed: Quota = "1000000/s;capacity=1000000000"
            .parse()
            .unwrap_or_else(|e| fail(&format!("{e}")));
        let denied: Quota = "1/d".parse().unwrap_or_else(|e| fail(&format!("{e}")));
        // Busy: refills far slower than any benchmark sends, from a capacity none exhausts.
        let busy: Quota = "1000/s;capacity=1000000000"
            .parse()
            .unwrap_or_else(|e| fail(&format!("{e}")));
        let app = match mode.as_str() {
            "none" => hello,
            "allowed" => hello.layer(RateLimitLayer::new(allowed, ClientIp::new())),
            "allowed-no-headers" => hello.layer(
                RateLimitLayer::builder(allowed)
                    .key(ClientIp::new())
                    .headers_on_allowed(false)
                    .build()
                    .unwrap_or_else(|e| fail(&format!("{e}"))),
            ),
            "allowed-busy" => hello.layer(RateLimitLayer::new(busy, ClientIp::new())),
            "denied" => hello.layer(RateLimitLayer::new(denied, ClientIp::new())),
            "passthrough" => hello.layer(reference::passthrough()),
            "floor" => hello.layer(reference::floor()),
            "governor" => peer::governor(hello, peer::Governor::Plain),
            "governor-headers" => peer::governor(hello, peer::Governor::Headers),
            "governor-denied" => peer::governor(hello, peer::Governor::Denied),
            #[cfg(feature = "redis")]
            "redis-allowed" => {
                let store = tollgate::store::redis::RedisStore::builder(&redis_url)
                    .build()
                    .await
                    .unwrap_or_else(|e| fail(&format!("{e}")));
                let layer = RateLimitLayer::builder(allowed)
                    .store(store)
                    .build()
                    .unwrap_or_else(|e| fail(&format!("{e}")));
                hello.layer(layer)
            }
            other => fail(&format!("unknown mode {other:?}")),
        };
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .unwrap_or_else(|e| fail(&format!("bind {listen}: {e}")));
        println!("bench_server {mode} on http://{listen}");
        let _ = axum::serve(
            listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .await;
    });
}

fn fail(msg: &str) -> ! {
    eprintln!("error: {msg}");
    std::process::exit(2)
}

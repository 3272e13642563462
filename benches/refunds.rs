//! What a refund costs on Redis (`scripts/bench-refunds`): the latency of one admitted request
//! through a layer on a `RedisStore`, with a refund rule that gives its charge back
//! (`skip_successful`: one more script call, made before the response is handed on) and without
//! one, in interleaved rounds against one throwaway redis-server on a free loopback port, plus
//! the Redis calls per request from `INFO commandstats`. Each request uses its own key, so none
//! is ever denied. Bounded: ROUNDS x 2 x N requests (defaults 5 and 2,000), loopback only.
//!
//! Run: `cargo bench --features redis --bench refunds -- [ROUNDS] [N]`.
#![allow(missing_docs)] // a bench binary

#[path = "../tests/common/redis.rs"]
#[allow(dead_code, unreachable_pub)]
mod redis_server;

use std::time::{Duration, Instant};

use axum::{Router, body::Body, routing::get};
use redis_server::RedisServer;
use tollgate::key::Header;
use tollgate::store::redis::RedisStore;
use tollgate::{FailMode, RateLimitLayer};
use tower::{Service, ServiceExt};

fn app(store: RedisStore, refund: bool, policy: &str) -> Router {
    let builder = RateLimitLayer::builder("1000/m".parse().unwrap_or_else(|e| panic!("{e}")))
        .policy(policy)
        .key(Header::new("x-user").unwrap_or_else(|e| panic!("{e}")))
        .store(store)
        .fail_mode(FailMode::Closed);
    let builder = if refund {
        builder.skip_successful()
    } else {
        builder
    };
    Router::new()
        .route("/", get(|| async { "hello" }))
        .layer(builder.build().unwrap_or_else(|e| panic!("{e}")))
}

/// Latencies in µs of `n` sequential requests through `app`, each from a client of its own.
async fn run(app: &mut Router, n: usize, round: usize, tag: &str) -> Vec<f64> {
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let req = http::Request::builder()
            .uri("/")
            .header("x-user", format!("{tag}-{round}-{i}"))
            .body(Body::empty())
            .unwrap_or_else(|e| panic!("{e}"));
        let start = Instant::now();
        let ready = match ServiceExt::<http::Request<Body>>::ready(&mut *app).await {
            Ok(ready) => ready,
            Err(never) => match never {},
        };
        let res = match ready.call(req).await {
            Ok(res) => res,
            Err(never) => match never {},
        };
        out.push(start.elapsed().as_secs_f64() * 1e6);
        assert_eq!(
            res.status(),
            200,
            "a request was not admitted: is Redis too slow?"
        );
    }
    out
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i.min(v.len() - 1)]
}

fn calls(server: &RedisServer, cmd: &str) -> u64 {
    let stats = server.cli(&["INFO", "commandstats"]);
    stats
        .lines()
        .find(|l| l.starts_with(&format!("cmdstat_{cmd}:")))
        .and_then(|l| l.split("calls=").nth(1))
        .and_then(|v| v.split(',').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .filter_map(|a| a.parse().ok())
        .collect();
    let rounds = args.first().copied().unwrap_or(5).clamp(1, 50);
    let n = args.get(1).copied().unwrap_or(2_000).clamp(10, 100_000);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap_or_else(|e| panic!("runtime: {e}"));
    let server = RedisServer::start();
    rt.block_on(async {
        let store = RedisStore::builder(&server.url())
            .command_timeout(Duration::from_secs(1))
            .build()
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let mut plain = app(store.clone(), false, "plain");
        let mut refunded = app(store, true, "refunded");
        // Warm up: connections, the scripts loaded.
        run(&mut plain, 100, 0, "warm-p").await;
        run(&mut refunded, 100, 0, "warm-r").await;
        println!("{n} admitted requests per mode per round, one client each, sequential");
        println!("round  p50 no rule  p50 refunded  ratio   p99 no rule  p99 refunded  evalsha/req");
        let mut ratios = Vec::new();
        for round in 1..=rounds {
            let before = calls(&server, "evalsha");
            let mut a = run(&mut plain, n, round, "p").await;
            let mid = calls(&server, "evalsha");
            let mut b = run(&mut refunded, n, round, "r").await;
            let after = calls(&server, "evalsha");
            let (pa, pb) = (percentile(&mut a, 0.5), percentile(&mut b, 0.5));
            let (qa, qb) = (percentile(&mut a, 0.99), percentile(&mut b, 0.99));
            ratios.push(pb / pa);
            println!(
                "{round:>5}  {pa:>9.1} us  {pb:>10.1} us  {:>5.2}x  {qa:>9.1} us  {qb:>10.1} us  {:.2} / {:.2}",
                pb / pa,
                (mid - before) as f64 / n as f64,
                (after - mid) as f64 / n as f64,
            );
        }
        ratios.sort_by(f64::total_cmp);
        println!(
            "p50 refunded / p50 without a rule: {:.2}x to {:.2}x over {rounds} rounds",
            ratios[0],
            ratios[ratios.len() - 1]
        );
    });
}

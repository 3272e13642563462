//! The middleware on a RedisStore over real HTTP (axum::serve on 127.0.0.1:0, reqwest): app
//! instances sharing one limit through one Redis, and the fail modes with Redis killed.
#![cfg(feature = "redis")]

mod common;

use common::http::serve;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use axum::Router;
use axum::routing::get;
use common::redis::RedisServer;
use http::StatusCode;
use tollgate::key::Global;
use tollgate::store::redis::RedisStore;
use tollgate::{FailMode, Quota, RateLimitLayer};

/// One "app server": its own RedisStore and layer, on its own port.
async fn app_instance(redis_url: &str, quota: &str, fail_mode: FailMode) -> SocketAddr {
    let store = RedisStore::builder(redis_url)
        .command_timeout(Duration::from_millis(200))
        .build()
        .await
        .unwrap();
    let layer = RateLimitLayer::builder(quota.parse::<Quota>().unwrap())
        .key(Global)
        .store(store)
        .fail_mode(fail_mode)
        .build()
        .unwrap();
    serve(
        Router::new()
            .route("/", get(|| async { "hello" }))
            .layer(layer),
    )
    .await
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

async fn status(c: &reqwest::Client, addr: SocketAddr) -> reqwest::Response {
    c.get(format!("http://{addr}/")).send().await.unwrap()
}

/// Three app instances behind one Redis admit exactly the capacity over a burst.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_app_instances_share_one_burst() {
    let server = RedisServer::start();
    let mut apps = Vec::new();
    for _ in 0..3 {
        apps.push(app_instance(&server.url(), "5/5h", FailMode::Closed).await);
    }
    let c = client();
    let mut ok = 0;
    let mut limited = 0;
    for i in 0..30 {
        let res = status(&c, apps[i % 3]).await;
        match res.status() {
            StatusCode::OK => ok += 1,
            StatusCode::TOO_MANY_REQUESTS => {
                limited += 1;
                assert!(res.headers().contains_key("retry-after"));
            }
            other => panic!("unexpected status {other}"),
        }
    }
    assert_eq!((ok, limited), (5, 25));
}

/// Over a timed run alternating between two instances, admissions never exceed
/// capacity + rate × elapsed, and the limit is not merely denying everything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_app_instances_stay_within_capacity_plus_rate() {
    let server = RedisServer::start();
    let a = app_instance(&server.url(), "20/s;capacity=5", FailMode::Closed).await;
    let b = app_instance(&server.url(), "20/s;capacity=5", FailMode::Closed).await;
    let c = client();
    let start = Instant::now();
    let mut ok = 0u64;
    let mut sent = 0u64;
    while start.elapsed() < Duration::from_millis(800) && sent < 5_000 {
        let addr = if sent.is_multiple_of(2) { a } else { b };
        let res = status(&c, addr).await;
        assert!(
            res.status() == StatusCode::OK || res.status() == StatusCode::TOO_MANY_REQUESTS,
            "{}",
            res.status()
        );
        if res.status() == StatusCode::OK {
            ok += 1;
        }
        sent += 1;
    }
    let elapsed = start.elapsed();
    // T = 50 ms: the bound is B + elapsed / T, counted on the client's (longer) interval.
    let bound = 5 + elapsed.as_millis() as u64 / 50;
    assert!(
        ok <= bound,
        "admitted {ok} > bound {bound} over {elapsed:?}"
    );
    assert!(sent > ok, "the limit never denied ({sent} sent)");
    assert!(
        ok >= 5 + (elapsed.as_millis() as u64 / 50) / 2,
        "admitted only {ok} over {elapsed:?}"
    );
}

/// Redis killed: FailMode::Open answers 200 quickly; Closed answers 503 with Retry-After: 1;
/// Fallback enforces the quota locally.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_modes_with_redis_killed() {
    let mut server = RedisServer::start();
    let open = app_instance(&server.url(), "3/h", FailMode::Open).await;
    let closed = app_instance(&server.url(), "3/h", FailMode::Closed).await;
    let fallback = app_instance(&server.url(), "3/h", FailMode::Fallback { divisor: 1 }).await;
    let c = client();
    // Healthy: one shared bucket of 3 (same policy name "default", same Global key).
    let mut healthy = Vec::new();
    for addr in [open, closed, fallback, open] {
        healthy.push(status(&c, addr).await.status());
    }
    assert_eq!(
        healthy,
        [
            StatusCode::OK,
            StatusCode::OK,
            StatusCode::OK,
            StatusCode::TOO_MANY_REQUESTS
        ]
    );
    server.kill();

    for _ in 0..10 {
        let start = Instant::now();
        let res = status(&c, open).await;
        assert_eq!(res.status(), StatusCode::OK);
        assert!(
            start.elapsed() < Duration::from_millis(200 + 150),
            "{:?}",
            start.elapsed()
        );
    }
    for _ in 0..5 {
        let res = status(&c, closed).await;
        assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(res.headers()["retry-after"], "1");
    }
    let mut local = Vec::new();
    for _ in 0..6 {
        local.push(status(&c, fallback).await.status());
    }
    assert_eq!(
        local.iter().filter(|s| **s == StatusCode::OK).count(),
        3,
        "{local:?}"
    );
    assert_eq!(
        local
            .iter()
            .filter(|s| **s == StatusCode::TOO_MANY_REQUESTS)
            .count(),
        3,
        "{local:?}"
    );

    // Redis back: limiting resumes (state was lost with the process, so a fresh bucket).
    server.restart();
    let restarted = Instant::now();
    loop {
        let res = status(&c, closed).await;
        if res.status() == StatusCode::OK {
            break;
        }
        assert!(
            restarted.elapsed() < Duration::from_secs(1),
            "no recovery within 1 s"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// On Redis too, an inner route layer's rejection gives the outer layer's charge back, in one
/// more script call made before the 429 is handed on, so the client's next request sees it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_inner_layers_rejection_gives_the_outer_charge_back_on_redis() {
    let server = RedisServer::start();
    let store = RedisStore::builder(&server.url())
        .command_timeout(Duration::from_secs(5))
        .build()
        .await
        .unwrap();
    let global = RateLimitLayer::builder("100/h".parse::<Quota>().unwrap())
        .key(Global)
        .store(store.clone())
        .fail_mode(FailMode::Closed)
        .build()
        .unwrap();
    let route = RateLimitLayer::builder("1/h".parse::<Quota>().unwrap())
        .policy("expensive")
        .key(Global)
        .store(store.clone())
        .fail_mode(FailMode::Closed)
        .build()
        .unwrap();
    let addr = serve(
        Router::new()
            .route("/expensive", get(|| async { "costly" }).route_layer(route))
            .layer(global.clone()),
    )
    .await;
    let c = client();
    let url = format!("http://{addr}/expensive");
    assert_eq!(c.get(&url).send().await.unwrap().status(), StatusCode::OK);
    for _ in 0..5 {
        let res = c.get(&url).send().await.unwrap();
        assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
        let fields = res.headers()["ratelimit"].to_str().unwrap().to_owned();
        assert!(fields.starts_with("\"default\";r=99;"), "{fields}");
    }
    let state = store
        .inspect(global.policy(), &tollgate::Key::from_static("global"))
        .await
        .unwrap();
    assert_eq!(
        state.remaining(),
        99,
        "only the admitted request is charged"
    );
    assert_eq!(global.stats().refunds, 5);
}

//! nginx `limit_req` behaviour (SEMANTICS.md §3.6 vectors N1-N6) reproduced by the layer:
//! `burst` is capacity - 1, `nodelay` is the default, `delay=d` is `delay_after(d + 1)`.
//! The store runs on a manual clock and tokio's clock is paused, so delays are exact.

use std::future::Future;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use axum::body::Body;
use axum::{Router, routing::get};
use tollgate::key::Global;
use tollgate::{ManualClock, MemoryStore, RateLimitLayer};
use tower::ServiceExt;

fn app(quota: &str, delay_after: Option<u32>) -> (Router, ManualClock) {
    let clock = ManualClock::new();
    let store = MemoryStore::builder().clock(clock.clone()).build().unwrap();
    let mut builder = RateLimitLayer::builder(quota.parse().unwrap())
        .store(store)
        .key(Global);
    if let Some(n) = delay_after {
        builder = builder.delay_after(n);
    }
    let router = Router::new()
        .route("/", get(|| async { "ok" }))
        .layer(builder.build().unwrap());
    (router, clock)
}

async fn status(app: &Router) -> u16 {
    let req = http::Request::new(Body::empty());
    app.clone().oneshot(req).await.unwrap().status().as_u16()
}

/// Sends `n` requests at one instant, in order; returns each one's status and how long it
/// was held.
async fn burst(app: &Router, n: usize) -> Vec<(u16, u64)> {
    let start = tokio::time::Instant::now();
    let started: Vec<_> = (0..n)
        .map(|_| {
            let app = app.clone();
            start_now(async move {
                let status = status(&app).await;
                (status, start.elapsed().as_millis() as u64)
            })
        })
        .collect();
    let mut out = Vec::new();
    for fut in started {
        out.push(fut.await);
    }
    out
}

/// Polls `fut` once right away (so the store decides now, in call order) and returns a
/// future of its output.
fn start_now<F: Future>(fut: F) -> impl Future<Output = F::Output> {
    let mut fut = Box::pin(fut);
    let mut cx = Context::from_waker(Waker::noop());
    let first = fut.as_mut().poll(&mut cx);
    async move {
        match first {
            Poll::Ready(v) => v,
            Poll::Pending => fut.await,
        }
    }
}

#[tokio::test]
async fn n1_burst_5_nodelay() {
    let (app, clock) = app("10/s;capacity=6", None);
    let statuses: Vec<u16> = burst(&app, 8).await.into_iter().map(|(s, _)| s).collect();
    assert_eq!(statuses, [200, 200, 200, 200, 200, 200, 429, 429]);
    for (at_ms, want) in [(100, 200), (150, 429), (200, 200)] {
        clock.set(Duration::from_millis(at_ms));
        assert_eq!(status(&app).await, want, "t={at_ms}");
    }
}

#[tokio::test(start_paused = true)]
async fn n2_burst_5_delays_each_excess_request() {
    let (app, _) = app("10/s;capacity=6", Some(1));
    assert_eq!(
        burst(&app, 8).await,
        [
            (200, 0),
            (200, 100),
            (200, 200),
            (200, 300),
            (200, 400),
            (200, 500),
            (429, 0),
            (429, 0)
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn n3_burst_5_delay_3() {
    let (app, _) = app("10/s;capacity=6", Some(4));
    assert_eq!(
        burst(&app, 8).await,
        [
            (200, 0),
            (200, 0),
            (200, 0),
            (200, 0),
            (200, 100),
            (200, 200),
            (429, 0),
            (429, 0)
        ]
    );
}

#[tokio::test]
async fn n4_no_burst() {
    let (app, clock) = app("10/s;capacity=1", None);
    for (at_ms, want) in [
        (0, 200),
        (10, 429),
        (99, 429),
        (100, 200),
        (150, 429),
        (200, 200),
    ] {
        clock.set(Duration::from_millis(at_ms));
        assert_eq!(status(&app).await, want, "t={at_ms}");
    }
}

/// nginx computes `1r/m` as 16 milli-requests per ms, one request per 62.5 s; tollgate's
/// integer microseconds make it exactly one per 60 s.
#[tokio::test]
async fn n5_one_per_minute_is_exact() {
    let (app, clock) = app("1/m", None);
    for (at_ms, want) in [(0, 200), (59_999, 429), (60_000, 200), (62_499, 429)] {
        clock.set(Duration::from_millis(at_ms));
        assert_eq!(status(&app).await, want, "t={at_ms}");
    }
}

#[tokio::test(start_paused = true)]
async fn n6_two_stage_burst_12_delay_8() {
    let (app, _) = app("5/s;capacity=13", Some(9));
    let got = burst(&app, 15).await;
    let mut want = vec![(200, 0); 9];
    want.extend([
        (200, 200),
        (200, 400),
        (200, 600),
        (200, 800),
        (429, 0),
        (429, 0),
    ]);
    assert_eq!(got, want);
}

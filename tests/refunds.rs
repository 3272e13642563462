//! Charging after the response (`tollgate::settle`): refund rules, reserve and reconcile, and
//! exactly what a request is charged when its handler panics, its client goes away, or the
//! store fails the settlement. Real HTTP on loopback where a client is involved; stores on a
//! manual clock, so nothing waits for refills.

mod common;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::routing::{get, post};
use http::{HeaderMap, Request, Response, StatusCode};
use tollgate::key::Header;
use tollgate::{
    ActualCost, BreakerConfig, CircuitBreaker, Decision, FailMode, Key, ManualClock, MemoryStore,
    Policy, RateLimitLayer, Store, StoreError, StoreErrorKind,
};
use tower::ServiceExt;

fn manual_store() -> (MemoryStore<ManualClock>, ManualClock) {
    let clock = ManualClock::new();
    let store = MemoryStore::builder().clock(clock.clone()).build().unwrap();
    (store, clock)
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

/// 200 with `x-password: open-sesame`, else 401; `x-wait-ms` holds the answer that long.
async fn login(headers: HeaderMap) -> StatusCode {
    if let Some(ms) = headers.get("x-wait-ms") {
        let ms: u64 = ms.to_str().unwrap().parse().unwrap();
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    if headers
        .get("x-password")
        .is_some_and(|p| p == "open-sesame")
    {
        StatusCode::OK
    } else {
        StatusCode::UNAUTHORIZED
    }
}

/// POST /login under `layer`, GET /quota a peek (cost 0) of the same policy.
fn login_app<St: Store>(layer: RateLimitLayer<St, Header>) -> Router {
    Router::new()
        .route("/login", post(login))
        .route("/quota", get(|| async { "quota" }))
        .layer(layer)
}

fn login_layer<St: Store>(store: St, rate: &str) -> RateLimitLayer<St, Header> {
    RateLimitLayer::builder(rate.parse().unwrap())
        .policy("login")
        .key(Header::new("x-user").unwrap())
        .store(store)
        .cost(|req| u32::from(req.uri.path() != "/quota"))
        .skip_successful()
        // A store failure shows as a 503, never as a request admitted without a charge.
        .fail_mode(FailMode::Closed)
        .build()
        .unwrap()
}

async fn attempt(addr: std::net::SocketAddr, user: &str, password: &str) -> reqwest::Response {
    client()
        .post(format!("http://{addr}/login"))
        .header("x-user", user)
        .header("x-password", password)
        .send()
        .await
        .unwrap()
}

async fn ratelimit_of(addr: std::net::SocketAddr, user: &str) -> String {
    let res = client()
        .get(format!("http://{addr}/quota"))
        .header("x-user", user)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    res.headers()["ratelimit"].to_str().unwrap().to_owned()
}

#[tokio::test]
async fn only_failed_logins_count() {
    let (store, _clock) = manual_store();
    let layer = login_layer(store, "5/m");
    let addr = common::http::serve(login_app(layer.clone())).await;
    for i in 0..20 {
        let res = attempt(addr, "alice", "open-sesame").await;
        assert_eq!(res.status(), 200, "success {i}");
        // The refund is applied before the response is handed on, and the response says so.
        assert_eq!(
            res.headers()["ratelimit"],
            "\"login\";r=5;t=0",
            "success {i}"
        );
    }
    assert_eq!(ratelimit_of(addr, "alice").await, "\"login\";r=5;t=0");
    for left in (0..5).rev() {
        let res = attempt(addr, "alice", "guess").await;
        assert_eq!(res.status(), 401);
        let want = format!("\"login\";r={left};t=12");
        assert_eq!(res.headers()["ratelimit"], want.as_str());
    }
    let res = attempt(addr, "alice", "open-sesame").await;
    assert_eq!(res.status(), 429, "denied even with the right password");
    assert_eq!(res.headers()["retry-after"], "12");
    // A denial is never refunded: still exhausted.
    assert_eq!(ratelimit_of(addr, "alice").await, "\"login\";r=0;t=12");
    // Another user is untouched.
    assert_eq!(attempt(addr, "bob", "guess").await.status(), 401);
    let stats = layer.stats();
    assert_eq!(stats.refunds, 20);
    assert_eq!(stats.denied, 1);
    assert_eq!(stats.settle_failures, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_failed_logins_never_pass_the_capacity() {
    let (store, _clock) = manual_store();
    let addr = common::http::serve(login_app(login_layer(store, "5/m"))).await;
    let attempts = (0..50).map(|_| async move {
        client()
            .post(format!("http://{addr}/login"))
            .header("x-user", "mallory")
            .header("x-wait-ms", "50")
            .send()
            .await
            .unwrap()
            .status()
    });
    let statuses = futures_join_all(attempts).await;
    let count = |s: u16| statuses.iter().filter(|st| st.as_u16() == s).count();
    assert_eq!((count(401), count(429)), (5, 45), "{statuses:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_successes_are_admitted_within_the_capacity_too() {
    // Admission bounds concurrency: of 50 successful logins at once, 5 get in, although each
    // would be refunded. The handler holds them until the other 45 have been answered, so the
    // test does not depend on how fast the machine sends them.
    let (store, _clock) = manual_store();
    let (open, gate) = tokio::sync::watch::channel(false);
    let app = Router::new()
        .route(
            "/login",
            post(move || {
                let mut gate = gate.clone();
                async move {
                    let _ = gate.wait_for(|open| *open).await;
                    StatusCode::OK
                }
            }),
        )
        .route("/quota", get(|| async { "quota" }))
        .layer(login_layer(store, "5/m"));
    let addr = common::http::serve(app).await;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    for _ in 0..50 {
        let tx = tx.clone();
        tokio::spawn(async move {
            let status = attempt(addr, "alice", "open-sesame")
                .await
                .status()
                .as_u16();
            let _ = tx.send(status);
        });
    }
    let mut statuses = Vec::new();
    while statuses.len() < 45 {
        let status = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("45 requests denied while 5 are held")
            .unwrap();
        assert_eq!(
            status, 429,
            "a request passed while 5 were held: {statuses:?}"
        );
        statuses.push(status);
    }
    open.send(true).unwrap();
    for _ in 0..5 {
        let status = rx.recv().await.unwrap();
        assert_eq!(status, 200);
    }
    // All five were refunded once: the client is fresh again, not better.
    assert_eq!(ratelimit_of(addr, "alice").await, "\"login\";r=5;t=0");
}

async fn futures_join_all<F>(futures: impl Iterator<Item = F>) -> Vec<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futures.map(tokio::spawn).collect();
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.unwrap());
    }
    out
}

/// A request for the tower-level tests.
fn req(user: &str, path: &str) -> Request<axum::body::Body> {
    Request::builder()
        .uri(path)
        .header("x-user", user)
        .body(axum::body::Body::empty())
        .unwrap()
}

fn policy(name: &str, rate: &str) -> Policy {
    Policy::new(name, rate.parse().unwrap()).unwrap()
}

/// Answers every request with `status`.
fn answering(status: u16) -> Router {
    Router::new().route(
        "/",
        get(move || async move { StatusCode::from_u16(status).unwrap() }),
    )
}

#[tokio::test]
async fn the_presets_refund_what_they_say() {
    type Rule = fn(
        tollgate::Builder<MemoryStore<ManualClock>, Header>,
    ) -> tollgate::Builder<MemoryStore<ManualClock>, Header>;
    /// Each status, and whether the preset refunds it.
    type Cases = [(u16, bool); 5];
    let presets: [(&str, Rule, Cases); 3] = [
        (
            "skip_successful",
            |b| b.skip_successful(),
            [
                (200, true),
                (302, true),
                (401, false),
                (429, false),
                (503, false),
            ],
        ),
        (
            "skip_failed",
            |b| b.skip_failed(),
            [
                (200, false),
                (302, false),
                (401, true),
                (429, true),
                (503, true),
            ],
        ),
        (
            "skip_server_errors",
            |b| b.skip_server_errors(),
            [
                (200, false),
                (302, false),
                (401, false),
                (429, false),
                (503, true),
            ],
        ),
    ];
    for (name, rule, cases) in presets {
        for (status, refunded) in cases {
            let (store, _clock) = manual_store();
            let builder = RateLimitLayer::builder("5/m".parse().unwrap())
                .policy("p")
                .key(Header::new("x-user").unwrap())
                .store(store.clone());
            let layer = rule(builder).build().unwrap();
            let res = answering(status)
                .layer(layer)
                .oneshot(req("u", "/"))
                .await
                .unwrap();
            assert_eq!(res.status().as_u16(), status);
            let left = store
                .check_now(&policy("p", "5/m"), &Key::from("u"), 0)
                .remaining();
            let want = if refunded { 5 } else { 4 };
            assert_eq!(left, want, "{name}, status {status}");
        }
    }
}

#[tokio::test]
async fn a_closure_sees_the_status_and_headers() {
    let (store, _clock) = manual_store();
    let layer = RateLimitLayer::builder("5/m".parse().unwrap())
        .policy("p")
        .key(Header::new("x-user").unwrap())
        .store(store.clone())
        .refund_when(|status, headers| status == 200 && headers.contains_key("x-cached"))
        .build()
        .unwrap();
    let app = Router::new()
        .route("/cached", get(|| async { ([("x-cached", "1")], "hit") }))
        .route("/fresh", get(|| async { "miss" }))
        .layer(layer);
    let p = policy("p", "5/m");
    app.clone().oneshot(req("u", "/cached")).await.unwrap();
    assert_eq!(store.check_now(&p, &Key::from("u"), 0).remaining(), 5);
    app.clone().oneshot(req("u", "/fresh")).await.unwrap();
    assert_eq!(store.check_now(&p, &Key::from("u"), 0).remaining(), 4);
}

fn token_layer<St: Store>(store: St) -> RateLimitLayer<St, Header> {
    RateLimitLayer::builder("1000/m".parse().unwrap())
        .policy("tokens")
        .key(Header::new("x-user").unwrap())
        .store(store)
        .cost(|req| if req.uri.path() == "/quota" { 0 } else { 100 })
        .reconcile(true)
        .build()
        .unwrap()
}

/// GET /work?used=N reports N as its actual cost; /work without it reports nothing.
fn token_app<St: Store>(layer: RateLimitLayer<St, Header>) -> Router {
    async fn work(uri: http::Uri) -> Response<axum::body::Body> {
        let used = uri
            .query()
            .and_then(|q| q.strip_prefix("used="))
            .map(|n| n.parse::<u32>().unwrap());
        let mut res = Response::new(axum::body::Body::from("done"));
        if let Some(used) = used {
            res.extensions_mut().insert(ActualCost(used));
        }
        res
    }
    Router::new()
        .route("/work", get(work))
        .route("/quota", get(|| async { "quota" }))
        .layer(layer)
}

#[tokio::test]
async fn reserve_then_reconcile_down_up_and_into_debt() {
    let (store, clock) = manual_store();
    let layer = token_layer(store);
    let app = token_app(layer.clone());
    let call = |path: &str| app.clone().oneshot(req("u", path));
    let ratelimit = |res: &Response<_>| res.headers()["ratelimit"].to_str().unwrap().to_owned();

    // Reserved 100, used 10: 90 given back before the response leaves.
    let res = call("/work?used=10").await.unwrap();
    // (t: one more unit is back in 60 ms.)
    assert_eq!(ratelimit(&res), "\"tokens\";r=990;t=1");
    assert_eq!(
        ratelimit(&call("/quota").await.unwrap()),
        "\"tokens\";r=990;t=1"
    );
    // No report: the reservation stands.
    call("/work").await.unwrap();
    assert_eq!(
        ratelimit(&call("/quota").await.unwrap()),
        "\"tokens\";r=890;t=1"
    );
    // Used 150: 50 more charged.
    call("/work?used=150").await.unwrap();
    assert_eq!(
        ratelimit(&call("/quota").await.unwrap()),
        "\"tokens\";r=740;t=1"
    );
    clock.advance(Duration::from_secs(60));

    // Fresh again. Used 5000 of a capacity of 1000: 4000 units (240 s at 60 ms each) of debt.
    let res = call("/work?used=5000").await.unwrap();
    assert_eq!(res.status(), 200, "the request itself was admitted");
    // One unit is back once 4001 of them have regenerated: 240.06 s.
    assert_eq!(ratelimit(&res), "\"tokens\";r=0;t=241");
    // The next request reserves 100: it waits for the debt and its own 100 units.
    let res = call("/work?used=1").await.unwrap();
    assert_eq!(res.status(), 429);
    assert_eq!(res.headers()["retry-after"], "246");
    // A peek reports the debt, and charges nothing.
    assert_eq!(
        ratelimit(&call("/quota").await.unwrap()),
        "\"tokens\";r=0;t=241"
    );
    clock.advance(Duration::from_secs(245));
    assert_eq!(call("/work?used=1").await.unwrap().status(), 429);
    clock.advance(Duration::from_secs(1));
    let res = call("/work?used=100").await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(ratelimit(&res), "\"tokens\";r=0;t=1");
    let stats = layer.stats();
    assert_eq!((stats.refunds, stats.extra_charges), (1, 2));
}

/// Wraps a store: `adjust` waits `delay` before it reaches the inner store, or fails.
#[derive(Clone)]
struct SlowAdjust<S> {
    inner: S,
    delay: Duration,
    fail: Arc<AtomicBool>,
    adjusts: Arc<AtomicUsize>,
    /// Notified when an adjustment has started (been polled).
    started: Arc<tokio::sync::Notify>,
}

impl<S: Store + Clone> Store for SlowAdjust<S> {
    type Future = Pin<Box<dyn Future<Output = Result<Decision, StoreError>> + Send>>;

    fn check(&self, policy: &Policy, key: &Key, cost: u32) -> Self::Future {
        Box::pin(self.inner.check(policy, key, cost))
    }

    fn adjust(&self, policy: &Policy, key: &Key, delta: i64) -> Option<Self::Future> {
        let (inner, policy, key) = (self.inner.clone(), policy.clone(), key.clone());
        let (delay, fail, adjusts) = (self.delay, self.fail.clone(), self.adjusts.clone());
        let started = self.started.clone();
        Some(Box::pin(async move {
            started.notify_one();
            tokio::time::sleep(delay).await;
            adjusts.fetch_add(1, Ordering::SeqCst);
            if fail.load(Ordering::SeqCst) {
                return Err(StoreError::new(StoreErrorKind::Timeout, "took too long"));
            }
            match inner.adjust(&policy, &key, delta) {
                Some(fut) => fut.await,
                None => unreachable!("the inner store adjusts"),
            }
        }))
    }

    async fn reset(&self, policy: &Policy, key: &Key) -> Result<(), StoreError> {
        self.inner.reset(policy, key).await
    }
}

#[tokio::test]
async fn a_settlement_in_flight_completes_once_when_the_response_is_dropped() {
    let (memory, _clock) = manual_store();
    let store = SlowAdjust {
        inner: memory.clone(),
        delay: Duration::from_millis(200),
        fail: Arc::default(),
        adjusts: Arc::default(),
        started: Arc::default(),
    };
    let app = answering(200).layer(
        RateLimitLayer::builder("5/m".parse().unwrap())
            .policy("p")
            .key(Header::new("x-user").unwrap())
            .store(store.clone())
            .skip_successful()
            .build()
            .unwrap(),
    );
    let p = policy("p", "5/m");
    let k = Key::from("u");
    memory.check_now(&p, &k, 3);
    // The response waits for the refund; the caller gives up once it has started.
    tokio::select! {
        _ = app.oneshot(req("u", "/")) => panic!("the response did not wait for the settlement"),
        () = store.started.notified() => {}
    }
    assert_eq!(
        memory.check_now(&p, &k, 0).remaining(),
        1,
        "charged, not yet refunded"
    );
    for _ in 0..100 {
        if store.adjusts.load(Ordering::SeqCst) > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    // Given back once: 3 used, not 2.
    assert_eq!(memory.check_now(&p, &k, 0).remaining(), 2);
    assert_eq!(store.adjusts.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_dropped_response_future_keeps_the_charge() {
    let (store, _clock) = manual_store();
    let app = Router::new()
        .route("/", get(std::future::pending::<&'static str>))
        .layer(
            RateLimitLayer::builder("5/m".parse().unwrap())
                .policy("p")
                .key(Header::new("x-user").unwrap())
                .store(store.clone())
                .skip_failed()
                .build()
                .unwrap(),
        );
    // The client went away (the server drops the response future): no response to judge.
    let gone = tokio::time::timeout(Duration::from_millis(20), app.oneshot(req("u", "/"))).await;
    assert!(gone.is_err());
    let left = store
        .check_now(&policy("p", "5/m"), &Key::from("u"), 0)
        .remaining();
    assert_eq!(left, 4, "the admission charge stands");
}

#[tokio::test]
async fn a_panicking_handler_keeps_the_charge() {
    let (store, _clock) = manual_store();
    let layer = RateLimitLayer::builder("5/m".parse().unwrap())
        .policy("p")
        .key(Header::new("x-user").unwrap())
        .store(store.clone())
        .skip_failed()
        .build()
        .unwrap();
    let app = Router::new()
        .route(
            "/",
            get(|| async {
                if true {
                    panic!("handler bug");
                }
                "unreachable"
            }),
        )
        .layer(layer.clone());
    let outcome = tokio::spawn(app.oneshot(req("u", "/"))).await;
    assert!(outcome.unwrap_err().is_panic());
    let left = store
        .check_now(&policy("p", "5/m"), &Key::from("u"), 0)
        .remaining();
    assert_eq!(left, 4, "a panic is no response: the charge stands");
    assert_eq!(layer.stats().refunds, 0);
}

#[tokio::test(flavor = "current_thread")]
async fn a_failed_settlement_keeps_the_charge_is_counted_logged_and_not_retried() {
    let (memory, _clock) = manual_store();
    let store = SlowAdjust {
        inner: memory.clone(),
        delay: Duration::ZERO,
        fail: Arc::new(AtomicBool::new(true)),
        adjusts: Arc::default(),
        started: Arc::default(),
    };
    let layer = RateLimitLayer::builder("5/m".parse().unwrap())
        .policy("p")
        .key(Header::new("x-user").unwrap())
        .store(store.clone())
        .skip_successful()
        .build()
        .unwrap();
    let app = answering(200).layer(layer.clone());
    let logs = common::logs::capture(async {
        let res = app.oneshot(req("sk_live_secret", "/")).await.unwrap();
        assert_eq!(res.status(), 200, "the response is served all the same");
        assert_eq!(res.headers()["ratelimit"], "\"p\";r=4;t=12");
    })
    .await;
    let p = policy("p", "5/m");
    assert_eq!(
        memory
            .check_now(&p, &Key::from("sk_live_secret"), 0)
            .remaining(),
        4
    );
    assert_eq!(store.adjusts.load(Ordering::SeqCst), 1, "never retried");
    assert_eq!(layer.stats().settle_failures, 1);
    assert_eq!(layer.stats().refunds, 0);
    assert!(logs.contains("failed to settle a charge"), "{logs}");
    let fp = Key::from("sk_live_secret").fingerprint().to_string();
    assert!(logs.contains(&format!("key=fp:{fp}")), "{logs}");
    assert!(
        !logs.contains("sk_live_secret"),
        "the raw key was logged: {logs}"
    );
}

#[tokio::test]
async fn an_open_breaker_fails_settlements_fast() {
    let (memory, _clock) = manual_store();
    let flaky = SlowAdjust {
        inner: memory.clone(),
        delay: Duration::ZERO,
        fail: Arc::new(AtomicBool::new(true)),
        adjusts: Arc::default(),
        started: Arc::default(),
    };
    let breaker = CircuitBreaker::new(flaky.clone())
        .config(BreakerConfig::new(1, Duration::from_secs(60)).unwrap());
    let p = policy("p", "5/m");
    let k = Key::from("u");
    assert!(breaker.check(&p, &k, 1).await.unwrap().is_allowed());
    // The first failure opens it; the next adjustment never reaches the store.
    assert!(breaker.adjust(&p, &k, -1).unwrap().await.is_err());
    let e = breaker.adjust(&p, &k, -1).unwrap().await.unwrap_err();
    assert_eq!(e.kind(), StoreErrorKind::CircuitOpen);
    assert_eq!(flaky.adjusts.load(Ordering::SeqCst), 1);
    assert_eq!(memory.check_now(&p, &k, 0).remaining(), 4);
}

#[tokio::test]
async fn requests_admitted_by_the_fallback_are_refunded_there() {
    // A store that always fails its checks: everything is decided by the fallback limiter.
    #[derive(Clone)]
    struct Down;
    impl Store for Down {
        type Future = std::future::Ready<Result<Decision, StoreError>>;
        fn check(&self, _: &Policy, _: &Key, _: u32) -> Self::Future {
            std::future::ready(Err(StoreError::new(StoreErrorKind::Connection, "down")))
        }
        async fn reset(&self, _: &Policy, _: &Key) -> Result<(), StoreError> {
            Ok(())
        }
    }
    let layer = RateLimitLayer::builder("2/m".parse().unwrap())
        .policy("p")
        .key(Header::new("x-user").unwrap())
        .store(Down)
        .fail_mode(FailMode::Fallback { divisor: 1 })
        .skip_successful()
        .build()
        .unwrap();
    let ok = Router::new()
        .route("/ok", get(|| async { "ok" }))
        .route("/fail", get(|| async { StatusCode::UNAUTHORIZED }))
        .layer(layer.clone());
    for _ in 0..5 {
        let res = ok.clone().oneshot(req("u", "/ok")).await.unwrap();
        assert_eq!(
            res.status(),
            200,
            "refunded in the fallback limiter each time"
        );
    }
    for status in [401, 401, 429] {
        let res = ok.clone().oneshot(req("u", "/fail")).await.unwrap();
        assert_eq!(res.status().as_u16(), status);
    }
    assert_eq!(layer.stats().refunds, 5);
}

#[tokio::test]
async fn a_store_without_adjustments_keeps_every_charge() {
    #[derive(Clone)]
    struct NoAdjust(MemoryStore<ManualClock>);
    impl Store for NoAdjust {
        type Future = std::future::Ready<Result<Decision, StoreError>>;
        fn check(&self, policy: &Policy, key: &Key, cost: u32) -> Self::Future {
            std::future::ready(Ok(self.0.check_now(policy, key, cost)))
        }
        async fn reset(&self, policy: &Policy, key: &Key) -> Result<(), StoreError> {
            self.0.remove(policy, key);
            Ok(())
        }
    }
    let (memory, _clock) = manual_store();
    let layer = RateLimitLayer::builder("5/m".parse().unwrap())
        .policy("p")
        .key(Header::new("x-user").unwrap())
        .store(NoAdjust(memory.clone()))
        .skip_successful()
        .build()
        .unwrap();
    answering(200)
        .layer(layer.clone())
        .oneshot(req("u", "/"))
        .await
        .unwrap();
    assert_eq!(
        memory
            .check_now(&policy("p", "5/m"), &Key::from("u"), 0)
            .remaining(),
        4
    );
    assert_eq!(layer.stats().settle_failures, 1);
}

#[tokio::test]
async fn a_charge_that_has_regenerated_is_not_given_back() {
    // 10/s with capacity 1: a charge regenerates in 100 ms; the handler takes 150 ms. Giving
    // it back then would cancel a later request's charge.
    let layer = RateLimitLayer::builder("10/s;capacity=1".parse().unwrap())
        .policy("p")
        .key(Header::new("x-user").unwrap())
        .skip_successful()
        .build()
        .unwrap();
    let app = Router::new()
        .route(
            "/",
            get(|| async {
                tokio::time::sleep(Duration::from_millis(150)).await;
                "slow"
            }),
        )
        .layer(layer.clone());
    assert_eq!(app.oneshot(req("u", "/")).await.unwrap().status(), 200);
    assert_eq!(layer.stats().refunds, 0);
}

#[tokio::test]
async fn extensions_reach_the_rule_and_denials_are_never_refunded() {
    let (store, _clock) = manual_store();
    let layer = RateLimitLayer::builder("1/m".parse().unwrap())
        .policy("p")
        .key(Header::new("x-user").unwrap())
        .store(store.clone())
        .skip_failed()
        .build()
        .unwrap();
    let app = answering(401).layer(layer.clone());
    // First: admitted, 401, refunded. Then keep the charge with a 200 elsewhere.
    assert_eq!(
        app.clone().oneshot(req("u", "/")).await.unwrap().status(),
        401
    );
    let p = policy("p", "1/m");
    let k = Key::from("u");
    assert_eq!(store.check_now(&p, &k, 0).remaining(), 1);
    store.check_now(&p, &k, 1);
    // Denied (a 429 is >= 400, but it was never charged): nothing is given back.
    let res = app.clone().oneshot(req("u", "/")).await.unwrap();
    assert_eq!(res.status(), 429);
    assert_eq!(store.check_now(&p, &k, 0).remaining(), 0);
    assert_eq!(layer.stats().refunds, 1);
}

#[cfg(feature = "redis")]
mod redis {
    use super::*;
    use common::redis::RedisServer;
    use tollgate::{Clock, DenyCache, RedisStore};

    fn calls(stats: &str, cmd: &str) -> u64 {
        stats
            .lines()
            .find(|l| l.starts_with(&format!("cmdstat_{cmd}:")))
            .and_then(|l| l.split("calls=").nth(1))
            .and_then(|v| v.split(',').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }

    /// A refunded request costs one more script call, made before the response leaves (a
    /// second app server sees it at once); the adjustment script was loaded with the store, so
    /// even the first refund is one call.
    #[tokio::test]
    async fn a_refund_is_one_script_call_seen_by_every_server() {
        let server = RedisServer::start();
        let store = || {
            RedisStore::builder(&server.url())
                .command_timeout(Duration::from_secs(2))
                .build()
        };
        let (a, b) = (store().await.unwrap(), store().await.unwrap());
        let layer = |store: RedisStore| login_layer(store, "5/m");
        let (app_a, app_b) = (login_app(layer(a.clone())), login_app(layer(b.clone())));
        let (addr_a, addr_b) = (
            common::http::serve(app_a).await,
            common::http::serve(app_b).await,
        );
        assert_eq!(server.cli(&["CONFIG", "RESETSTAT"]).trim(), "OK");
        for i in 0..10 {
            let addr = if i % 2 == 0 { addr_a } else { addr_b };
            let res = attempt(addr, "alice", "open-sesame").await;
            assert_eq!(res.status(), 200);
            assert_eq!(res.headers()["ratelimit"], "\"login\";r=5;t=0", "login {i}");
        }
        let stats = server.cli(&["INFO", "commandstats"]);
        // 10 checks and 10 refunds ran, each once: one EVALSHA each, and no script load.
        assert_eq!(calls(&stats, "evalsha"), 20, "{stats}");
        assert_eq!(calls(&stats, "script|load"), 0, "{stats}");
        assert_eq!(calls(&stats, "set"), 10, "{stats}");
        assert_eq!(calls(&stats, "del"), 10, "{stats}");
        // Failures are shared between the two servers exactly.
        for (i, addr) in [addr_a, addr_b, addr_a, addr_b, addr_a]
            .into_iter()
            .enumerate()
        {
            let res = attempt(addr, "alice", "wrong").await;
            assert_eq!(res.status(), 401, "failure {i}");
        }
        assert_eq!(attempt(addr_b, "alice", "open-sesame").await.status(), 429);
        assert_eq!(attempt(addr_a, "alice", "open-sesame").await.status(), 429);
    }

    /// The conformance kit's adjustment vectors at chosen instants through the Redis script:
    /// exactly `gcra::adjust`, also for a multi-quota policy, a huge debt and a huge refund.
    #[tokio::test]
    async fn the_script_adjusts_exactly_as_the_gcra() {
        let server = RedisServer::start();
        let s = RedisStore::builder(&server.url()).build().await.unwrap();
        let memory_clock = ManualClock::new();
        let memory = MemoryStore::builder()
            .clock(memory_clock.clone())
            .build()
            .unwrap();
        let now = 1_790_000_000_000_000u64;
        /// Quotas, then (ms since the start, delta) steps.
        type Case<'a> = (&'a [&'a str], &'a [(u64, i64)]);
        let cases: [Case; 3] = [
            (
                &["5/5s"],
                &[
                    (0, 3),
                    (0, -1),
                    (500, -1),
                    (900, 7),
                    (2_000, -100),
                    (2_000, -1),
                ],
            ),
            (
                &["2/s", "5/h"],
                &[(0, 1), (0, 1), (100, -1), (200, 9), (300, -3)],
            ),
            (&["1/d"], &[(0, i64::MAX), (1, -1), (2, i64::MIN), (3, -1)]),
        ];
        for (n, (quotas, steps)) in cases.into_iter().enumerate() {
            let policy = Policy::multi(
                &format!("adjust-{n}"),
                quotas.iter().map(|q| q.parse().unwrap()),
            )
            .unwrap();
            let key = Key::from(format!("exact-{n}"));
            let start = memory_clock.now_micros();
            for &(t_ms, delta) in steps {
                let at = now + t_ms * 1_000;
                let target = start + t_ms * 1_000;
                let current = memory_clock.now_micros();
                memory_clock.advance(Duration::from_micros(target - current));
                let want = memory.adjust_now(&policy, &key, delta);
                let got = s.adjust_at(&policy, &key, delta, at).await.unwrap();
                assert_eq!(got, want, "{quotas:?} at {t_ms} ms by {delta}");
                // And a check made afterwards agrees too.
                let want = memory.check_now(&policy, &key, 1);
                let got = s.check_at(&policy, &key, 1, at).await.unwrap();
                assert_eq!(got, want, "{quotas:?} check at {t_ms} ms after {delta}");
            }
        }
        // Every key still holds a TTL (or is gone).
        let keys = server.cli(&["KEYS", "*"]);
        for key in keys.lines().filter(|l| !l.is_empty()) {
            let ttl: i64 = server.cli(&["PTTL", key]).trim().parse().unwrap();
            assert!(ttl > 0, "{key} has PTTL {ttl}");
        }
    }

    /// A deny cache in front of Redis: a refund lifts the local denial it made obsolete.
    #[tokio::test]
    async fn a_refund_through_a_deny_cache_lifts_its_denial() {
        let server = RedisServer::start();
        let redis = RedisStore::builder(&server.url()).build().await.unwrap();
        let store = DenyCache::new(redis);
        let p = policy("cached", "2/h");
        let k = Key::from("k");
        for _ in 0..2 {
            assert!(store.check(&p, &k, 1).await.unwrap().is_allowed());
        }
        for _ in 0..3 {
            assert!(!store.check(&p, &k, 1).await.unwrap().is_allowed());
        }
        assert!(store.stats().local_denials >= 2, "{:?}", store.stats());
        let after = store.adjust(&p, &k, -1).unwrap().await.unwrap();
        assert_eq!(after.remaining(), 1);
        assert!(store.check(&p, &k, 1).await.unwrap().is_allowed());
        assert!(!store.check(&p, &k, 1).await.unwrap().is_allowed());
    }
}

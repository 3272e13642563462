//! DenyCache and CircuitBreaker with real components: a real redis-server (one per test, on a
//! free loopback port) behind RedisStore, and the middleware over real HTTP.
//!
//! - Flooding one client far above its limit costs Redis about one call per emission interval,
//!   and every decision equals what Redis alone decides at the same instant.
//! - With Redis killed, stalled (`DEBUG SLEEP`) and restarted, no request waits longer than the
//!   command timeout, at most one request per cool-down pays it, and the breaker closes again.
#![cfg(feature = "redis")]

mod common;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tollgate::{Decision, DenyCache, Key, ManualClock, Policy, Quota, Store};
use tollgate::{StoreError, StoreErrorKind};

/// Any store, counting the checks that reach it.
#[derive(Clone)]
struct Counted<S> {
    inner: S,
    calls: Arc<AtomicUsize>,
}

impl<S> Counted<S> {
    fn new(inner: S) -> Self {
        Self {
            inner,
            calls: Arc::default(),
        }
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

impl<S: Store> Store for Counted<S> {
    type Future = S::Future;

    fn check(&self, policy: &Policy, key: &Key, cost: u32) -> Self::Future {
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.inner.check(policy, key, cost)
    }

    fn reset(
        &self,
        policy: &Policy,
        key: &Key,
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        self.inner.reset(policy, key)
    }
}

#[cfg(feature = "redis")]
mod redis_backed {
    use super::*;

    use std::time::{Duration, Instant};

    use axum::Router;
    use axum::routing::get;
    use common::redis::RedisServer;
    use tollgate::key::{Global, Header};
    use tollgate::store::redis::RedisStore;
    use tollgate::{BreakerState, CircuitBreaker, Clock, FailMode, Outcome, RateLimitLayer};

    type Boxed = Pin<Box<dyn Future<Output = Result<Decision, StoreError>> + Send>>;

    /// Slack on top of the command timeout for a noisy 2-core machine running debug builds.
    const SLACK: Duration = Duration::from_millis(80);

    async fn redis_store(server: &RedisServer, timeout: Duration) -> RedisStore {
        RedisStore::builder(&server.url())
            .command_timeout(timeout)
            .build()
            .await
            .expect("store builds")
    }

    fn policy(name: &str, quota: &str) -> Policy {
        Policy::new(name, quota.parse::<Quota>().unwrap()).unwrap()
    }

    /// `cmdstat_evalsha` calls so far, as Redis itself counts them.
    fn evalsha_calls(server: &RedisServer) -> u64 {
        let info = server.cli(&["INFO", "commandstats"]);
        info.lines()
            .find_map(|l| l.strip_prefix("cmdstat_evalsha:calls="))
            .and_then(|rest| rest.split(',').next())
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or(0)
    }

    /// RedisStore deciding at the manual clock's instant (the test-only `check_at`), so that
    /// Redis and the cache see the same, exact times.
    #[derive(Clone)]
    struct AtClock {
        store: RedisStore,
        clock: ManualClock,
        calls: Arc<AtomicUsize>,
    }

    impl Store for AtClock {
        type Future = Boxed;

        fn check(&self, policy: &Policy, key: &Key, cost: u32) -> Self::Future {
            self.calls.fetch_add(1, Ordering::SeqCst);
            let (store, policy, key) = (self.store.clone(), policy.clone(), key.clone());
            let now = self.clock.now_micros();
            Box::pin(async move { store.check_at(&policy, &key, cost, now).await })
        }

        fn reset(
            &self,
            policy: &Policy,
            key: &Key,
        ) -> impl Future<Output = Result<(), StoreError>> + Send {
            self.store.reset(policy, key)
        }
    }

    /// One client floods 1,000 requests, one every millisecond, through a DenyCache in front of
    /// Redis; a twin key gets the same requests straight from Redis at the same instants. Every
    /// decision is identical, and the cache calls Redis only for the burst, the first denial,
    /// and the one request per emission interval that may pass.
    #[tokio::test]
    async fn flood_through_the_cache_decides_like_redis_with_one_call_per_interval() {
        let server = RedisServer::start();
        let store = redis_store(&server, Duration::from_secs(2)).await;
        let multi = Policy::multi(
            "flood",
            ["2/s".parse::<Quota>().unwrap(), "5/h".parse().unwrap()],
        )
        .unwrap();
        for (quota, p, most_calls) in [
            // T = 100 ms: 5 at once + first denial + 10 intervals in 1 s.
            (
                "10/s;capacity=5",
                policy("flood", "10/s;capacity=5"),
                5 + 1 + 10,
            ),
            // T = 1 s, capacity 1: one admission, one denial, one more after 1 s.
            ("1/s", policy("flood", "1/s"), 3),
            (
                "100/h;capacity=3",
                policy("flood", "100/h;capacity=3"),
                3 + 1,
            ),
            // Two quotas in one atomic decision (the multi-quota script): 2 at once, a denial,
            // one more at 500 ms, a denial.
            ("2/s and 5/h", multi.clone(), 2 + 1 + 1 + 1),
        ] {
            let clock = ManualClock::new();
            let at = |calls| AtClock {
                store: store.clone(),
                clock: clock.clone(),
                calls,
            };
            let via_cache = at(Arc::default());
            let direct = at(Arc::default());
            let cache = DenyCache::new(via_cache.clone()).clock(clock.clone());
            let (a, b) = (
                Key::from(format!("cached-{quota}")),
                Key::from(format!("direct-{quota}")),
            );
            let mut denied = 0;
            for i in 0..1_000 {
                let got = cache.check(&p, &a, 1).await.unwrap();
                let want = direct.check(&p, &b, 1).await.unwrap();
                assert_eq!(got, want, "{quota}: request {i}");
                denied += usize::from(got.outcome() == Outcome::Denied);
                clock.advance(Duration::from_millis(1));
            }
            let calls = via_cache.calls.load(Ordering::SeqCst);
            eprintln!("{quota}: {calls} Redis calls per 1,000 flood requests ({denied} denied)");
            assert!(calls <= most_calls, "{quota}: {calls} Redis calls");
            assert_eq!(direct.calls.load(Ordering::SeqCst), 1_000);
            assert_eq!(cache.stats().local_denials as usize, 1_000 - calls);
        }
    }

    /// Real time (the Redis server's clock for Redis, the monotonic clock for the cache): a
    /// flood spread over about a second never admits more than the quota allows, and costs
    /// Redis about one call per emission interval, counted by Redis itself.
    #[tokio::test]
    async fn flood_in_real_time_costs_redis_about_one_call_per_interval() {
        let server = RedisServer::start();
        let store = redis_store(&server, Duration::from_secs(2)).await;
        let cache = DenyCache::new(store);
        // T = 50 ms, capacity 5.
        let p = policy("flood", "20/s;capacity=5");
        let key = Key::from("flooder");
        let before = evalsha_calls(&server);
        let start = Instant::now();
        let mut allowed = 0u64;
        for _ in 0..1_000 {
            let d = cache.check(&p, &key, 1).await.unwrap();
            allowed += u64::from(d.is_allowed());
            if !d.is_allowed() {
                assert!(
                    d.retry_after()
                        .is_some_and(|r| r <= Duration::from_millis(50))
                );
            }
            tokio::time::sleep(Duration::from_micros(500)).await;
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "flood took too long"
            );
        }
        let elapsed = start.elapsed();
        let calls = evalsha_calls(&server) - before;
        let intervals = elapsed.as_millis() as u64 / 50;
        eprintln!(
            "real-time flood: {calls} Redis calls for 1,000 requests over {elapsed:?} \
             ({intervals} intervals of 50 ms), {allowed} admitted"
        );
        assert!(
            allowed <= 5 + intervals + 1,
            "admitted {allowed} > quota over {elapsed:?}"
        );
        assert!(allowed >= 5 + intervals / 2, "admitted only {allowed}");
        // One call per interval, plus the burst and first denial; a request landing within one
        // round trip of an interval's end may cost a second call (the cached time is a lower
        // bound by that round trip).
        assert!(
            calls <= 5 + 2 + intervals * 3 / 2,
            "{calls} Redis calls for {intervals} intervals"
        );
        assert_eq!(cache.stats().store_calls, calls);
    }

    fn client() -> reqwest::Client {
        reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .unwrap()
    }

    /// Over HTTP: the same flood through a layer on `DenyCache<RedisStore>` and through one on
    /// the plain RedisStore. Identical responses (status, Retry-After at least 1, RateLimit
    /// fields); Redis sees a handful of calls instead of one per request.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn http_flood_with_and_without_the_deny_cache() {
        let server = RedisServer::start();
        let quota: Quota = "5/h".parse().unwrap();
        let cached = RateLimitLayer::builder(quota)
            .key(Global)
            .policy("cached")
            .store(DenyCache::new(
                redis_store(&server, Duration::from_secs(2)).await,
            ))
            .fail_mode(FailMode::Closed)
            .build()
            .unwrap();
        let plain = RateLimitLayer::builder(quota)
            .key(Global)
            .policy("plain")
            .store(redis_store(&server, Duration::from_secs(2)).await)
            .fail_mode(FailMode::Closed)
            .build()
            .unwrap();
        let app = Router::new()
            .route("/cached", get(|| async { "ok" }).route_layer(cached))
            .route("/plain", get(|| async { "ok" }).route_layer(plain));
        let addr = common::http::serve(app).await;
        let c = client();
        let mut calls = Vec::new();
        for path in ["cached", "plain"] {
            let before = evalsha_calls(&server);
            let mut statuses = [0u32; 2];
            for i in 0..300 {
                let res = c.get(format!("http://{addr}/{path}")).send().await.unwrap();
                match res.status().as_u16() {
                    200 => statuses[0] += 1,
                    429 => {
                        statuses[1] += 1;
                        let retry: u64 = res.headers()["retry-after"]
                            .to_str()
                            .unwrap()
                            .parse()
                            .unwrap();
                        assert!(
                            (1..=720).contains(&retry),
                            "{path} {i}: Retry-After {retry}"
                        );
                        let rl = res.headers()["ratelimit"].to_str().unwrap();
                        assert!(rl.starts_with(&format!("\"{path}\";r=0;t=")), "{rl}");
                    }
                    s => panic!("{path} request {i}: status {s}"),
                }
            }
            assert_eq!(statuses, [5, 295], "{path}");
            calls.push(evalsha_calls(&server) - before);
        }
        eprintln!(
            "HTTP flood of 300: {} Redis calls with the deny cache, {} without",
            calls[0], calls[1]
        );
        assert_eq!(calls, [6, 300]);
    }

    /// Requests with their latency and whether they reached the store.
    struct Probe {
        latency: Duration,
        reached_store: bool,
        result: Result<Decision, StoreError>,
        at: Duration,
    }

    async fn drive(
        breaker: &CircuitBreaker<Counted<RedisStore>>,
        key: &Key,
        p: &Policy,
        for_how_long: Duration,
    ) -> Vec<Probe> {
        let start = Instant::now();
        let mut out = Vec::new();
        while start.elapsed() < for_how_long && out.len() < 2_000 {
            let calls = breaker.get_ref().calls();
            let t = Instant::now();
            let result = breaker.check(p, key, 1).await;
            out.push(Probe {
                latency: t.elapsed(),
                reached_store: breaker.get_ref().calls() > calls,
                result,
                at: start.elapsed(),
            });
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        out
    }

    /// Asserts the breaker's promises over a run against a failing Redis: no request waited
    /// longer than the command timeout; once open, at most one request per cool-down reached
    /// Redis; every other request failed fast with CircuitOpen.
    fn assert_breaker_held(
        what: &str,
        run: &[Probe],
        timeout: Duration,
        cooldown: Duration,
        failures: usize,
    ) {
        let slowest = run.iter().map(|p| p.latency).max().unwrap_or_default();
        assert!(
            slowest <= timeout + SLACK,
            "{what}: a request waited {slowest:?} (timeout {timeout:?})"
        );
        let reached: Vec<&Probe> = run.iter().filter(|p| p.reached_store).collect();
        let total = run.last().map(|p| p.at).unwrap_or_default();
        let allowed_calls = failures + (total.as_millis() / cooldown.as_millis()) as usize + 1;
        eprintln!(
            "{what}: {} requests over {total:?}, {} reached Redis (at most {allowed_calls}), \
             slowest {slowest:?}",
            run.len(),
            reached.len()
        );
        assert!(
            reached.len() <= allowed_calls,
            "{what}: {} requests reached Redis",
            reached.len()
        );
        // After the breaker opened, consecutive store calls are a cool-down apart.
        let after_open: Vec<Duration> = reached.iter().skip(failures).map(|p| p.at).collect();
        for pair in after_open.windows(2) {
            assert!(
                pair[1] - pair[0] + Duration::from_millis(10) >= cooldown,
                "{what}: two probes {:?} apart",
                pair[1] - pair[0]
            );
        }
        for p in run.iter().filter(|p| !p.reached_store) {
            let e = p.result.as_ref().unwrap_err();
            assert_eq!(e.kind(), StoreErrorKind::CircuitOpen, "{what}: {e}");
            assert!(
                p.latency < Duration::from_millis(20),
                "{what}: a fast failure took {:?}",
                p.latency
            );
        }
        assert!(
            run.len() > reached.len() * 3,
            "{what}: most requests must fail fast"
        );
    }

    /// Redis killed: at most one request per cool-down pays for it; restarted: the breaker
    /// closes again within about a cool-down and limiting resumes.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn breaker_with_redis_killed_then_restarted() {
        let mut server = RedisServer::start();
        let timeout = Duration::from_millis(100);
        let cooldown = Duration::from_millis(300);
        let breaker = CircuitBreaker::new(Counted::new(redis_store(&server, timeout).await))
            .failures(3)
            .cooldown(cooldown);
        let p = policy("killed", "3/h");
        let warm = Key::from("warm");
        assert!(breaker.check(&p, &warm, 1).await.unwrap().is_allowed());
        server.kill();
        let run = drive(&breaker, &Key::from("k"), &p, Duration::from_millis(1_500)).await;
        assert!(run.iter().all(|p| p.result.is_err()));
        assert_breaker_held("killed", &run, timeout, cooldown, 3);
        assert_ne!(breaker.state(), BreakerState::Closed);
        let stats = breaker.stats();
        assert!(stats.opened >= 1 && stats.rejected > 0, "{stats:?}");

        server.restart();
        let back = Instant::now();
        let key = Key::from("after-restart");
        let mut first_ok = None;
        while back.elapsed() < Duration::from_secs(10) {
            if let Ok(d) = breaker.check(&p, &key, 1).await {
                first_ok = Some((back.elapsed(), d));
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let (after, d) = first_ok.expect("the breaker closes after Redis restarts");
        eprintln!("restarted: first decision from Redis after {after:?}");
        assert!(d.is_allowed());
        assert!(
            after <= cooldown * 2 + Duration::from_millis(700),
            "closed only after {after:?}"
        );
        assert_eq!(breaker.state(), BreakerState::Closed);
        // Limiting resumes: the rest of the quota, then a denial, from Redis.
        assert!(breaker.check(&p, &key, 1).await.unwrap().is_allowed());
        assert!(breaker.check(&p, &key, 1).await.unwrap().is_allowed());
        let denied = breaker.check(&p, &key, 1).await.unwrap();
        assert_eq!(denied.outcome(), Outcome::Denied);
    }

    /// Redis stalled by `DEBUG SLEEP 2`: every call times out; the breaker keeps all but one
    /// request per cool-down away from it, and closes once Redis answers again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn breaker_with_redis_stalled() {
        let server = RedisServer::start();
        let timeout = Duration::from_millis(100);
        let cooldown = Duration::from_millis(300);
        let breaker = CircuitBreaker::new(Counted::new(redis_store(&server, timeout).await))
            .failures(3)
            .cooldown(cooldown);
        let p = policy("stalled", "1000/s");
        let key = Key::from("k");
        assert!(breaker.check(&p, &key, 1).await.unwrap().is_allowed());
        let port = server.port;
        let sleeper =
            std::thread::spawn(move || common::redis::cli(port, &["DEBUG", "SLEEP", "2"]));
        // Let the DEBUG command reach the server first.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let run = drive(&breaker, &key, &p, Duration::from_millis(1_500)).await;
        let timeouts = run
            .iter()
            .filter(|p| p.result.as_ref().is_err_and(|e| e.is_timeout()))
            .count();
        assert!(timeouts >= 3, "the stall was seen: {timeouts} timeouts");
        assert_breaker_held("stalled", &run, timeout, cooldown, 3);
        sleeper.join().unwrap();
        let back = Instant::now();
        loop {
            if breaker.check(&p, &key, 1).await.is_ok() {
                break;
            }
            assert!(
                back.elapsed() < cooldown * 2 + Duration::from_millis(700),
                "no recovery after the stall"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(breaker.state(), BreakerState::Closed);
    }

    /// Both together over HTTP, `DenyCache<CircuitBreaker<RedisStore>>`, fail mode Closed, with
    /// Redis killed: a client known to be over its limit still gets a local 429 (not a 503);
    /// other clients get a fast 503 while the breaker is open; nobody waits past the timeout.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn over_http_the_cache_keeps_denying_and_the_breaker_answers_fast_during_an_outage() {
        let mut server = RedisServer::start();
        let timeout = Duration::from_millis(100);
        let breaker = CircuitBreaker::new(redis_store(&server, timeout).await)
            .failures(2)
            .cooldown(Duration::from_secs(1));
        let layer = RateLimitLayer::builder("2/h".parse::<Quota>().unwrap())
            .key(Header::new("x-client").unwrap())
            .store(DenyCache::new(breaker))
            .fail_mode(FailMode::Closed)
            .build()
            .unwrap();
        let addr = common::http::serve(
            Router::new()
                .route("/", get(|| async { "ok" }))
                .layer(layer),
        )
        .await;
        let c = client();
        let send = |who: &'static str| {
            let c = c.clone();
            async move {
                let t = Instant::now();
                let res = c
                    .get(format!("http://{addr}/"))
                    .header("x-client", who)
                    .send()
                    .await
                    .unwrap();
                (res.status().as_u16(), t.elapsed())
            }
        };
        for want in [200, 200, 429] {
            assert_eq!(send("abuser").await.0, want);
        }
        server.kill();
        let mut statuses = Vec::new();
        for i in 0..60 {
            let who = if i % 2 == 0 { "abuser" } else { "other" };
            let (status, latency) = send(who).await;
            assert!(latency <= timeout + SLACK, "request {i} took {latency:?}");
            statuses.push((who, status));
        }
        assert!(
            statuses
                .iter()
                .filter(|(w, _)| *w == "abuser")
                .all(|(_, s)| *s == 429),
            "{statuses:?}"
        );
        assert!(
            statuses
                .iter()
                .filter(|(w, _)| *w == "other")
                .all(|(_, s)| *s == 503),
            "{statuses:?}"
        );
    }
}

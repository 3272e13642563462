//! Metrics (feature `metrics`) with a real recorder: exact counts after a scripted mix of
//! allowed, denied, dry-run, delayed, unlimited, fail-open and fail-closed (Redis killed) and
//! fallback requests; series that never grow with the number of clients.
#![cfg(all(feature = "metrics", feature = "redis"))]

mod common;

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::{Ready, ready};
use std::time::Duration;

use http::{Request, Response};
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use tollgate::key::{Header, PeerAddr};
use tollgate::store::redis::RedisStore;
use tollgate::{CircuitBreaker, DenyCache, FailMode, MemoryStore, RateLimitLayer};
use tower::{Layer, Service, ServiceExt};

use common::redis::RedisServer;

type Answer = Ready<Result<Response<String>, Infallible>>;

fn inner() -> tower::util::ServiceFn<impl Fn(Request<String>) -> Answer + Clone> {
    tower::service_fn(|_req: Request<String>| ready(Ok(Response::new("ok".to_owned()))))
}

fn request(key: &str, path: &str) -> Request<String> {
    let mut req = Request::builder()
        .uri(path)
        .header("x-api-key", key)
        .body(String::new())
        .unwrap();
    req.extensions_mut()
        .insert(PeerAddr("192.0.2.1:5000".parse().unwrap()));
    req
}

/// Sends `n` requests as `key` through `svc`.
async fn send<S, B>(svc: &mut S, key: &str, path: &str, n: usize) -> Vec<u16>
where
    S: Service<Request<String>, Response = Response<B>>,
    S::Error: std::fmt::Debug,
{
    let mut out = Vec::new();
    for _ in 0..n {
        let res = svc
            .ready()
            .await
            .unwrap()
            .call(request(key, path))
            .await
            .unwrap();
        out.push(res.status().as_u16());
    }
    out
}

/// Every metric as `name{label=value,...}` (labels sorted) -> value.
fn snapshot(snapshotter: &Snapshotter) -> HashMap<String, f64> {
    snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .map(|(key, _, _, value)| {
            let mut labels: Vec<String> = key
                .key()
                .labels()
                .map(|l| format!("{}={}", l.key(), l.value()))
                .collect();
            labels.sort();
            let name = format!("{}{{{}}}", key.key().name(), labels.join(","));
            let value = match value {
                DebugValue::Counter(n) => n as f64,
                DebugValue::Gauge(g) => g.into_inner(),
                DebugValue::Histogram(h) => h.len() as f64,
            };
            (name, value)
        })
        .collect()
}

fn get(m: &HashMap<String, f64>, name: &str) -> f64 {
    m.get(name).copied().unwrap_or(0.0)
}

/// Runs `f` on a thread of its own whose metrics go to a fresh debugging recorder.
fn with_recorder<F, Fut>(f: F) -> HashMap<String, f64>
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()>,
{
    std::thread::spawn(move || {
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        metrics::with_local_recorder(&recorder, || runtime.block_on(f()));
        snapshot(&snapshotter)
    })
    .join()
    .unwrap()
}

#[test]
fn exact_counts_after_a_scripted_mix() {
    let mut redis = RedisServer::start();
    let url = redis.url();
    // Stores on a Redis that is killed before any request: every check fails fast.
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let dead = runtime.block_on(async {
        let store = RedisStore::builder(&url)
            .command_timeout(Duration::from_millis(50))
            .build()
            .await
            .unwrap();
        redis.kill();
        store
    });
    let m = with_recorder(move || async move {
        let key = || Header::new("x-api-key").unwrap();
        let basic = RateLimitLayer::builder("2/h".parse().unwrap())
            .policy("basic")
            .key(key())
            .skip(|req| req.uri.path() == "/healthz")
            .build()
            .unwrap();
        let dry = RateLimitLayer::builder("1/h".parse().unwrap())
            .policy("dry")
            .key(key())
            .dry_run(true)
            .build()
            .unwrap();
        let smooth = RateLimitLayer::builder("10/s;capacity=3".parse().unwrap())
            .policy("smooth")
            .key(key())
            .delay_after(1)
            .build()
            .unwrap();
        let open = RateLimitLayer::builder("5/h".parse().unwrap())
            .policy("open")
            .key(key())
            .store(dead.clone())
            .build()
            .unwrap();
        let closed = RateLimitLayer::builder("5/h".parse().unwrap())
            .policy("closed")
            .key(key())
            .store(dead.clone())
            .fail_mode(FailMode::Closed)
            .build()
            .unwrap();
        let fallback = RateLimitLayer::builder("1/h".parse().unwrap())
            .policy("fallback")
            .key(key())
            .store(CircuitBreaker::new(dead.clone()))
            .fail_mode(FailMode::Fallback { divisor: 1 })
            .build()
            .unwrap();
        let cached = RateLimitLayer::builder("1/h".parse().unwrap())
            .policy("cached")
            .key(key())
            .store(DenyCache::new(MemoryStore::new()))
            .build()
            .unwrap();
        let statuses = [
            send(&mut basic.layer(inner()), "k", "/", 3).await,
            send(&mut basic.layer(inner()), "k", "/healthz", 2).await,
            send(&mut dry.layer(inner()), "k", "/", 2).await,
            send(&mut smooth.layer(inner()), "k", "/", 2).await,
            send(&mut open.layer(inner()), "k", "/", 2).await,
            send(&mut closed.layer(inner()), "k", "/", 1).await,
            // The breaker opens after 3 failures; the fallback decides every one of them.
            send(&mut fallback.layer(inner()), "k", "/", 4).await,
            send(&mut cached.layer(inner()), "k", "/", 3).await,
        ];
        assert_eq!(
            statuses,
            [
                vec![200, 200, 429],
                vec![200, 200],
                vec![200, 200],
                vec![200, 200],
                vec![200, 200],
                vec![503],
                vec![200, 429, 429, 429],
                vec![200, 429, 429],
            ]
        );
    });
    let requests = |policy: &str, result: &str| {
        get(
            &m,
            &format!("tollgate_requests_total{{policy={policy},result={result}}}"),
        )
    };
    let expected = [
        ("basic", "allowed", 2.0),
        ("basic", "denied", 1.0),
        ("basic", "unlimited", 2.0),
        ("dry", "allowed", 1.0),
        ("dry", "dry_run_denied", 1.0),
        ("smooth", "allowed", 1.0),
        ("smooth", "delayed", 1.0),
        ("open", "fail_open", 2.0),
        ("closed", "fail_closed", 1.0),
        ("fallback", "fallback_allowed", 1.0),
        ("fallback", "fallback_denied", 3.0),
        ("cached", "allowed", 1.0),
        ("cached", "denied", 2.0),
    ];
    for (policy, result, n) in expected {
        assert_eq!(requests(policy, result), n, "{policy} {result}: {m:#?}");
    }
    // Each request was counted once: the sums match the requests sent.
    let total: f64 = m
        .iter()
        .filter(|(k, _)| k.starts_with("tollgate_requests_total"))
        .map(|(_, v)| v)
        .sum();
    assert_eq!(total, 19.0, "{m:#?}");
    assert_eq!(
        get(&m, "tollgate_request_delay_seconds{policy=smooth}"),
        1.0
    );
    // Store failures by kind: 2 + 1 + 3 failed calls to the dead Redis (refused, or timed out
    // while the connection retries), and one answered by the open breaker.
    // `label` is `kind` on the error counter, `outcome` on the duration histogram.
    let failed = |metric: &str, label: &str| -> f64 {
        ["connection", "timeout"]
            .iter()
            .map(|kind| get(&m, &format!("{metric}{{{label}={kind},store=redis}}")))
            .sum()
    };
    assert_eq!(failed("tollgate_store_errors_total", "kind"), 6.0, "{m:#?}");
    assert_eq!(
        get(
            &m,
            "tollgate_store_errors_total{kind=circuit_open,store=redis}"
        ),
        1.0,
        "{m:#?}"
    );
    // Every failed Redis call was timed.
    assert_eq!(
        failed("tollgate_store_duration_seconds", "outcome"),
        6.0,
        "{m:#?}"
    );
    assert_eq!(get(&m, "tollgate_breaker_state{store=redis}"), 2.0);
    assert_eq!(
        get(
            &m,
            "tollgate_breaker_transitions_total{store=redis,to=open}"
        ),
        1.0
    );
    assert!(get(&m, "tollgate_deny_cache_hits_total{}") >= 1.0, "{m:#?}");
    // No label holds a client's identity.
    assert!(m.keys().all(|k| !k.contains("=k,") && !k.contains("=k}")));
}

/// 10,000 distinct clients add no series: labels are bounded by the configuration.
#[test]
fn series_do_not_grow_with_clients() {
    let m = with_recorder(|| async {
        let layer = RateLimitLayer::builder("1/h".parse().unwrap())
            .policy("api")
            .key(Header::new("x-api-key").unwrap())
            .build()
            .unwrap();
        let mut svc = layer.layer(inner());
        for i in 0..10 {
            send(&mut svc, &format!("client-{i}"), "/", 2).await;
        }
    });
    let many = with_recorder(|| async {
        let layer = RateLimitLayer::builder("1/h".parse().unwrap())
            .policy("api")
            .key(Header::new("x-api-key").unwrap())
            .build()
            .unwrap();
        let mut svc = layer.layer(inner());
        for i in 0..10_000 {
            send(&mut svc, &format!("client-{i}"), "/", 2).await;
        }
    });
    // The memory store's own series (at most three: keys, evictions by two reasons) appear
    // once a sweep has run; nothing else is added, and nothing per client.
    let layer_series = |m: &HashMap<String, f64>| {
        m.keys()
            .filter(|k| !k.starts_with("tollgate_memory_"))
            .count()
    };
    assert_eq!(layer_series(&m), layer_series(&many), "{many:#?}");
    assert!(many.len() <= m.len() + 3, "{many:#?}");
    assert_eq!(
        get(&many, "tollgate_requests_total{policy=api,result=allowed}"),
        10_000.0
    );
    assert_eq!(
        get(&many, "tollgate_requests_total{policy=api,result=denied}"),
        10_000.0
    );
    assert!(many.keys().all(|k| !k.contains("client-")));
}

/// A MemoryStore too small for its clients says so: evictions of states that were not fresh
/// yet (`reason=capacity`), and its size as a gauge.
#[test]
fn a_full_memory_store_reports_capacity_evictions() {
    let m = with_recorder(|| async {
        let store = MemoryStore::builder().max_keys(64).build().unwrap();
        let layer = RateLimitLayer::builder("10/h".parse().unwrap())
            .policy("small")
            .key(Header::new("x-api-key").unwrap())
            .store(store)
            .build()
            .unwrap();
        let mut svc = layer.layer(inner());
        for i in 0..5_000 {
            send(&mut svc, &format!("client-{i}"), "/", 1).await;
        }
    });
    let capacity = get(&m, "tollgate_memory_evictions_total{reason=capacity}");
    assert!(capacity > 0.0, "{m:#?}");
    let keys = get(&m, "tollgate_memory_keys{}");
    assert!(keys > 0.0 && keys <= 64.0, "{m:#?}");
}

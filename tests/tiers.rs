//! Tiers over real HTTP: a quota per client, chosen per request, changed at runtime, on the
//! memory store and through the deny cache.

mod common;

use common::http::serve;

use std::time::Duration;

use axum::Router;
use axum::routing::get;
use axum::{Extension, Json};
use tollgate::key::Header;
use tollgate::{
    ConfigError, Decision, DenyCache, ManualClock, MemoryStore, RateLimitLayer, Store, Tiers,
};

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

/// An app whose handler echoes the tier (policy) that decided.
fn app<St: Store + Clone>(layer: RateLimitLayer<St, Header>) -> Router {
    Router::new()
        .route(
            "/",
            get(|Extension(d): Extension<Decision>| async move {
                Json(serde_json::json!({ "tier": d.policy(), "remaining": d.remaining() }))
            }),
        )
        .layer(layer)
}

/// Sends one request as `key`; returns the status and the RateLimit / RateLimit-Policy values.
async fn hit(c: &reqwest::Client, addr: std::net::SocketAddr, key: &str) -> (u16, String, String) {
    let res = c
        .get(format!("http://{addr}/"))
        .header("x-api-key", key)
        .send()
        .await
        .unwrap();
    let field = |name: &str| {
        res.headers()
            .get(name)
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default()
    };
    (
        res.status().as_u16(),
        field("ratelimit"),
        field("ratelimit-policy"),
    )
}

fn manual_store() -> (MemoryStore<ManualClock>, ManualClock) {
    let clock = ManualClock::new();
    let store = MemoryStore::builder().clock(clock.clone()).build().unwrap();
    (store, clock)
}

#[tokio::test]
async fn two_identities_on_different_tiers_get_their_own_limits() {
    let tiers: Tiers = "free=2/m,pro=5/m;capacity=4".parse().unwrap();
    let pro = tiers.get("pro").unwrap();
    let (store, _clock) = manual_store();
    let layer = RateLimitLayer::builder("1/s".parse().unwrap())
        .store(store)
        .key(Header::new("x-api-key").unwrap())
        .tiers(tiers)
        .select_tier(move |_req, key| key.as_bytes().starts_with(b"pro-").then_some(pro))
        .build()
        .unwrap();
    let addr = serve(app(layer.clone())).await;
    let c = client();
    let free: Vec<_> = futures_join(&c, addr, "free-1", 3).await;
    assert_eq!(free[0].2, "\"free\";q=2;w=60");
    assert_eq!(
        free.iter().map(|r| r.0).collect::<Vec<_>>(),
        [200, 200, 429]
    );
    let pro_runs = futures_join(&c, addr, "pro-1", 5).await;
    assert_eq!(pro_runs[0].2, "\"pro\";q=5;w=60");
    assert_eq!(pro_runs[0].1, "\"pro\";r=3;t=12");
    assert_eq!(
        pro_runs.iter().map(|r| r.0).collect::<Vec<_>>(),
        [200, 200, 200, 200, 429]
    );
    let stats = layer.stats();
    assert_eq!((stats.allowed, stats.denied), (6, 2));
}

async fn futures_join(
    c: &reqwest::Client,
    addr: std::net::SocketAddr,
    key: &str,
    n: usize,
) -> Vec<(u16, String, String)> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(hit(c, addr, key).await);
    }
    out
}

/// An upgrade takes effect on the very next request, also through a deny cache that holds the
/// old tier's denial; a downgrade never admits more than the new tier allows from then on.
#[tokio::test]
async fn runtime_changes_take_effect_on_the_next_request() {
    let clock = ManualClock::new();
    let memory = MemoryStore::builder().clock(clock.clone()).build().unwrap();
    let store = DenyCache::new(memory).clock(clock.clone());
    let layer = RateLimitLayer::builder("1/s".parse().unwrap())
        .store(store.clone())
        .key(Header::new("x-api-key").unwrap())
        .tiers("free=1/h,pro=3/h".parse().unwrap())
        .build()
        .unwrap();
    let addr = serve(app(layer.clone())).await;
    let c = client();
    assert_eq!(hit(&c, addr, "k").await.0, 200);
    // Denied twice: the second from the deny cache's local entry.
    assert_eq!(hit(&c, addr, "k").await.0, 429);
    assert_eq!(hit(&c, addr, "k").await.0, 429);
    assert!(store.stats().local_denials >= 1, "{:?}", store.stats());
    // Upgrade: the very next request is decided by "pro", fresh for this client.
    assert_eq!(layer.set_tier("k", "pro").unwrap(), 1);
    assert_eq!(layer.tier_of("k"), Some("pro"));
    let (status, field, policy) = hit(&c, addr, "k").await;
    assert_eq!((status, field.as_str()), (200, "\"pro\";r=2;t=1200"));
    assert_eq!(policy, "\"pro\";q=3;w=3600");
    assert_eq!(hit(&c, addr, "k").await.0, 200);
    assert_eq!(hit(&c, addr, "k").await.0, 200);
    assert_eq!(hit(&c, addr, "k").await.0, 429);
    // Downgrade: the client's own "free" state, still exhausted; nothing carried over.
    assert_eq!(layer.set_tier("k", "free").unwrap(), 1);
    assert_eq!(hit(&c, addr, "k").await.0, 429);
    // An hour later the free tier admits exactly its own quota, no more.
    clock.advance(Duration::from_secs(3600));
    let after: Vec<u16> = futures_join(&c, addr, "k", 3)
        .await
        .iter()
        .map(|r| r.0)
        .collect();
    assert_eq!(after, [200, 429, 429]);
    // Unknown tiers are refused, and leave the assignment as it was.
    let err = layer.set_tier("k", "gold").unwrap_err();
    assert!(matches!(err, ConfigError::UnknownTier { .. }), "{err}");
    assert!(err.to_string().contains("free, pro"), "{err}");
    assert_eq!(layer.tier_of("k"), Some("free"));
    // Cleared: back to the default (here the same "free").
    assert_eq!(layer.clear_tier("k"), 1);
    assert_eq!(layer.tier_of("k"), None);
}

#[test]
fn tier_configuration_is_checked_at_build() {
    let base = || RateLimitLayer::builder("1/s".parse().unwrap());
    // A selector without tiers has nothing to choose from.
    let err = base().select_tier(|_, _| None).build().unwrap_err();
    assert!(err.to_string().contains("Builder::tiers"), "{err}");
    // Tier names share a store's policy namespace: the same name with other quotas conflicts.
    let store = MemoryStore::new();
    base()
        .store(store.clone())
        .tiers("free=1/s,pro=2/s".parse().unwrap())
        .build()
        .unwrap();
    let err = base()
        .store(store.clone())
        .tiers("free=1/s,pro=3/s".parse().unwrap())
        .build()
        .unwrap_err();
    assert!(matches!(err, ConfigError::PolicyConflict { .. }), "{err}");
    // Runtime assignments are bounded.
    let layer = base()
        .key(Header::new("x-api-key").unwrap())
        .tiers("free=1/s,pro=2/s".parse().unwrap())
        .max_tier_assignments(2)
        .build()
        .unwrap();
    layer.set_tier("a", "pro").unwrap();
    layer.set_tier("b", "pro").unwrap();
    layer
        .set_tier("a", "free")
        .expect("re-assigning is not a new one");
    assert!(layer.set_tier("c", "pro").is_err());
}

/// A selector that returns a handle of another `Tiers` set gets the default tier.
#[tokio::test]
async fn a_foreign_tier_handle_falls_back_to_the_default_tier() {
    let other: Tiers = "free=1/s,pro=100/s".parse().unwrap();
    let foreign = other.get("pro").unwrap();
    let layer = RateLimitLayer::builder("1/s".parse().unwrap())
        .key(Header::new("x-api-key").unwrap())
        .tiers("free=1/h,pro=100/h".parse().unwrap())
        .select_tier(move |_, _| Some(foreign))
        .build()
        .unwrap();
    let addr = serve(app(layer)).await;
    let c = client();
    let (status, _, policy) = hit(&c, addr, "k").await;
    assert_eq!((status, policy.as_str()), (200, "\"free\";q=1;w=3600"));
    assert_eq!(hit(&c, addr, "k").await.0, 429);
}

/// 100 concurrent first requests of one key: the asynchronous resolver is called once, and every
/// request is decided under the tier it answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_resolver_is_called_once_for_a_burst_of_first_requests() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let calls = Arc::new(AtomicUsize::new(0));
    let seen = Arc::clone(&calls);
    let layer = RateLimitLayer::builder("1/s".parse().unwrap())
        .key(Header::new("x-api-key").unwrap())
        .tiers("free=1/h,pro=1000/h".parse().unwrap())
        .resolve_tier(
            move |key| {
                let seen = Arc::clone(&seen);
                async move {
                    seen.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    let pro = key.as_bytes().starts_with(b"pro");
                    Ok::<_, std::io::Error>(pro.then(|| "pro".to_owned()))
                }
            },
            tollgate::TierCache::default(),
        )
        .build()
        .unwrap();
    let addr = serve(app(layer.clone())).await;
    let c = client();
    let burst: Vec<_> = (0..100)
        .map(|_| {
            let c = c.clone();
            tokio::spawn(async move { hit(&c, addr, "pro-key").await })
        })
        .collect();
    let mut ok = 0;
    for task in burst {
        let (status, _, policy) = task.await.unwrap();
        assert_eq!(policy, "\"pro\";q=1000;w=3600");
        ok += usize::from(status == 200);
    }
    assert_eq!(ok, 100);
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "one lookup for the whole burst"
    );
    assert_eq!(layer.tier_lookups(), 1);
    // Cached from now on; another key is looked up once too, and gets the default tier.
    for _ in 0..3 {
        assert_eq!(hit(&c, addr, "pro-key").await.0, 200);
    }
    assert_eq!(hit(&c, addr, "someone").await.2, "\"free\";q=1;w=3600");
    assert_eq!(hit(&c, addr, "someone").await.0, 429);
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    // A runtime assignment beats the resolver; clearing it asks the resolver again.
    layer.set_tier("someone", "pro").unwrap();
    assert_eq!(hit(&c, addr, "someone").await.0, 200);
    layer.clear_tier("someone");
    assert_eq!(hit(&c, addr, "someone").await.0, 429);
    assert_eq!(calls.load(Ordering::SeqCst), 3);
}

/// A resolver that fails or times out is a store failure: the fail mode decides, visibly.
#[tokio::test]
async fn a_failing_resolver_follows_the_fail_mode() {
    use tollgate::{FailMode, TierCache};
    let build = |mode: FailMode, slow: bool| {
        RateLimitLayer::builder("1/s".parse().unwrap())
            .key(Header::new("x-api-key").unwrap())
            .tiers("free=1/h,pro=1000/h".parse().unwrap())
            .fail_mode(mode)
            .degraded_header(true)
            .resolve_tier(
                move |_key| async move {
                    if slow {
                        tokio::time::sleep(Duration::from_secs(5)).await;
                    }
                    Err::<Option<String>, _>(std::io::Error::other("plan database down"))
                },
                TierCache::default().timeout(Duration::from_millis(50)),
            )
            .build()
            .unwrap()
    };
    let c = client();
    for slow in [false, true] {
        let closed = build(FailMode::Closed, slow);
        let addr = serve(app(closed.clone())).await;
        let res = c
            .get(format!("http://{addr}/"))
            .header("x-api-key", "k")
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 503, "slow={slow}");
        assert_eq!(res.headers()["x-ratelimit-degraded"], "fail-closed");
        assert_eq!(closed.stats().store_errors, 1);
        let open = build(FailMode::Open, slow);
        let addr = serve(app(open.clone())).await;
        for _ in 0..2 {
            let res = c
                .get(format!("http://{addr}/"))
                .header("x-api-key", "k")
                .send()
                .await
                .unwrap();
            assert_eq!(res.status(), 200, "slow={slow}");
            assert_eq!(res.headers()["x-ratelimit-degraded"], "fail-open");
        }
        // Failures are not cached: each request asked again.
        assert_eq!(open.stats().store_errors, 2);
        assert_eq!(open.tier_lookups(), 2);
    }
    // A fallback limiter decides under the default tier's divided quota.
    let fallback = build(FailMode::Fallback { divisor: 1 }, false);
    let addr = serve(app(fallback.clone())).await;
    let (first, _, policy) = hit(&c, addr, "k").await;
    assert_eq!((first, policy.as_str()), (200, "\"free\";q=1;w=3600"));
    assert_eq!(hit(&c, addr, "k").await.0, 429);
}

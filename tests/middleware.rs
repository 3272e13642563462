//! The middleware over real HTTP on loopback: axum::serve on port 0, reqwest as the client.
//! Stores run on a manual clock, so no test sleeps to wait for refills.

mod common;

use common::http::serve;

use std::future::{Ready, ready};
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::routing::{get, post};
use axum::{Extension, Router};
use http::StatusCode;
use tollgate::key::{ApiKeyOrIp, ClientIp, ForwardedHeader, Global, Header};
use tollgate::{
    ConfigError, Decision, FailMode, HeaderStyle, Key, ManualClock, MemoryStore, Policy, Quota,
    RateLimitLayer, RejectionBody, ResetStyle, Store, StoreError, StoreErrorKind,
};

/// A client whose requests come from `local` (any 127.0.0.0/8 address works on loopback).
fn client_from(local: &str) -> reqwest::Client {
    reqwest::Client::builder()
        .local_address(local.parse::<IpAddr>().unwrap())
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

fn client() -> reqwest::Client {
    client_from("127.0.0.1")
}

fn manual_store() -> (MemoryStore<ManualClock>, ManualClock) {
    let clock = ManualClock::new();
    let store = MemoryStore::builder().clock(clock.clone()).build().unwrap();
    (store, clock)
}

fn hello() -> Router {
    Router::new().route("/", get(|| async { "hello" }))
}

fn header<'a>(res: &'a reqwest::Response, name: &str) -> Option<&'a str> {
    res.headers().get(name).map(|v| v.to_str().unwrap())
}

/// Parses an IETF RateLimit / RateLimit-Policy value as an RFC 9651 List of Strings with
/// Integer parameters, as clients will.
fn sf_members(value: &str) -> Vec<(String, Vec<(String, i64)>)> {
    let list: sfv::List = sfv::Parser::new(value)
        .parse()
        .unwrap_or_else(|e| panic!("{value:?} is not a structured-field list: {e}"));
    list.into_iter()
        .map(|entry| match entry {
            sfv::ListEntry::Item(item) => {
                let name = item
                    .bare_item
                    .as_string()
                    .unwrap_or_else(|| panic!("member of {value:?} is not a String"))
                    .as_str()
                    .to_owned();
                let params = item
                    .params
                    .iter()
                    .map(|(k, v)| {
                        let n = v.as_integer().expect("integer parameter");
                        (k.as_str().to_owned(), i64::from(n))
                    })
                    .collect();
                (name, params)
            }
            sfv::ListEntry::InnerList(_) => panic!("inner list in {value:?}"),
        })
        .collect()
}

#[tokio::test]
async fn denial_is_429_with_exact_headers() {
    let (store, _clock) = manual_store();
    let layer = RateLimitLayer::builder("5/5s".parse().unwrap())
        .store(store)
        .key(Global)
        .headers(HeaderStyle::Both)
        .build()
        .unwrap();
    let addr = serve(hello().layer(layer)).await;
    let c = client();
    for left in (0..5).rev() {
        let res = c.get(format!("http://{addr}/")).send().await.unwrap();
        assert_eq!(res.status(), 200);
        assert_eq!(
            header(&res, "ratelimit"),
            Some(format!("\"default\";r={left};t=1").as_str())
        );
        assert_eq!(
            header(&res, "ratelimit-policy"),
            Some("\"default\";q=5;w=5")
        );
        assert_eq!(header(&res, "x-ratelimit-limit"), Some("5"));
        assert_eq!(
            header(&res, "x-ratelimit-remaining"),
            Some(left.to_string().as_str())
        );
        assert_eq!(
            header(&res, "x-ratelimit-reset"),
            Some((5 - left).to_string().as_str())
        );
        assert_eq!(header(&res, "retry-after"), None);
        assert_eq!(res.text().await.unwrap(), "hello");
    }
    let res = c.get(format!("http://{addr}/")).send().await.unwrap();
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(header(&res, "retry-after"), Some("1"));
    assert_eq!(header(&res, "ratelimit"), Some("\"default\";r=0;t=1"));
    assert_eq!(
        header(&res, "ratelimit-policy"),
        Some("\"default\";q=5;w=5")
    );
    assert_eq!(header(&res, "x-ratelimit-remaining"), Some("0"));
    assert_eq!(header(&res, "x-ratelimit-reset"), Some("5"));
    assert_eq!(
        header(&res, "content-type"),
        Some("text/plain; charset=utf-8")
    );
    assert_eq!(
        res.text().await.unwrap(),
        "Too Many Requests: policy \"default\", retry after 1 s\n"
    );
}

#[tokio::test]
async fn sub_second_retry_is_never_zero() {
    // V2: 5 per second; the 6th request waits 200 ms, which is sent as Retry-After: 1.
    let (store, clock) = manual_store();
    let layer = RateLimitLayer::builder("5/s".parse().unwrap())
        .store(store)
        .key(Global)
        .build()
        .unwrap();
    let addr = serve(hello().layer(layer)).await;
    let c = client();
    for _ in 0..5 {
        assert_eq!(
            c.get(format!("http://{addr}/"))
                .send()
                .await
                .unwrap()
                .status(),
            200
        );
    }
    for advance_ms in [0, 150] {
        clock.advance(Duration::from_millis(advance_ms));
        let res = c.get(format!("http://{addr}/")).send().await.unwrap();
        assert_eq!(res.status(), 429);
        assert_eq!(header(&res, "retry-after"), Some("1"));
    }
    clock.advance(Duration::from_millis(50));
    let res = c.get(format!("http://{addr}/")).send().await.unwrap();
    assert_eq!(res.status(), 200, "allowed exactly at retry_after");
}

#[tokio::test]
async fn stacked_layers_all_must_pass_and_a_denial_charges_no_later_layer() {
    let store = MemoryStore::new();
    let global = RateLimitLayer::builder("2/h".parse().unwrap())
        .store(store.clone())
        .key(Global)
        .build()
        .unwrap();
    let route = RateLimitLayer::builder("5/h".parse().unwrap())
        .policy("expensive")
        .store(store.clone())
        .key(Global)
        .build()
        .unwrap();
    let app = Router::new()
        .route(
            "/expensive",
            get(|| async { "costly" }).route_layer(route.clone()),
        )
        .route("/cheap", get(|| async { "cheap" }))
        .layer(global.clone());
    let addr = serve(app).await;
    let c = client();
    for left in [1, 0] {
        let res = c
            .get(format!("http://{addr}/expensive"))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
        let members = sf_members(header(&res, "ratelimit").unwrap());
        assert_eq!(members.len(), 2);
        assert_eq!(members[0].0, "default");
        assert_eq!(members[0].1[0], ("r".into(), left));
        assert_eq!(members[1].0, "expensive");
        let policies = sf_members(header(&res, "ratelimit-policy").unwrap());
        assert_eq!(
            policies,
            vec![
                ("default".into(), vec![("q".into(), 2), ("w".into(), 3600)]),
                (
                    "expensive".into(),
                    vec![("q".into(), 5), ("w".into(), 3600)]
                ),
            ]
        );
    }
    // The global layer (outer) denies: the route layer never runs and is not charged.
    for _ in 0..3 {
        let res = c
            .get(format!("http://{addr}/expensive"))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 429);
        assert_eq!(sf_members(header(&res, "ratelimit").unwrap()).len(), 1);
    }
    let peek = store
        .check(route.policy(), &Key::from_static("global"), 0)
        .await
        .unwrap();
    assert_eq!(
        peek.remaining(),
        3,
        "only the two admitted requests were charged"
    );
    assert_eq!(global.stats().denied, 3);
    assert_eq!(route.stats().allowed, 2);
}

/// An inner (route) layer that rejects a request makes the outer layers give their charges
/// back, as nginx charges none of its `limit_req` zones when one rejects: the request never
/// reached the service. A dry-run denial inside lets the request through and keeps them.
#[tokio::test]
async fn an_inner_layers_rejection_gives_the_outer_charge_back() {
    for dry_run in [false, true] {
        let store = MemoryStore::new();
        let global = RateLimitLayer::builder("100/h".parse().unwrap())
            .store(store.clone())
            .key(Global)
            .build()
            .unwrap();
        let route = RateLimitLayer::builder("1/h".parse().unwrap())
            .policy("expensive")
            .store(store.clone())
            .key(Global)
            .dry_run(dry_run)
            .build()
            .unwrap();
        let app = Router::new()
            .route("/expensive", get(|| async { "costly" }).route_layer(route))
            .layer(global.clone());
        let addr = serve(app).await;
        let c = client();
        let res = c
            .get(format!("http://{addr}/expensive"))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
        let res = c
            .get(format!("http://{addr}/expensive"))
            .send()
            .await
            .unwrap();
        let global_state = store
            .check(global.policy(), &Key::from_static("global"), 0)
            .await
            .unwrap();
        let members = sf_members(header(&res, "ratelimit").unwrap());
        assert_eq!(members[0].0, "default");
        assert_eq!(members[1].0, "expensive");
        if dry_run {
            assert_eq!(
                res.status(),
                200,
                "a dry-run denial lets the request through"
            );
            assert_eq!(
                global_state.remaining(),
                98,
                "both requests reached the service"
            );
            assert_eq!(global.stats().refunds, 0);
            continue;
        }
        assert_eq!(res.status(), 429);
        assert_eq!(header(&res, "retry-after"), Some("3600"));
        // Both policies report on the 429, outer first, the outer one as given back; the
        // Retry-After is the denying layer's.
        assert_eq!(members[0].1[0], ("r".into(), 99));
        assert_eq!(members[1].1, vec![("r".into(), 0), ("t".into(), 3600)]);
        assert_eq!(
            global_state.remaining(),
            99,
            "only the admitted request is charged"
        );
        assert_eq!(global.stats().refunds, 1);
        // Rejected again and again: the outer policy stays where the one admitted request left it.
        for _ in 0..5 {
            let res = c
                .get(format!("http://{addr}/expensive"))
                .send()
                .await
                .unwrap();
            assert_eq!(res.status(), 429);
        }
        let global_state = store
            .check(global.policy(), &Key::from_static("global"), 0)
            .await
            .unwrap();
        assert_eq!(global_state.remaining(), 99);
    }
}

#[tokio::test]
async fn each_key_kind_separates_clients() {
    let quota: Quota = "1/h".parse().unwrap();
    let ip = RateLimitLayer::new(quota, ClientIp::new());
    let hdr = RateLimitLayer::builder(quota)
        .key(Header::new("x-api-key").unwrap())
        .build()
        .unwrap();
    let either = RateLimitLayer::builder(quota)
        .key(ApiKeyOrIp::new(
            Header::new("x-api-key").unwrap(),
            ClientIp::new(),
        ))
        .build()
        .unwrap();
    let global = RateLimitLayer::builder(quota).key(Global).build().unwrap();
    let closure = RateLimitLayer::builder(quota)
        .key(|req: &http::request::Parts| {
            let tenant = req.headers.get("x-tenant")?.to_str().ok()?;
            (tenant != "internal").then(|| format!("tenant:{tenant}"))
        })
        .build()
        .unwrap();
    let app = Router::new()
        .route("/ip", get(|| async { "" }).route_layer(ip))
        .route("/header", get(|| async { "" }).route_layer(hdr))
        .route("/either", get(|| async { "" }).route_layer(either))
        .route("/global", get(|| async { "" }).route_layer(global))
        .route("/closure", get(|| async { "" }).route_layer(closure));
    let addr = serve(app).await;
    let (a, b) = (client_from("127.0.0.2"), client_from("127.0.0.3"));
    let status = |c: &reqwest::Client, path: &str, headers: &[(&str, &str)]| {
        let mut req = c.get(format!("http://{addr}{path}"));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        async move { req.send().await.unwrap().status().as_u16() }
    };
    // By IP: each loopback address has its own bucket.
    assert_eq!(status(&a, "/ip", &[]).await, 200);
    assert_eq!(status(&a, "/ip", &[]).await, 429);
    assert_eq!(status(&b, "/ip", &[]).await, 200);
    // By header: per value; no header = not limited.
    assert_eq!(status(&a, "/header", &[("x-api-key", "k1")]).await, 200);
    assert_eq!(status(&b, "/header", &[("x-api-key", "k1")]).await, 429);
    assert_eq!(status(&a, "/header", &[("x-api-key", "k2")]).await, 200);
    for _ in 0..3 {
        assert_eq!(status(&a, "/header", &[]).await, 200);
    }
    // API key else IP.
    assert_eq!(status(&a, "/either", &[("x-api-key", "k1")]).await, 200);
    assert_eq!(status(&a, "/either", &[("x-api-key", "k1")]).await, 429);
    assert_eq!(status(&a, "/either", &[]).await, 200);
    assert_eq!(status(&a, "/either", &[]).await, 429);
    assert_eq!(status(&b, "/either", &[]).await, 200);
    // Global: everyone shares one bucket.
    assert_eq!(status(&a, "/global", &[]).await, 200);
    assert_eq!(status(&b, "/global", &[]).await, 429);
    // Closure, with None as the allowlist.
    assert_eq!(status(&a, "/closure", &[("x-tenant", "t1")]).await, 200);
    assert_eq!(status(&b, "/closure", &[("x-tenant", "t1")]).await, 429);
    for _ in 0..3 {
        assert_eq!(
            status(&a, "/closure", &[("x-tenant", "internal")]).await,
            200
        );
    }
}

#[tokio::test]
async fn unlimited_requests_carry_no_headers() {
    let layer = RateLimitLayer::builder("1/h".parse().unwrap())
        .key(Header::new("x-api-key").unwrap())
        .build()
        .unwrap();
    let addr = serve(hello().layer(layer.clone())).await;
    let res = client()
        .get(format!("http://{addr}/"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(header(&res, "ratelimit"), None);
    assert_eq!(layer.stats().unlimited, 1);
}

#[tokio::test]
async fn spoofed_forwarding_headers_from_untrusted_peers_are_ignored() {
    let ip = ClientIp::new().trust("127.0.0.2/32").unwrap();
    let layer = RateLimitLayer::new("1/h".parse().unwrap(), ip);
    let addr = serve(hello().layer(layer)).await;
    let (proxy, stranger) = (client_from("127.0.0.2"), client_from("127.0.0.3"));
    let send = |c: &reqwest::Client, xff: &str| {
        let req = c
            .get(format!("http://{addr}/"))
            .header("x-forwarded-for", xff);
        async move { req.send().await.unwrap().status().as_u16() }
    };
    // The trusted proxy forwards two different clients: two buckets.
    assert_eq!(send(&proxy, "1.2.3.4").await, 200);
    assert_eq!(send(&proxy, "5.6.7.8").await, 200);
    assert_eq!(
        send(&proxy, "6.6.6.6, 1.2.3.4").await,
        429,
        "rightmost untrusted hop"
    );
    // The stranger's headers are ignored: it is keyed by its own address however it lies.
    assert_eq!(send(&stranger, "9.9.9.9").await, 200);
    assert_eq!(send(&stranger, "10.10.10.10").await, 429);
    assert_eq!(send(&stranger, "1.1.1.1, 2.2.2.2").await, 429);
}

#[tokio::test]
async fn forwarded_header_with_ipv6_is_grouped_by_prefix() {
    let ip = ClientIp::new()
        .trust("127.0.0.0/8")
        .unwrap()
        .header(ForwardedHeader::Forwarded);
    let layer = RateLimitLayer::new("1/h".parse().unwrap(), ip);
    let addr = serve(hello().layer(layer)).await;
    let c = client();
    let send = |fwd: &'static str| {
        let req = c.get(format!("http://{addr}/")).header("forwarded", fwd);
        async move { req.send().await.unwrap().status().as_u16() }
    };
    assert_eq!(send("for=\"[2001:db8:cafe::17]:4711\"").await, 200);
    // Same /56: same bucket.
    assert_eq!(send("for=\"[2001:db8:cafe:ff::1]\"").await, 429);
    // Another /56.
    assert_eq!(send("for=\"[2001:db8:cafe:100::1]\"").await, 200);
}

#[tokio::test]
async fn hostile_header_values_get_clean_responses() {
    let layer = RateLimitLayer::builder("1/h".parse().unwrap())
        .key(ApiKeyOrIp::new(
            Header::new("x-api-key").unwrap(),
            ClientIp::new(),
        ))
        .build()
        .unwrap();
    let store = layer.store().clone();
    let addr = serve(hello().layer(layer.clone())).await;
    let c = client();
    let latin1 = http::HeaderValue::from_bytes(b"caf\xe9-\xff\xfe").unwrap();
    let latin2 = http::HeaderValue::from_bytes(b"caf\xe9-\xff\xfd").unwrap();
    let send = |v: http::HeaderValue| {
        let req = c.get(format!("http://{addr}/")).header("x-api-key", v);
        async move { req.send().await.unwrap().status().as_u16() }
    };
    assert_eq!(send(latin1.clone()).await, 200);
    assert_eq!(send(latin1).await, 429);
    assert_eq!(
        send(latin2).await,
        200,
        "distinct non-UTF-8 keys stay distinct"
    );
    let big_a = http::HeaderValue::from_str(&"a".repeat(64 * 1024)).unwrap();
    let big_b = http::HeaderValue::from_str(&format!("{}b", "a".repeat(64 * 1024 - 1))).unwrap();
    assert_eq!(send(big_a.clone()).await, 200);
    assert_eq!(send(big_a).await, 429);
    assert_eq!(
        send(big_b).await,
        200,
        "64 KiB keys differing in the last byte"
    );
    // Garbage forwarding headers from an untrusted peer change nothing.
    let res = c
        .get(format!("http://{addr}/"))
        .header(
            "x-forwarded-for",
            http::HeaderValue::from_bytes(b"\xff, ,,[::").unwrap(),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(
        store.len(),
        5,
        "each client's key is stored once, bounded in size"
    );
}

#[tokio::test]
async fn dry_run_never_denies_but_reports() {
    let layer = RateLimitLayer::builder("1/h".parse().unwrap())
        .key(Global)
        .dry_run(true)
        .build()
        .unwrap();
    let addr = serve(hello().layer(layer.clone())).await;
    let c = client();
    for _ in 0..3 {
        let res = c.get(format!("http://{addr}/")).send().await.unwrap();
        assert_eq!(res.status(), 200);
        assert_eq!(header(&res, "ratelimit"), Some("\"default\";r=0;t=3600"));
        assert_eq!(header(&res, "retry-after"), None);
    }
    let stats = layer.stats();
    assert_eq!(
        (stats.allowed, stats.dry_run_denied, stats.denied),
        (1, 2, 0)
    );
}

#[tokio::test]
async fn skip_bypasses_the_limit() {
    let layer = RateLimitLayer::builder("1/h".parse().unwrap())
        .key(Global)
        .skip(|req| req.uri.path() == "/healthz")
        .build()
        .unwrap();
    let app = Router::new()
        .route("/", get(|| async { "" }))
        .route("/healthz", get(|| async { "ok" }))
        .layer(layer);
    let addr = serve(app).await;
    let c = client();
    assert_eq!(
        c.get(format!("http://{addr}/"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        c.get(format!("http://{addr}/"))
            .send()
            .await
            .unwrap()
            .status(),
        429
    );
    for _ in 0..5 {
        let res = c
            .get(format!("http://{addr}/healthz"))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
        assert_eq!(header(&res, "ratelimit"), None);
    }
}

#[tokio::test]
async fn weighted_costs_peeks_and_impossible_requests() {
    let (store, _clock) = manual_store();
    let layer = RateLimitLayer::builder("5/5s".parse().unwrap())
        .store(store)
        .key(Global)
        .cost(|req| match (req.method.as_str(), req.uri.path()) {
            (_, "/peek") => 0,
            (_, "/huge") => 6,
            ("POST", _) => 3,
            _ => 1,
        })
        .build()
        .unwrap();
    let app = Router::new()
        .route("/", get(|| async { "" }).post(|| async { "" }))
        .route("/peek", get(|| async { "" }))
        .route("/huge", get(|| async { "" }))
        .layer(layer);
    let addr = serve(app).await;
    let c = client();
    for _ in 0..10 {
        let res = c.get(format!("http://{addr}/peek")).send().await.unwrap();
        assert_eq!(res.status(), 200);
        assert_eq!(header(&res, "ratelimit"), Some("\"default\";r=5;t=0"));
    }
    let res = c.get(format!("http://{addr}/huge")).send().await.unwrap();
    assert_eq!(res.status(), 429);
    assert_eq!(
        header(&res, "retry-after"),
        None,
        "a request that can never pass"
    );
    assert!(res.text().await.unwrap().contains("costs more than"));
    let res = c.post(format!("http://{addr}/")).send().await.unwrap();
    assert_eq!(header(&res, "ratelimit"), Some("\"default\";r=2;t=1"));
    let res = c.post(format!("http://{addr}/")).send().await.unwrap();
    assert_eq!(res.status(), 429);
    assert_eq!(header(&res, "retry-after"), Some("1"));
    assert_eq!(header(&res, "ratelimit"), Some("\"default\";r=2;t=1"));
    let res = c.get(format!("http://{addr}/")).send().await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(header(&res, "ratelimit"), Some("\"default\";r=1;t=1"));
}

#[tokio::test]
async fn decision_is_in_the_request_extensions() {
    let layer = RateLimitLayer::builder("3/h".parse().unwrap())
        .key(Global)
        .build()
        .unwrap();
    let app = Router::new()
        .route(
            "/",
            get(|Extension(d): Extension<Decision>| async move {
                format!("{} {}", d.remaining(), d.capacity())
            }),
        )
        .layer(layer);
    let addr = serve(app).await;
    let res = client()
        .get(format!("http://{addr}/"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.text().await.unwrap(), "2 3");
}

#[tokio::test]
async fn status_body_and_header_styles_are_configurable() {
    let (store, _clock) = manual_store();
    let layer = RateLimitLayer::builder("1/m".parse().unwrap())
        .store(store)
        .key(Global)
        .status(http::StatusCode::SERVICE_UNAVAILABLE)
        .body(RejectionBody::Json)
        .headers(HeaderStyle::Legacy)
        .reset_style(ResetStyle::Epoch)
        .build()
        .unwrap();
    let addr = serve(hello().layer(layer)).await;
    let c = client();
    c.get(format!("http://{addr}/")).send().await.unwrap();
    let res = c.get(format!("http://{addr}/")).send().await.unwrap();
    assert_eq!(res.status(), 503);
    assert_eq!(header(&res, "ratelimit"), None);
    assert_eq!(header(&res, "content-type"), Some("application/json"));
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let reset: u64 = header(&res, "x-ratelimit-reset").unwrap().parse().unwrap();
    assert!(
        (now + 59..=now + 61).contains(&reset),
        "epoch reset {reset} vs now {now}"
    );
    let body: serde_json::Value = res.json().await.unwrap();
    assert_eq!(
        body,
        serde_json::json!({"error": "rate_limited", "policy": "default", "retry_after": 60})
    );

    let quiet = RateLimitLayer::builder("5/m".parse().unwrap())
        .key(Global)
        .headers_on_allowed(false)
        .build()
        .unwrap();
    let addr = serve(hello().layer(quiet)).await;
    let res = c.get(format!("http://{addr}/")).send().await.unwrap();
    assert_eq!(header(&res, "ratelimit"), None);
}

#[test]
fn invalid_configuration_is_a_typed_error() {
    let q: Quota = "5/s".parse().unwrap();
    let err = RateLimitLayer::builder(q)
        .status(http::StatusCode::OK)
        .build()
        .unwrap_err();
    assert_eq!(err, ConfigError::Status(200));
    assert!(err.to_string().contains("4xx or 5xx"));
    let err = RateLimitLayer::builder(q)
        .policy("has space")
        .build()
        .unwrap_err();
    assert!(matches!(err, ConfigError::PolicyName(_)));
    let err = RateLimitLayer::builder(q)
        .policy(&"x".repeat(65))
        .build()
        .unwrap_err();
    assert!(matches!(err, ConfigError::PolicyName(_)));
    let err = RateLimitLayer::builder(q)
        .fail_mode(FailMode::Fallback { divisor: 0 })
        .build()
        .unwrap_err();
    assert!(err.to_string().contains("divided by 1 or more"));
    assert!(MemoryStore::builder().max_keys(0).build().is_err());
}

/// A store that fails every check on purpose, counting calls.
#[derive(Clone, Default)]
struct FailingStore {
    calls: Arc<AtomicUsize>,
}

impl Store for FailingStore {
    type Future = Ready<Result<Decision, StoreError>>;

    fn check(&self, _: &Policy, _: &Key, _: u32) -> Self::Future {
        self.calls.fetch_add(1, Ordering::SeqCst);
        ready(Err(StoreError::new(
            StoreErrorKind::Connection,
            "connection refused (on purpose)",
        )))
    }

    async fn reset(&self, _: &Policy, _: &Key) -> Result<(), StoreError> {
        Err(StoreError::new(StoreErrorKind::Connection, "down"))
    }
}

#[tokio::test]
async fn fail_modes_with_a_failing_store() {
    let quota: Quota = "4/h".parse().unwrap();
    let layer = |mode| {
        RateLimitLayer::builder(quota)
            .store(FailingStore::default())
            .key(Global)
            .fail_mode(mode)
            .build()
            .unwrap()
    };
    let open = layer(FailMode::Open);
    let closed = layer(FailMode::Closed);
    let fallback = RateLimitLayer::builder(quota)
        .store(FailingStore::default())
        .key(Global)
        .fail_mode(FailMode::Fallback { divisor: 2 })
        .degraded_header(true)
        .build()
        .unwrap();
    let app = Router::new()
        .route("/open", get(|| async { "" }).route_layer(open.clone()))
        .route("/closed", get(|| async { "" }).route_layer(closed.clone()))
        .route(
            "/fallback",
            get(|| async { "" }).route_layer(fallback.clone()),
        );
    let addr = serve(app).await;
    let c = client();
    for _ in 0..6 {
        let res = c.get(format!("http://{addr}/open")).send().await.unwrap();
        assert_eq!(res.status(), 200);
        assert_eq!(header(&res, "ratelimit"), None);
        let res = c.get(format!("http://{addr}/closed")).send().await.unwrap();
        assert_eq!(res.status(), 503);
        assert_eq!(header(&res, "retry-after"), Some("1"));
    }
    // Fallback: each server enforces limit / 2 = 2 locally.
    let statuses: Vec<u16> = {
        let mut v = Vec::new();
        for _ in 0..4 {
            let res = c
                .get(format!("http://{addr}/fallback"))
                .send()
                .await
                .unwrap();
            v.push(res.status().as_u16());
        }
        v
    };
    assert_eq!(statuses, vec![200, 200, 429, 429]);
    assert_eq!(open.stats().store_errors, 6);
    assert_eq!(open.stats().degraded, 6);
    assert_eq!(closed.stats().allowed, 0);
    assert_eq!(fallback.stats().allowed, 2);
    assert_eq!(fallback.stats().denied, 2);
}

/// The layer works on any `tower::Service<http::Request<B>>`, not only axum.
#[tokio::test]
async fn works_on_a_plain_tower_service() {
    use http_body_util::{BodyExt, Full};
    use tower::{ServiceBuilder, ServiceExt};

    let (store, _clock) = manual_store();
    let layer = RateLimitLayer::builder("1/h".parse().unwrap())
        .store(store)
        .key(Global)
        .build()
        .unwrap();
    let svc = ServiceBuilder::new().layer(layer).service_fn(
        |_req: http::Request<Full<bytes::Bytes>>| async {
            Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(
                bytes::Bytes::from_static(b"plain"),
            )))
        },
    );
    let req = || http::Request::new(Full::new(bytes::Bytes::new()));
    let res = svc.clone().oneshot(req()).await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.into_body().collect().await.unwrap().to_bytes(), "plain");
    let res = svc.oneshot(req()).await.unwrap();
    assert_eq!(res.status(), 429);
    assert_eq!(res.headers()["retry-after"], "3600");
}

/// A service that must be polled ready before each call, on the instance called: a clone starts
/// unready, and a call on an unready instance fails. Being ready holds a reservation (as a
/// `Buffer` slot or a concurrency permit would) until the call or until the instance is dropped.
#[derive(Default)]
struct MustBeReady {
    ready: bool,
    calls: Arc<AtomicUsize>,
    reserved: Arc<AtomicUsize>,
}

impl Clone for MustBeReady {
    fn clone(&self) -> Self {
        Self {
            ready: false,
            calls: Arc::clone(&self.calls),
            reserved: Arc::clone(&self.reserved),
        }
    }
}

impl Drop for MustBeReady {
    fn drop(&mut self) {
        if self.ready {
            self.reserved.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

impl tower::Service<http::Request<()>> for MustBeReady {
    type Response = http::Response<String>;
    type Error = &'static str;
    type Future = Ready<Result<Self::Response, Self::Error>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        if !std::mem::replace(&mut self.ready, true) {
            self.reserved.fetch_add(1, Ordering::SeqCst);
        }
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: http::Request<()>) -> Self::Future {
        if !std::mem::take(&mut self.ready) {
            return ready(Err("called without being polled ready"));
        }
        self.reserved.fetch_sub(1, Ordering::SeqCst);
        self.calls.fetch_add(1, Ordering::SeqCst);
        ready(Ok(http::Response::new("served".to_owned())))
    }
}

/// A memory store that never decides at once, so the layer goes through the store's future (as
/// with Redis).
#[derive(Clone)]
struct AsyncOnly(MemoryStore<ManualClock>);

impl Store for AsyncOnly {
    type Future = <MemoryStore<ManualClock> as Store>::Future;

    fn check(&self, policy: &Policy, key: &Key, cost: u32) -> Self::Future {
        self.0.check(policy, key, cost)
    }

    async fn reset(&self, policy: &Policy, key: &Key) -> Result<(), StoreError> {
        self.0.reset(policy, key).await
    }
}

/// Tower's contract: the instance the layer calls is the one polled ready, whether the decision
/// is made at once (memory store) or after the store's future, with or without a delay; and a
/// request answered without the inner service releases what its ready instance reserved.
#[tokio::test(start_paused = true)]
async fn the_inner_service_called_is_the_one_polled_ready() {
    let (store, _clock) = manual_store();
    admitted_denied_and_delayed(store.clone()).await;
    let unlimited = RateLimitLayer::builder("2/h".parse().unwrap())
        .store(store)
        .key(Global)
        .policy("skipped")
        .skip(|_| true)
        .build()
        .unwrap();
    let ok = StatusCode::OK;
    assert_eq!(drive_must_be_ready(unlimited, 3).await, (vec![ok; 3], 3));

    let (store, _clock) = manual_store();
    admitted_denied_and_delayed(AsyncOnly(store)).await;

    let failing = |mode| {
        RateLimitLayer::builder("2/h".parse().unwrap())
            .store(FailingStore::default())
            .key(Global)
            .fail_mode(mode)
            .build()
            .unwrap()
    };
    let open = drive_must_be_ready(failing(FailMode::Open), 3).await;
    assert_eq!(open, (vec![ok; 3], 3));
    let closed = drive_must_be_ready(failing(FailMode::Closed), 3).await;
    assert_eq!(closed, (vec![StatusCode::SERVICE_UNAVAILABLE; 3], 0));
}

/// Through layers on `store`: two admitted then two denied requests, then requests delayed
/// after the first (1 ms apart on a manual clock that never moves).
async fn admitted_denied_and_delayed<St: Store + Clone>(store: St) {
    let (ok, limited) = (StatusCode::OK, StatusCode::TOO_MANY_REQUESTS);
    let two_per_hour = RateLimitLayer::builder("2/h".parse().unwrap())
        .store(store.clone())
        .key(Global)
        .build()
        .unwrap();
    let result = drive_must_be_ready(two_per_hour, 4).await;
    assert_eq!(result, (vec![ok, ok, limited, limited], 2));
    let delayed = RateLimitLayer::builder("1000/s;capacity=5".parse().unwrap())
        .store(store)
        .key(Global)
        .policy("delayed")
        .delay_after(1)
        .build()
        .unwrap();
    assert_eq!(drive_must_be_ready(delayed, 3).await, (vec![ok; 3], 3));
}

/// Sends `n` requests through `layer` around a [`MustBeReady`], each after polling ready, and
/// returns their statuses and how many reached the inner service. After each response, nothing
/// may still be reserved.
async fn drive_must_be_ready<St: Store, K: tollgate::key::KeyExtractor>(
    layer: RateLimitLayer<St, K>,
    n: usize,
) -> (Vec<StatusCode>, usize) {
    use tower::{Service, ServiceExt};

    let inner = MustBeReady::default();
    let (calls, reserved) = (Arc::clone(&inner.calls), Arc::clone(&inner.reserved));
    let mut svc = tower::ServiceBuilder::new().layer(layer).service(inner);
    let mut statuses = Vec::new();
    for _ in 0..n {
        let res = svc
            .ready()
            .await
            .unwrap()
            .call(http::Request::new(()))
            .await;
        statuses.push(res.expect("the inner service was called unready").status());
        assert_eq!(
            reserved.load(Ordering::SeqCst),
            0,
            "a reservation outlived its request ({statuses:?})"
        );
    }
    (statuses, calls.load(Ordering::SeqCst))
}

/// The axum hello world with a POST body: the body reaches the handler untouched.
#[tokio::test]
async fn request_bodies_pass_through() {
    let layer = RateLimitLayer::new("10/s".parse().unwrap(), ClientIp::new());
    let app = Router::new()
        .route("/echo", post(|body: String| async move { body }))
        .layer(layer);
    let addr = serve(app).await;
    let res = client()
        .post(format!("http://{addr}/echo"))
        .body("x".repeat(100_000))
        .send()
        .await
        .unwrap();
    assert_eq!(res.text().await.unwrap().len(), 100_000);
}

/// Several quotas in one policy: all must admit, a denial charges none, every quota reports.
#[tokio::test]
async fn multi_quota_policy_reports_every_quota() {
    let (store, clock) = manual_store();
    let layer = RateLimitLayer::builder("2/s".parse().unwrap())
        .and_quota("5/h".parse().unwrap())
        .policy("multi")
        .store(store)
        .key(Global)
        .build()
        .unwrap();
    let addr = serve(hello().layer(layer)).await;
    let c = client();
    let res = c.get(format!("http://{addr}/")).send().await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(
        header(&res, "ratelimit-policy"),
        Some("\"multi-2/s\";q=2;w=1, \"multi-5/h\";q=5;w=3600")
    );
    assert_eq!(
        header(&res, "ratelimit"),
        Some("\"multi-2/s\";r=1;t=1, \"multi-5/h\";r=4;t=720")
    );
    assert_eq!(sf_members(header(&res, "ratelimit").unwrap()).len(), 2);
    c.get(format!("http://{addr}/")).send().await.unwrap();
    // The per-second quota denies; the hourly one is not charged.
    let res = c.get(format!("http://{addr}/")).send().await.unwrap();
    assert_eq!(res.status(), 429);
    assert_eq!(header(&res, "retry-after"), Some("1"));
    assert_eq!(
        header(&res, "ratelimit"),
        Some("\"multi-2/s\";r=0;t=1, \"multi-5/h\";r=3;t=720")
    );
    // Later the hourly quota binds: Retry-After is its (longest) wait.
    for _ in 0..3 {
        clock.advance(Duration::from_secs(1));
        assert_eq!(
            c.get(format!("http://{addr}/"))
                .send()
                .await
                .unwrap()
                .status(),
            200
        );
    }
    clock.advance(Duration::from_secs(1));
    let res = c.get(format!("http://{addr}/")).send().await.unwrap();
    assert_eq!(res.status(), 429);
    let retry: u64 = header(&res, "retry-after").unwrap().parse().unwrap();
    assert!(
        (700..=720).contains(&retry),
        "the hourly quota's wait, got {retry}"
    );
}

//! What a production team needs beyond the mechanism, over real HTTP on loopback: decisions
//! visible outside the handler, custom rejections, policy-name safety, type-erased stores,
//! builder reuse, resets by identity.

mod common;

use common::http::serve;

use std::time::Duration;

use axum::middleware::map_response;
use axum::response::Response;
use axum::routing::get;
use axum::{Extension, Json, Router};
use http::StatusCode;
use tollgate::key::{ApiKeyOrIp, ClientIp, Global, Header};
use tollgate::{
    BoxStore, CircuitBreaker, ConfigError, Decision, Decisions, DenyCache, HeaderStyle,
    ManualClock, MemoryStore, Outcome, Policy, Quota, RateLimitLayer, Store,
};

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

fn quota(s: &str) -> Quota {
    s.parse().unwrap()
}

/// Writes what an outer `map_response` sees of the stacked decisions into a header.
async fn report_decisions(mut response: Response) -> Response {
    let seen = match response.extensions().get::<Decisions>() {
        Some(all) => all
            .iter()
            .map(|d| format!("{}={:?}", d.policy().unwrap_or("?"), d.outcome()))
            .collect::<Vec<_>>()
            .join(","),
        None => "none".to_owned(),
    };
    response
        .headers_mut()
        .insert("x-seen", seen.parse().unwrap());
    response
}

#[tokio::test]
async fn every_layers_decision_reaches_handlers_outer_layers_and_map_response() {
    let store = MemoryStore::new();
    let global = RateLimitLayer::builder(quota("10/h"))
        .policy("global")
        .store(store.clone())
        .key(Global)
        .build()
        .unwrap();
    let route = RateLimitLayer::builder(quota("2/h"))
        .policy("route")
        .store(store)
        .key(Global)
        .build()
        .unwrap();
    let app = Router::new()
        .route(
            "/limited",
            get(|Extension(all): Extension<Decisions>| async move {
                let names: Vec<_> = all.iter().map(|d| d.policy().map(str::to_owned)).collect();
                Json(serde_json::json!({ "policies": names, "n": all.len() }))
            })
            .route_layer(route),
        )
        .route(
            "/open",
            get(|decision: Option<Extension<Decision>>| async move {
                // The documented idiom: only the global layer ran here.
                decision.map_or("none".to_owned(), |Extension(d)| {
                    d.policy().unwrap_or("?").to_owned()
                })
            }),
        )
        .layer(global)
        .layer(map_response(report_decisions));
    let addr = serve(app).await;
    let c = client();
    for _ in 0..2 {
        let res = c
            .get(format!("http://{addr}/limited"))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
        assert_eq!(
            res.headers()["x-seen"],
            "global=Allowed,route=Allowed",
            "outermost first"
        );
        let body: serde_json::Value = res.json().await.unwrap();
        assert_eq!(body["policies"], serde_json::json!(["global", "route"]));
    }
    // The route layer denies: the response still carries both decisions, the denial last.
    let res = c
        .get(format!("http://{addr}/limited"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 429);
    assert_eq!(res.headers()["x-seen"], "global=Allowed,route=Denied");
    let res = c.get(format!("http://{addr}/open")).send().await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["x-seen"], "global=Allowed");
    assert_eq!(res.text().await.unwrap(), "global");
}

#[tokio::test]
async fn a_decision_names_its_policy_limit_and_period() {
    let layer = RateLimitLayer::builder(quota("5/m;capacity=7"))
        .policy("api")
        .key(Global)
        .build()
        .unwrap();
    let app = Router::new()
        .route(
            "/",
            get(|Extension(d): Extension<Decision>| async move {
                format!(
                    "{} {} {} {}",
                    d.policy().unwrap(),
                    d.limit(),
                    d.period().as_secs(),
                    d.capacity()
                )
            }),
        )
        .layer(layer);
    let addr = serve(app).await;
    let body = client()
        .get(format!("http://{addr}/"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(body, "api 5 60 7");
}

#[tokio::test]
async fn custom_rejections_get_retry_after_and_fields_unless_told_not_to() {
    let with_fields = RateLimitLayer::builder(quota("1/h"))
        .policy("teapot")
        .key(Global)
        .reject_with(|decision, parts| {
            let text = format!(
                "{} on {}: {:?}",
                decision.policy().unwrap_or("?"),
                parts.uri.path(),
                decision.outcome()
            );
            let mut res = Response::new(axum::body::Body::from(text));
            *res.status_mut() = StatusCode::IM_A_TEAPOT;
            res
        })
        .build()
        .unwrap();
    let bare = RateLimitLayer::builder(quota("1/h"))
        .policy("bare")
        .key(Global)
        .reject_into_response(|decision, _parts| {
            let retry = decision
                .retry_after()
                .map(|r| r.as_secs_f64().ceil() as u64);
            (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(serde_json::json!({ "retry_in": retry })),
            )
        })
        .rejection_fields(false)
        .build()
        .unwrap();
    let app = Router::new()
        .route("/a", get(|| async { "a" }).route_layer(with_fields))
        .route("/b", get(|| async { "b" }).route_layer(bare));
    let addr = serve(app).await;
    let c = client();
    for path in ["a", "b"] {
        assert_eq!(
            c.get(format!("http://{addr}/{path}"))
                .send()
                .await
                .unwrap()
                .status(),
            200
        );
    }
    let res = c.get(format!("http://{addr}/a")).send().await.unwrap();
    assert_eq!(res.status(), 418);
    assert_eq!(res.headers()["retry-after"], "3600");
    assert_eq!(res.headers()["ratelimit"], "\"teapot\";r=0;t=3600");
    assert_eq!(res.headers()["ratelimit-policy"], "\"teapot\";q=1;w=3600");
    assert_eq!(res.text().await.unwrap(), "teapot on /a: Denied");
    let res = c.get(format!("http://{addr}/b")).send().await.unwrap();
    assert_eq!(res.status(), 503);
    assert!(res.headers().get("retry-after").is_none());
    assert!(res.headers().get("ratelimit").is_none());
    let body: serde_json::Value = res.json().await.unwrap();
    assert_eq!(body["retry_in"], 3600);
}

#[tokio::test]
async fn default_rejection_status_is_an_http_status_code() {
    let layer = RateLimitLayer::builder(quota("1/h"))
        .key(Global)
        .status(StatusCode::SERVICE_UNAVAILABLE)
        .build()
        .unwrap();
    let addr = serve(Router::new().route("/", get(|| async { "x" })).layer(layer)).await;
    let c = client();
    c.get(format!("http://{addr}/")).send().await.unwrap();
    let res = c.get(format!("http://{addr}/")).send().await.unwrap();
    assert_eq!(res.status(), 503);
    assert_eq!(res.headers()["retry-after"], "3600");
    for bad in [StatusCode::OK, StatusCode::FOUND, StatusCode::CONTINUE] {
        let err = RateLimitLayer::builder(quota("1/h"))
            .status(bad)
            .build()
            .unwrap_err();
        assert_eq!(err, ConfigError::Status(bad.as_u16()));
    }
}

/// Layers sharing a store and a policy name share their clients' state: `build` refuses a
/// name the store knows with other quotas, and a second unnamed layer, through every wrapper.
#[test]
fn conflicting_or_unnamed_policies_on_one_store_are_build_errors() {
    fn check<St: Store + Clone>(store: St) {
        let build = |name: Option<&str>, q: &str| {
            let b = RateLimitLayer::builder(quota(q)).store(store.clone());
            match name {
                Some(name) => b.policy(name).build().map(drop),
                None => b.build().map(drop),
            }
        };
        build(Some("login"), "5/m").unwrap();
        build(Some("login"), "5/m").expect("the same policy again shares on purpose");
        let err = build(Some("login"), "10/m").unwrap_err();
        assert!(matches!(err, ConfigError::PolicyConflict { .. }), "{err}");
        let text = err.to_string();
        assert!(
            text.contains("\"login\"") && text.contains("5/m") && text.contains("10/m"),
            "{text}"
        );
        assert!(text.contains(".policy("), "says what to write: {text}");
        build(None, "60/m").unwrap();
        let err = build(None, "60/m").unwrap_err();
        assert_eq!(err, ConfigError::UnnamedPolicy);
        // Naming it "default" explicitly shares that layer's limit on purpose.
        build(Some("default"), "60/m").unwrap();
        assert!(matches!(
            build(Some("default"), "61/m").unwrap_err(),
            ConfigError::PolicyConflict { .. }
        ));
        // Several quotas: the whole list must match.
        let multi = |qs: &[&str]| {
            qs[1..]
                .iter()
                .fold(RateLimitLayer::builder(quota(qs[0])), |b, q| {
                    b.and_quota(quota(q))
                })
                .policy("multi")
                .store(store.clone())
                .build()
                .map(drop)
        };
        multi(&["2/s", "5/h"]).unwrap();
        multi(&["2/s", "5/h"]).unwrap();
        assert!(multi(&["2/s", "6/h"]).is_err());
    }
    check(MemoryStore::new());
    check(BoxStore::new(MemoryStore::new()));
    check(DenyCache::new(MemoryStore::new()));
    check(CircuitBreaker::new(MemoryStore::new()));
    check(std::sync::Arc::new(MemoryStore::new()));
    // Layers of their own stores never conflict.
    RateLimitLayer::new(quota("1/s"), ClientIp::new());
    RateLimitLayer::new(quota("2/s"), ClientIp::new());
    RateLimitLayer::builder(quota("1/s")).build().unwrap();
    RateLimitLayer::builder(quota("2/s")).build().unwrap();
}

#[tokio::test]
async fn one_builder_configures_several_layers() {
    let store = MemoryStore::new();
    let base = RateLimitLayer::builder(quota("2/h"))
        .store(store.clone())
        .key(Global)
        .headers(HeaderStyle::Legacy);
    let a = base.clone().policy("a").build().unwrap();
    let b = base.policy("b").build().unwrap();
    let app = Router::new()
        .route("/a", get(|| async { "a" }).route_layer(a))
        .route("/b", get(|| async { "b" }).route_layer(b));
    let addr = serve(app).await;
    let c = client();
    for path in ["a", "b"] {
        for left in ["1", "0"] {
            let res = c.get(format!("http://{addr}/{path}")).send().await.unwrap();
            assert_eq!(res.status(), 200);
            assert_eq!(res.headers()["x-ratelimit-remaining"], left);
            assert!(res.headers().get("ratelimit").is_none(), "legacy only");
        }
    }
    for path in ["a", "b"] {
        let res = c.get(format!("http://{addr}/{path}")).send().await.unwrap();
        assert_eq!(res.status(), 429, "{path} has its own state, exhausted");
    }
}

#[tokio::test]
async fn the_service_gives_its_inner_service_back() {
    use tower::Layer as _;
    let layer = RateLimitLayer::new(quota("1/s"), Global);
    let mut svc = layer.layer(String::from("inner"));
    svc.get_mut().push_str("-changed");
    assert_eq!(svc.get_ref(), "inner-changed");
    assert_eq!(svc.into_inner(), "inner-changed");
    let same = tollgate::RateLimit::<String, MemoryStore, Global>::layer(layer.clone());
    assert_eq!(same.policy(), layer.policy());
}

/// A store picked at runtime behind `BoxStore` decides exactly as the store itself would, for
/// a store that decides at once and for one that answers through a future.
#[tokio::test]
async fn a_boxed_store_decides_as_the_store_itself() {
    let clock = ManualClock::new();
    let direct = MemoryStore::builder().clock(clock.clone()).build().unwrap();
    let boxed_memory = MemoryStore::builder().clock(clock.clone()).build().unwrap();
    let boxed = BoxStore::new(boxed_memory);
    let policy = Policy::new("p", quota("3/s")).unwrap();
    let key = tollgate::Key::from("client");
    for step in 0..20u64 {
        clock.advance(Duration::from_millis(137 * (step % 5)));
        let cost = u32::try_from(step % 3).unwrap();
        let want = direct.check_now(&policy, &key, cost);
        let ready = boxed.check_ready(&policy, &key, cost);
        assert_eq!(
            ready.expect("memory decides at once").unwrap(),
            want,
            "{step}"
        );
    }
    // Through the future and a reset, over an asynchronous wrapper too.
    let breaker = BoxStore::new(DenyCache::new(CircuitBreaker::new(MemoryStore::new())));
    let long = Policy::new("long", quota("2/h")).unwrap();
    for left in [1, 0] {
        assert_eq!(
            breaker.check(&long, &key, 1).await.unwrap().remaining(),
            left
        );
    }
    assert_eq!(
        breaker.check(&long, &key, 1).await.unwrap().outcome(),
        Outcome::Denied
    );
    breaker.reset(&long, &key).await.unwrap();
    assert!(breaker.check(&long, &key, 1).await.unwrap().is_allowed());
    assert!(format!("{breaker:?}").contains("DenyCache"));
}

/// The admin reset of the issue: a client known by its API key is fresh again after
/// `reset_identity(api_key)`, through the layer's own extractor and over HTTP.
#[tokio::test]
async fn reset_identity_reaches_the_key_an_api_key_maps_to() {
    let layer = RateLimitLayer::builder(quota("2/h"))
        .policy("api")
        .key(ApiKeyOrIp::new(
            Header::new("x-api-key").unwrap(),
            ClientIp::new(),
        ))
        .build()
        .unwrap();
    let app = Router::new()
        .route("/", get(|| async { "ok" }))
        .layer(layer.clone());
    let addr = serve(app).await;
    let c = client();
    let send = |key: Option<&'static str>| {
        let mut req = c.get(format!("http://{addr}/"));
        if let Some(key) = key {
            req = req.header("x-api-key", key);
        }
        async move { req.send().await.unwrap().status() }
    };
    for _ in 0..2 {
        assert_eq!(send(Some("sk_live_SECRET")).await, 200);
        assert_eq!(send(None).await, 200);
    }
    assert_eq!(send(Some("sk_live_SECRET")).await, 429);
    assert_eq!(send(None).await, 429);
    assert_eq!(layer.reset_identity("sk_live_SECRET").await.unwrap(), 1);
    assert_eq!(send(Some("sk_live_SECRET")).await, 200);
    assert_eq!(send(None).await, 429, "the IP client was not reset");
    // An address is reset both as an API key and as an IP.
    assert_eq!(layer.reset_identity("127.0.0.1").await.unwrap(), 2);
    assert_eq!(send(None).await, 200);
}

/// A server that gives no peer address (axum served without `ConnectInfo`) is a
/// misconfiguration: the first request shows it as a 500, not as every client sharing one
/// bucket; `on_missing_peer` chooses otherwise explicitly.
#[tokio::test]
async fn a_missing_peer_address_is_a_500_unless_chosen_otherwise() {
    use tollgate::key::MissingPeer;
    let strict = RateLimitLayer::builder(quota("100/s"))
        .policy("strict")
        .build()
        .unwrap();
    let shared = RateLimitLayer::builder(quota("1/h"))
        .policy("shared")
        .key(ClientIp::new().on_missing_peer(MissingPeer::SharedKey))
        .build()
        .unwrap();
    let app = Router::new()
        .route("/strict", get(|| async { "x" }).route_layer(strict.clone()))
        .route("/shared", get(|| async { "y" }).route_layer(shared));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    // No connect info: the peer address is missing.
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let c = client();
    let res = c.get(format!("http://{addr}/strict")).send().await.unwrap();
    assert_eq!(res.status(), 500);
    assert!(
        res.text()
            .await
            .unwrap()
            .contains("cannot identify the client")
    );
    assert_eq!(strict.stats().unidentified, 1);
    assert_eq!(strict.stats().allowed, 0);
    // SharedKey: every such request shares one bucket, as the user asked.
    let res = c.get(format!("http://{addr}/shared")).send().await.unwrap();
    assert_eq!(res.status(), 200);
    let res = c.get(format!("http://{addr}/shared")).send().await.unwrap();
    assert_eq!(res.status(), 429);
}

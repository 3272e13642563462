//! Client identities end to end: forwarding headers with bytes that are not ASCII over real
//! HTTP, and admin resets by identity (logs: tests/log_secrets.rs).
//! Stores run on a manual clock, so no test sleeps to wait for refills.

mod common;

use common::http::serve;

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::routing::get;
use http::{HeaderValue, StatusCode};
use tollgate::key::{ApiKeyOrIp, ClientIp, Header};
use tollgate::{KeyExtractor, ManualClock, MemoryStore, RateLimitLayer, Store};

fn manual_store() -> MemoryStore<ManualClock> {
    MemoryStore::builder()
        .clock(ManualClock::new())
        .build()
        .unwrap()
}

fn hello() -> Router {
    Router::new().route("/", get(|| async { "hello" }))
}

fn client_from(local: &str) -> reqwest::Client {
    reqwest::Client::builder()
        .local_address(local.parse::<IpAddr>().unwrap())
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

/// A proxy at 127.0.0.1 that passes on a byte >= 0x80 (as nginx does) left of the client's
/// hop: the client is still the hop right of it, not the proxy.
#[tokio::test]
async fn non_ascii_bytes_left_of_the_client_do_not_give_it_the_proxys_bucket() {
    let ip = ClientIp::new().trust("127.0.0.1").unwrap();
    let layer = RateLimitLayer::builder("1/m".parse().unwrap())
        .store(manual_store())
        .key(ip)
        .build()
        .unwrap();
    let addr = serve(hello().layer(layer)).await;
    let url = format!("http://{addr}/");
    let proxy = client_from("127.0.0.1");
    let send = |xff: &'static [u8]| {
        let req = proxy.get(&url);
        let req = if xff.is_empty() {
            req
        } else {
            req.header("x-forwarded-for", HeaderValue::from_bytes(xff).unwrap())
        };
        async move { req.send().await.unwrap().status() }
    };
    assert_eq!(send(b"6.6.6.6\x80, 1.2.3.4").await, StatusCode::OK);
    // The same client, now with a clean header: its one request is spent.
    assert_eq!(send(b"1.2.3.4").await, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(
        send(b"caf\xc3\xa9, 1.2.3.4").await,
        StatusCode::TOO_MANY_REQUESTS
    );
    // The proxy's own bucket was never touched.
    assert_eq!(send(b"").await, StatusCode::OK);
    // Garbage right of every client stops the walk at the proxy, whose bucket is now spent.
    assert_eq!(send(b"5.6.7.8, \x80").await, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(send(b"5.6.7.8").await, StatusCode::OK);
}

/// An admin resets "alice" or "127.0.0.2" without knowing how ApiKeyOrIp lays out its keys.
#[tokio::test]
async fn admin_resets_what_an_identity_maps_to() {
    let store = manual_store();
    let extractor = Arc::new(ApiKeyOrIp::new(
        Header::new("x-api-key").unwrap(),
        ClientIp::new(),
    ));
    let layer = RateLimitLayer::builder("1/m".parse().unwrap())
        .policy("api")
        .store(store.clone())
        .key(Arc::clone(&extractor))
        .build()
        .unwrap();
    let policy = layer.policy().clone();
    let addr = serve(hello().layer(layer)).await;
    let url = format!("http://{addr}/");
    let alice = client_from("127.0.0.1");
    let anonymous = client_from("127.0.0.2");
    let with_key = || async {
        let res = alice.get(&url).header("x-api-key", "alice").send().await;
        res.unwrap().status()
    };
    let without_key = || async { anonymous.get(&url).send().await.unwrap().status() };
    let reset = |identity: &'static str| {
        let keys = extractor.keys_for_identity(identity);
        let (store, policy) = (store.clone(), policy.clone());
        async move {
            assert!(!keys.is_empty(), "{identity}");
            for key in &keys {
                store.reset(&policy, key).await.unwrap();
            }
        }
    };

    assert_eq!(with_key().await, StatusCode::OK);
    assert_eq!(with_key().await, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(without_key().await, StatusCode::OK);
    assert_eq!(without_key().await, StatusCode::TOO_MANY_REQUESTS);

    reset("alice").await;
    assert_eq!(with_key().await, StatusCode::OK);
    // Only alice: the anonymous client is still limited.
    assert_eq!(without_key().await, StatusCode::TOO_MANY_REQUESTS);

    reset("127.0.0.2").await;
    assert_eq!(without_key().await, StatusCode::OK);
    assert_eq!(with_key().await, StatusCode::TOO_MANY_REQUESTS);
}

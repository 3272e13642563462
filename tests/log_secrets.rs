//! Identities are credentials: no event of a denial, a delay, a store failure or a dry-run
//! denial carries the raw API key, only its fingerprint, unless the layer explicitly opts in.

mod common;

use std::future::{Ready, ready};

use http::{Request, Response};
use tollgate::key::{ApiKeyOrIp, ClientIp, Header, PeerAddr};
use tollgate::{
    Decision, FailMode, Key, KeyExtractor, Policy, Quota, RateLimitLayer, Store, StoreError,
    StoreErrorKind,
};
use tower::{Layer, Service, ServiceExt};

use common::logs::capture;

const SECRET: &str = "sk_live_SECRET123";

/// A store that always fails.
#[derive(Clone)]
struct Down;

impl Store for Down {
    type Future = Ready<Result<Decision, StoreError>>;

    fn check(&self, _policy: &Policy, _key: &Key, _cost: u32) -> Self::Future {
        ready(Err(StoreError::new(
            StoreErrorKind::Connection,
            "connection refused",
        )))
    }

    fn reset(
        &self,
        _policy: &Policy,
        _key: &Key,
    ) -> impl std::future::Future<Output = Result<(), StoreError>> + Send {
        ready(Ok(()))
    }
}

fn api_key() -> ApiKeyOrIp {
    ApiKeyOrIp::new(Header::new("x-api-key").unwrap(), ClientIp::new())
}

fn request() -> Request<String> {
    let mut req = Request::builder()
        .uri("/")
        .header("x-api-key", SECRET)
        .body(String::new())
        .unwrap();
    req.extensions_mut()
        .insert(PeerAddr("192.0.2.1:5000".parse().unwrap()));
    req
}

type Answer = Ready<Result<Response<String>, std::convert::Infallible>>;

fn inner() -> tower::util::ServiceFn<impl Fn(Request<String>) -> Answer + Clone> {
    tower::service_fn(|_req: Request<String>| ready(Ok(Response::new("ok".to_owned()))))
}

/// Sends `n` requests through `svc` and returns their statuses.
async fn statuses<S, B>(mut svc: S, n: usize) -> Vec<u16>
where
    S: Service<Request<String>, Response = Response<B>>,
    S::Error: std::fmt::Debug,
{
    let mut out = Vec::new();
    for _ in 0..n {
        let res = svc.ready().await.unwrap().call(request()).await.unwrap();
        out.push(res.status().as_u16());
    }
    out
}

fn quota(s: &str) -> Quota {
    s.parse().unwrap()
}

#[tokio::test(start_paused = true)]
async fn no_event_carries_the_raw_api_key() {
    let fingerprint = Key::from_parts(&[b"key:", SECRET.as_bytes()]).fingerprint();
    assert_eq!(
        api_key()
            .extract(&request().into_parts().0)
            .unwrap()
            .fingerprint(),
        fingerprint
    );
    let logs = capture(async {
        // A denial.
        let denied = RateLimitLayer::builder(quota("1/h"))
            .policy("deny")
            .key(api_key())
            .build()
            .unwrap();
        assert_eq!(statuses(denied.layer(inner()), 2).await, [200, 429]);
        // A delay (nginx without nodelay): the second of a burst waits.
        let delayed = RateLimitLayer::builder(quota("1/s;capacity=3"))
            .policy("delay")
            .key(api_key())
            .delay_after(1)
            .build()
            .unwrap();
        assert_eq!(statuses(delayed.layer(inner()), 2).await, [200, 200]);
        assert_eq!(delayed.stats().delayed, 1);
        // A store failure, decided by the fail mode.
        let failing = RateLimitLayer::builder(quota("1/h"))
            .policy("down")
            .key(api_key())
            .store(Down)
            .fail_mode(FailMode::Open)
            .build()
            .unwrap();
        assert_eq!(statuses(failing.layer(inner()), 1).await, [200]);
        // A dry-run denial.
        let dry = RateLimitLayer::builder(quota("1/h"))
            .policy("dry")
            .key(api_key())
            .dry_run(true)
            .build()
            .unwrap();
        assert_eq!(statuses(dry.layer(inner()), 2).await, [200, 200]);
        assert_eq!(dry.stats().dry_run_denied, 1);
    })
    .await;
    for event in [
        "request limited",
        "request delayed",
        "rate-limit store failed",
        "dry_run=true",
    ] {
        assert!(logs.contains(event), "no {event:?} event in:\n{logs}");
    }
    assert!(!logs.contains(SECRET), "the raw key was logged:\n{logs}");
    // Every event names the client by the same fingerprint, so one client's events correlate.
    let tagged = format!("key=fp:{fingerprint}");
    assert_eq!(
        logs.matches("key=").count(),
        logs.matches(&tagged).count(),
        "every key field is that fingerprint: {logs}"
    );
    assert!(logs.matches(&tagged).count() >= 4, "{logs}");
    // Nor does any Debug output show it.
    let key = api_key().extract(&request().into_parts().0).unwrap();
    assert!(!format!("{key:?}").contains(SECRET), "{key:?}");
    let err = StoreError::new(StoreErrorKind::Timeout, "timed out");
    assert!(!format!("{err:?}").contains(SECRET));
}

/// The opt-in exists and does what it says (so the test above can fail).
#[tokio::test]
async fn raw_keys_only_when_explicitly_enabled() {
    let logs = capture(async {
        let layer = RateLimitLayer::builder(quota("1/h"))
            .key(api_key())
            .log_raw_keys(true)
            .build()
            .unwrap();
        assert_eq!(statuses(layer.layer(inner()), 2).await, [200, 429]);
    })
    .await;
    assert!(logs.contains(&format!("key=key:{SECRET}")), "{logs}");
}

//! An axum app rate-limited in process, on one `MemoryStore` shared by two layers: a global
//! limit per client IP on every route, and a stricter limit on `/search` keyed by API key
//! (header `x-api-key`), else by IP. The handlers read tollgate's decision from the request.
//!
//! Run it (the listen address comes from `LISTEN_ADDR`, default 127.0.0.1:3000):
//!
//! ```text
//! cargo run --example axum_memory
//! curl -i http://127.0.0.1:3000/                 # 200, RateLimit fields of policy "global"
//! for i in $(seq 6); do curl -s -o /dev/null -w '%{http_code} ' -H 'x-api-key: alice' http://127.0.0.1:3000/search; done; echo
//! # 200 200 200 200 200 429: alice's 5 per minute on /search are spent; bob's are not
//! curl -i -H 'x-api-key: bob' http://127.0.0.1:3000/search
//! ```
//!
//! Ctrl-C stops it gracefully (requests in flight are answered first).

use std::net::SocketAddr;

use axum::{Extension, Router, routing::get};
use tollgate::key::{ApiKeyOrIp, ClientIp, Header};
use tollgate::{Decision, MemoryStore, RateLimitLayer};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let addr: SocketAddr = std::env::var("LISTEN_ADDR")
        .unwrap_or_else(|_| "127.0.0.1:3000".to_owned())
        .parse()?;

    // One store for both layers. Layers on a shared store need policy names of their own:
    // the name keeps their clients' states apart, and `build()` fails without one.
    let store = MemoryStore::new();

    // Every route: 60 requests a minute per client IP, at most 10 at once.
    let global = RateLimitLayer::builder("60/m;capacity=10".parse()?)
        .policy("global")
        .store(store.clone())
        .key(ClientIp::new())
        .build()?;

    // `/search` also: 5 a minute per API key, or per IP for requests without one.
    let search = RateLimitLayer::builder("5/m".parse()?)
        .policy("search")
        .store(store)
        .key(ApiKeyOrIp::new(Header::new("x-api-key")?, ClientIp::new()))
        .build()?;

    let app = Router::new()
        .route("/", get(home))
        .route("/search", get(search_handler).route_layer(search))
        .layer(global);

    let listener = tokio::net::TcpListener::bind(addr).await?;
    println!("axum_memory listening on http://{}", listener.local_addr()?);
    // `ClientIp` keys requests by the peer address, which axum provides only with connect info.
    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(async {
        let _ = tokio::signal::ctrl_c().await;
    })
    .await?;
    Ok(())
}

/// The innermost layer's decision is in the request's extensions. It is an `Option`: a route
/// that no layer limited (a skipped request, or a key extractor that returned `None`) has none,
/// and a plain `Extension<Decision>` would answer such requests with a 500.
async fn home(decision: Option<Extension<Decision>>) -> String {
    match decision {
        Some(Extension(d)) => format!("hello: {} of {} left\n", d.remaining(), d.capacity()),
        None => "hello (not limited)\n".to_owned(),
    }
}

async fn search_handler(decision: Option<Extension<Decision>>) -> String {
    match decision {
        // On /search the innermost layer is the route's: policy "search".
        Some(Extension(d)) => format!(
            "results: {} searches left under {:?}, full again in {} s\n",
            d.remaining(),
            d.policy().unwrap_or("?"),
            d.reset_after().as_secs()
        ),
        None => "results\n".to_owned(),
    }
}

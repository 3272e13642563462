//! The app of `examples/axum_memory.rs` on `RedisStore`: run it N times behind a load balancer
//! and the N app servers enforce one limit together, whichever server a client reaches.
//! `STORE=memory` runs it on a `MemoryStore` instead (each server then limits on its own); both
//! stores sit behind one `BoxStore`, so the app's type does not depend on the choice.
//!
//! Run two app servers on one Redis (`REDIS_URL`, default redis://127.0.0.1:6379; the listen
//! address comes from `LISTEN_ADDR`, default 127.0.0.1:3000):
//!
//! ```text
//! redis-server --port 6390 --save '' --appendonly no &
//! export REDIS_URL=redis://127.0.0.1:6390
//! LISTEN_ADDR=127.0.0.1:3000 cargo run --features redis --example axum_redis &
//! LISTEN_ADDR=127.0.0.1:3001 cargo run --features redis --example axum_redis &
//! # once both print "listening":
//! for i in $(seq 4); do for p in 3000 3001; do curl -s -o /dev/null -w "$p:%{http_code} " -H 'x-api-key: alice' http://127.0.0.1:$p/search; done; done; echo
//! # 3000:200 3001:200 3000:200 3001:200 3000:200 3001:429 3000:429 3001:429
//! ```
//!
//! If Redis goes away, `FailMode::Open` lets requests through (marked
//! `x-ratelimit-degraded: fail-open`) and a `tollgate::store` warning is logged at most once a
//! second (`RUST_LOG` sets what is logged, default `tollgate=warn`); the store reconnects by
//! itself when Redis is back. Ctrl-C stops a server gracefully.

use std::net::SocketAddr;
use std::time::Duration;

use axum::{Extension, Router, routing::get};
use tollgate::key::{ApiKeyOrIp, ClientIp, Header};
use tollgate::store::redis::RedisStore;
use tollgate::{BoxStore, Decision, FailMode, MemoryStore, RateLimitLayer};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| "tollgate=warn".to_owned());
    tracing_subscriber::fmt().with_env_filter(filter).init();
    let addr: SocketAddr = std::env::var("LISTEN_ADDR")
        .unwrap_or_else(|_| "127.0.0.1:3000".to_owned())
        .parse()?;

    let store = if std::env::var("STORE").as_deref() == Ok("memory") {
        println!("store: memory (this server's own limits)");
        BoxStore::new(MemoryStore::new())
    } else {
        let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
        // `build()` succeeds while Redis is down: the fail mode decides until it is back.
        let redis = RedisStore::builder(&url)
            .prefix("axum-example") // app servers that share limits share the prefix
            .command_timeout(Duration::from_millis(50))
            .build()
            .await?;
        println!("store: redis at {url} (limits shared by every server on it)");
        BoxStore::new(redis)
    };

    // As in axum_memory: one store, two layers, a policy name each.
    let global = RateLimitLayer::builder("60/m;capacity=10".parse()?)
        .policy("global")
        .store(store.clone())
        .key(ClientIp::new())
        .fail_mode(FailMode::Open)
        .degraded_header(true)
        .build()?;
    let search = RateLimitLayer::builder("5/m".parse()?)
        .policy("search")
        .store(store)
        .key(ApiKeyOrIp::new(Header::new("x-api-key")?, ClientIp::new()))
        .fail_mode(FailMode::Open)
        .degraded_header(true)
        .build()?;

    let app = Router::new()
        .route("/", get(home))
        .route("/search", get(search_handler).route_layer(search))
        .layer(global);

    let listener = tokio::net::TcpListener::bind(addr).await?;
    println!("axum_redis listening on http://{}", listener.local_addr()?);
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

async fn home(decision: Option<Extension<Decision>>) -> String {
    match decision {
        Some(Extension(d)) if d.is_degraded() => "hello (store down: not limited)\n".to_owned(),
        Some(Extension(d)) => format!("hello: {} of {} left\n", d.remaining(), d.capacity()),
        None => "hello (not limited)\n".to_owned(),
    }
}

async fn search_handler(decision: Option<Extension<Decision>>) -> String {
    match decision {
        Some(Extension(d)) if d.is_degraded() => "results (store down: not limited)\n".to_owned(),
        Some(Extension(d)) => format!("results: {} searches left\n", d.remaining()),
        None => "results\n".to_owned(),
    }
}

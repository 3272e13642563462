//! tollgate on a plain hyper 1 server, without axum: the layer wraps a `tower` service, and each
//! connection's requests carry the peer address as a `tollgate::key::PeerAddr` extension, which
//! is where `ClientIp` finds the client outside axum. Without it the limiter cannot tell clients
//! apart: a missing peer address is a misconfiguration, not a client to let through.
//!
//! Run it (the listen address comes from `LISTEN_ADDR`, default 127.0.0.1:3000):
//!
//! ```text
//! cargo run --example hyper
//! for i in $(seq 6); do curl -s -o /dev/null -w '%{http_code} ' http://127.0.0.1:3000/; done; echo
//! # 200 200 200 200 200 429
//! curl -i http://127.0.0.1:3000/                 # 429, Retry-After, RateLimit fields
//! ```
//!
//! Ctrl-C stops accepting connections and waits for the open ones to finish.

use std::convert::Infallible;
use std::net::SocketAddr;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tollgate::key::{ClientIp, PeerAddr};
use tollgate::{Decision, RateLimitLayer};
use tower::ServiceBuilder;

async fn hello(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let text = match req.extensions().get::<Decision>() {
        Some(d) => format!("hello: {} of {} left\n", d.remaining(), d.capacity()),
        None => "hello (not limited)\n".to_owned(),
    };
    Ok(Response::new(Full::new(Bytes::from(text))))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let addr: SocketAddr = std::env::var("LISTEN_ADDR")
        .unwrap_or_else(|_| "127.0.0.1:3000".to_owned())
        .parse()?;
    // 5 requests a minute per client IP. Every clone of the layer shares one store.
    let limit = RateLimitLayer::builder("5/m".parse()?)
        .policy("per-ip")
        .key(ClientIp::new())
        .build()?;

    let listener = tokio::net::TcpListener::bind(addr).await?;
    println!("hyper listening on http://{}", listener.local_addr()?);
    let graceful = GracefulShutdown::new();
    let mut ctrl_c = std::pin::pin!(tokio::signal::ctrl_c());
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    eprintln!("accept failed: {e}");
                    continue;
                }
            },
            _ = &mut ctrl_c => break,
        };
        // One service per connection: it stamps each request with this connection's peer
        // address, then the rate limit decides, then the handler runs.
        let service = ServiceBuilder::new()
            .map_request(move |mut req: Request<Incoming>| {
                req.extensions_mut().insert(PeerAddr(peer));
                req
            })
            .layer(limit.clone())
            .service_fn(hello);
        let connection = http1::Builder::new()
            .serve_connection(TokioIo::new(stream), TowerToHyperService::new(service));
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                eprintln!("connection from {peer}: {e}");
            }
        });
    }
    graceful.shutdown().await;
    Ok(())
}

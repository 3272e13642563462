//! The tollgate gRPC demo: the standard gRPC health service (`grpc.health.v1.Health`, from
//! tonic-health) behind a `RateLimitLayer`. A limited call ends with status
//! `RESOURCE_EXHAUSTED` and `grpc-status-details-bin` holding `google.rpc.RetryInfo` (the wait)
//! and `google.rpc.QuotaFailure` (the policy); admitted calls carry the `RateLimit` fields in
//! their response metadata.
//!
//! ```text
//! cargo run --example grpc --features tonic -- --rate 2/s
//! grpcurl -plaintext -H 'x-api-key: alice' 127.0.0.1:50051 grpc.health.v1.Health/Check
//! ```
//!
//! Flags (`--help` explains them): `--listen` (default 127.0.0.1:50051), `--rate` (default
//! 60/m), `--capacity` (default: the rate's limit), `--key` (`ip`, or `metadata:NAME`: that
//! metadata entry, else the peer IP; default `metadata:x-api-key`), `--redis-url` (needs
//! `--features tonic,redis`; omitted: an in-memory store). It prints one line with its address
//! when ready, and exits cleanly on Ctrl-C.
//!
//! A streaming call (`Health/Watch`) is charged once, when it starts.

use std::net::SocketAddr;
use std::process::ExitCode;

use clap::Parser;
use tollgate::key::{ApiKeyOrIp, ClientIp, Header, KeyError};
use tollgate::{BoxStore, Key, KeyExtractor, MemoryStore, Quota, RateLimitLayer};

/// tollgate gRPC demo: the gRPC health service behind tollgate rate limits.
#[derive(Debug, Parser)]
#[command(name = "grpc")]
struct Args {
    /// Listen address.
    #[arg(
        long = "listen",
        value_name = "ADDR",
        default_value = "127.0.0.1:50051"
    )]
    listen: SocketAddr,
    /// The policy "default" on every call, e.g. 60/m.
    #[arg(long = "rate", value_name = "RATE", default_value = "60/m")]
    rate: Quota,
    /// Capacity of the policy [default: its limit].
    #[arg(long = "capacity", value_name = "N")]
    capacity: Option<u32>,
    /// How clients are identified: ip (the peer address) | metadata:NAME (metadata entry NAME,
    /// else the peer address).
    #[arg(
        long = "key",
        value_name = "KIND",
        default_value = "metadata:x-api-key"
    )]
    key: String,
    /// Use RedisStore at this URL (needs --features tonic,redis); omitted: MemoryStore.
    #[arg(long = "redis-url", value_name = "URL")]
    redis_url: Option<String>,
}

/// The demo's key extractor: `--key ip` or `--key metadata:NAME`.
#[derive(Debug, Clone)]
enum DemoKey {
    Ip(ClientIp),
    Metadata(ApiKeyOrIp),
}

impl DemoKey {
    fn parse(spec: &str) -> Result<Self, String> {
        match spec.split_once(':') {
            None if spec == "ip" => Ok(Self::Ip(ClientIp::new())),
            Some(("metadata", name)) => Header::new(name)
                .map(|h| Self::Metadata(ApiKeyOrIp::new(h, ClientIp::new())))
                .map_err(|e| format!("--key {spec}: {e}")),
            _ => Err(format!(
                "--key {spec}: write ip or metadata:NAME (e.g. metadata:x-api-key)"
            )),
        }
    }
}

impl KeyExtractor for DemoKey {
    fn extract(&self, req: &http::request::Parts) -> Option<Key> {
        match self {
            Self::Ip(k) => k.extract(req),
            Self::Metadata(k) => k.extract(req),
        }
    }

    fn try_extract(&self, req: &http::request::Parts) -> Result<Option<Key>, KeyError> {
        match self {
            Self::Ip(k) => k.try_extract(req),
            Self::Metadata(k) => k.try_extract(req),
        }
    }

    fn keys_for_identity(&self, identity: &str) -> Vec<Key> {
        match self {
            Self::Ip(k) => k.keys_for_identity(identity),
            Self::Metadata(k) => k.keys_for_identity(identity),
        }
    }
}

#[cfg(feature = "redis")]
async fn redis_store(url: &str) -> Result<BoxStore, String> {
    tollgate::RedisStore::builder(url)
        .build()
        .await
        .map(BoxStore::new)
        .map_err(|e| format!("--redis-url: {e}"))
}

#[cfg(not(feature = "redis"))]
async fn redis_store(_url: &str) -> Result<BoxStore, String> {
    Err("--redis-url needs the redis feature: \
         cargo run --example grpc --features tonic,redis -- --redis-url redis://127.0.0.1:6379"
        .into())
}

async fn layer(args: &Args) -> Result<(RateLimitLayer<BoxStore, DemoKey>, &'static str), String> {
    let key = DemoKey::parse(&args.key)?;
    let quota = match args.capacity {
        Some(n) => args
            .rate
            .with_capacity(n)
            .map_err(|e| format!("--capacity {n}: {e}"))?,
        None => args.rate,
    };
    let (store, name) = match &args.redis_url {
        Some(url) => (redis_store(url).await?, "redis"),
        None => (BoxStore::new(MemoryStore::new()), "memory"),
    };
    let layer = RateLimitLayer::builder(quota)
        .key(key)
        .store(store)
        .build()
        .map_err(|e| e.to_string())?;
    Ok((layer, name))
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    if let Ok(filter) = std::env::var("RUST_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .try_init();
    }
    // Exits 2 with a message on a bad flag, 0 after --help.
    let args = Args::parse();
    let (layer, store_name) = match layer(&args).await {
        Ok(built) => built,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let listener = match tokio::net::TcpListener::bind(args.listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("error: cannot listen on {}: {e}", args.listen);
            return ExitCode::FAILURE;
        }
    };
    let addr = listener.local_addr().unwrap_or(args.listen);
    let (reporter, health) = tonic_health::server::health_reporter();
    // The server as a whole ("") and the health service itself are serving.
    reporter
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;
    println!(
        "tollgate grpc demo listening on http://{addr} (store: {store_name}, rate: {}, key: {})",
        layer.policy().quota(),
        args.key
    );
    let served = tonic::transport::Server::builder()
        .layer(layer)
        .add_service(health)
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            shutdown_signal(),
        )
        .await;
    match served {
        Ok(()) => {
            println!("tollgate grpc demo stopped");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

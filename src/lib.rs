//! # tollgate
//!
//! Distributed HTTP rate limiting for Tower and axum: the GCRA (generic cell rate algorithm) in
//! exact integer arithmetic, an in-memory store that decides in nanoseconds, and standard
//! `429` responses with `Retry-After` and the IETF `RateLimit` header fields.
//!
//! ## Quick start
//! ```
//! use std::net::SocketAddr;
//! use axum::{Router, routing::get};
//! use tollgate::{Quota, RateLimitLayer, key::ClientIp};
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let app = Router::new()
//!     .route("/", get(|| async { "hello" }))
//!     .layer(RateLimitLayer::new("60/m".parse::<Quota>()?, ClientIp::new()));
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! # if false {
//! axum::serve(listener, app.into_make_service_with_connect_info::<SocketAddr>()).await?;
//! # }
//! # Ok(()) }
//! ```
//!
//! Requests are identified by a [`KeyExtractor`] (client IP behind trusted proxies, a header,
//! API key else IP, one global key, or your closure), checked against a [`Quota`] in a
//! [`Store`], and either passed on with `RateLimit` fields or answered with `429`. Several
//! layers stack (a global limit plus a stricter one on a route); a request denied by one layer
//! is never charged by the layers that have not run yet.
//!
//! ## Features
//! | feature | default | what it adds |
//! |---|---|---|
//! | `axum` | yes | reads the peer address from axum's `ConnectInfo<SocketAddr>` |
//! | `serde` | no | `Deserialize`/`Serialize` for [`Quota`] (`"60/m"` or `{ rate, capacity }`), `Serialize` for [`Stats`] |
//! | `redis` | no | `RedisStore`: one limit shared by many app servers (one server, Redis Sentinel, ACL users, databases) |
//! | `redis-tls` | no | `rediss://` for `RedisStore` (rustls), and your own CA or client certificate |
//! | `redis-cluster` | no | `RedisStore` on Redis Cluster |
//! | `metrics` | no | counters and histograms per policy through the `metrics` facade ([`telemetry`]) |
//! | `tonic` | no | gRPC: reads the peer from tonic's `TcpConnectInfo`; limited calls get `RESOURCE_EXHAUSTED` with `RetryInfo` and `QuotaFailure` ([`grpc`]) |
//! | `test-util` | no | `store::conformance`: the checks every [`Store`] passes, for stores of your own |
//! | `server` | no | the `tollgate-server` binary: rate-limit decisions for nginx, Caddy, Traefik and Envoy (implies `metrics`, `redis`, `serde`) |
//!
//! ## Semantics
//! A quota of `limit` per `period` with `capacity` B has emission interval `T = period / limit`.
//! A client idle for `B × T` may send B requests at once, then one every `T`. A denied request
//! charges nothing; a request with cost 0 is a peek; a request whose cost exceeds B can never
//! pass ([`Outcome::Impossible`]). The [`gcra`] module has the exact arithmetic; the
//! conformance kit (`store::conformance`, feature `test-util`) its test vectors.
//!
//! Minimum supported Rust version: 1.88.

// A request flows through `layer` (built once) -> `service` (`call`) -> `future` (waits for
// the store) -> `decide` (verdict, counters, logs; `settle` for charges settled after the
// response) -> `response` / `grpc` / `headers` -> `store` -> `gcra`; no module uses one before
// it in that order.
pub mod clock;
mod decide;
pub mod decision;
pub mod error;
mod future;
pub mod gcra;
#[cfg(feature = "tonic")]
pub mod grpc;
pub mod headers;
pub mod key;
mod layer;
pub mod quota;
mod response;
mod service;
pub mod settle;
pub mod store;
pub mod telemetry;
pub mod tier;

pub use clock::{Clock, ManualClock, MonotonicClock};
pub use decide::Stats;
pub use decision::{Decision, Decisions, Outcome};
pub use error::{ConfigError, QuotaError, StoreError, StoreErrorKind};
pub use future::ResponseFuture;
pub use headers::{HeaderStyle, ResetStyle};
pub use key::{Fingerprint, Key, KeyError, KeyExtractor};
pub use layer::{Builder, RateLimitLayer};
pub use quota::Quota;
#[cfg(feature = "axum")]
pub use response::RejectIntoResponse;
pub use response::{DefaultRejection, RateLimitBody, RejectWith, RejectionBody, Rejector};
pub use service::RateLimit;
pub use settle::ActualCost;
pub use store::memory::{DEFAULT_MAX_KEYS, MemoryStore, MemoryStoreBuilder};
#[cfg(feature = "redis")]
pub use store::redis::RedisStore;
pub use store::{BoxStore, FailMode, Policy, PolicyRegistry, Store};
pub use store::{
    BreakerConfig, BreakerState, BreakerStats, CircuitBreaker, DenyCache, DenyCacheStats,
};
pub use tier::{Tier, TierCache, Tiers};

/// The README's examples, compiled and run as doctests so they never go stale.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;

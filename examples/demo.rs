//! The tollgate demo server: a small axum API behind rate-limit layers, as the README shows.
//!
//! Run it on the in-memory store:
//!
//! ```text
//! cargo run --example demo
//! curl -i http://127.0.0.1:3000/api/hello
//! ```
//!
//! Routes: `GET /api/hello` (policy "default"), `GET /api/expensive` ("default" and
//! "expensive"), `GET /api/multi` (policy "multi": several quotas, one atomic decision),
//! `GET /api/quota` (a peek at "default": cost 0, consumes nothing),
//! `POST /api/login` (policy "login" only: only failed logins count; 200 with the header
//! `x-password: open-sesame`, else 401, and a success is refunded), `GET /api/tokens?used=N`
//! (policy "tokens" only: reserves `--token-estimate` at admission, then charges the actual N),
//! `GET /api/tokens/quota` (a peek at "tokens"),
//! `GET /healthz` (never limited), and with `--admin-token` `GET /admin/stats` and
//! `POST /admin/reset/{identity}` (an API key or an IP address), and with `--tiers`
//! `POST /admin/tier/{identity}/{tier}`. `--help` explains the flags: `--listen`,
//! `--redis-url`, `--redis-sentinel`, `--redis-master`, `--rate`, `--capacity`, `--expensive-rate`, `--key`, `--trusted-proxy`,
//! `--fail-mode`, `--fallback-divisor`, `--store-timeout-ms`, `--headers`, `--admin-token`,
//! `--deny-cache`, `--breaker`, `--multi-quotas`, `--tiers`, `--tier-of`, `--metrics-listen`,
//! `--login-rate`, `--token-rate`, `--token-estimate`.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
#[cfg(feature = "redis")]
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use clap::{Parser, ValueEnum};
use serde_json::json;
use subtle::ConstantTimeEq;
use tollgate::key::{ApiKeyOrIp, ClientIp, Header, KeyError};
use tollgate::{
    BoxStore, Decision, FailMode, HeaderStyle, Key, KeyExtractor, MemoryStore, Quota,
    RateLimitLayer, Tiers,
};

/// tollgate demo: an axum API behind tollgate rate limits.
///
/// Routes: GET /api/hello (policy "default"), GET /api/expensive ("default" and "expensive"),
/// GET /api/multi (policy "multi"), GET /api/quota (a peek at "default"), POST /api/login
/// (policy "login", failed logins only), GET /api/tokens?used=N (policy "tokens", reserve then
/// reconcile), GET /api/tokens/quota (a peek at "tokens"), GET /healthz (never limited); with
/// --admin-token, GET /admin/stats, POST /admin/reset/{identity} and
/// POST /admin/tier/{identity}/{tier}.
#[derive(Debug, Parser)]
#[command(name = "demo")]
struct Args {
    /// Listen address.
    #[arg(long = "listen", value_name = "ADDR", default_value = "127.0.0.1:3000")]
    listen: SocketAddr,
    /// Use RedisStore at this URL (needs --features redis); omitted: MemoryStore.
    #[arg(long = "redis-url", value_name = "URL")]
    redis_url: Option<String>,
    /// Use RedisStore on the primary Redis Sentinel names --redis-master, asking these
    /// sentinels (comma-separated host:port list), instead of --redis-url; follows failovers.
    #[arg(
        long = "redis-sentinel",
        value_name = "ADDRS",
        conflicts_with = "redis_url",
        value_delimiter = ','
    )]
    redis_sentinel: Option<Vec<String>>,
    /// The master name the sentinels monitor (with --redis-sentinel).
    #[arg(long = "redis-master", value_name = "NAME", default_value = "mymaster")]
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    redis_master: String,
    /// Global policy "default", e.g. 60/m.
    #[arg(long = "rate", value_name = "RATE", default_value = "60/m")]
    rate: Quota,
    /// Capacity of the global policy [default: its limit].
    #[arg(long = "capacity", value_name = "N")]
    capacity: Option<u32>,
    /// Extra policy "expensive" on /api/expensive.
    #[arg(long = "expensive-rate", value_name = "RATE", default_value = "5/m")]
    expensive_rate: Quota,
    /// How clients are identified: ip | header:NAME | api-key-or-ip (API key from x-api-key,
    /// else the client IP).
    #[arg(long = "key", value_name = "KIND", default_value = "api-key-or-ip")]
    key: String,
    /// Forwarding headers are honoured only from peers in this range (repeatable).
    #[arg(long = "trusted-proxy", value_name = "CIDR")]
    trusted_proxies: Vec<String>,
    /// What to do when the store fails.
    #[arg(
        long = "fail-mode",
        value_enum,
        value_name = "MODE",
        default_value = "open"
    )]
    fail_mode: Mode,
    /// With --fail-mode fallback, each server enforces limit/N locally.
    #[arg(long = "fallback-divisor", value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    fallback_divisor: u32,
    /// Store command timeout in milliseconds.
    #[arg(long = "store-timeout-ms", value_name = "N", default_value_t = 50)]
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    store_timeout_ms: u64,
    /// Rate-limit header fields: ietf | legacy | both | none.
    #[arg(long = "headers", value_name = "STYLE", default_value = "ietf")]
    headers: HeaderStyle,
    /// Enables /admin/*, which then needs "Authorization: Bearer TOKEN".
    #[arg(long = "admin-token", value_name = "TOKEN", value_parser = parse_admin_token)]
    admin_token: Option<String>,
    /// Local deny cache in front of the shared store (Redis only).
    #[arg(
        long = "deny-cache",
        value_enum,
        value_name = "on|off",
        default_value = "on"
    )]
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    deny_cache: OnOff,
    /// Circuit breaker FAILURES/COOLDOWN_MS, e.g. 3/1000, or off (Redis only).
    #[arg(long = "breaker", value_name = "SPEC", default_value = "3/1000", value_parser = parse_breaker)]
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    breaker: Breaker,
    /// Policy "multi" on GET /api/multi: comma-separated quotas, all checked in one atomic
    /// decision; a denial charges none of them.
    #[arg(long = "multi-quotas", value_name = "LIST", default_value = "2/s,5/h", value_parser = parse_quota_list)]
    multi_quotas: QuotaList,
    /// Tiers of the global policy, e.g. "free=3/m,pro=10/m;capacity=20" (a tier of several
    /// quotas joins them with &); the first is the default tier, and each reports under its own
    /// name. Without it the global policy is --rate/--capacity.
    #[arg(long = "tiers", value_name = "LIST")]
    tiers: Option<Tiers>,
    /// Identity ID (API key, else client IP) starts in TIER (repeatable; needs --tiers).
    #[arg(long = "tier-of", value_name = "ID=TIER", value_parser = parse_tier_of, requires = "tiers")]
    tier_of: Vec<(String, String)>,
    /// Serve GET /metrics (Prometheus text format) on ADDR (needs --features metrics).
    #[arg(long = "metrics-listen", value_name = "ADDR")]
    metrics_listen: Option<SocketAddr>,
    /// Policy "login" on POST /api/login, counting failed logins only: 200 with the header
    /// "x-password: open-sesame", else 401; a successful login is refunded. Keyed like the
    /// global policy.
    #[arg(long = "login-rate", value_name = "RATE", default_value = "5/m")]
    login_rate: Quota,
    /// Policy "tokens" on GET /api/tokens?used=N (capacity: its limit): reserves
    /// --token-estimate at admission, then charges the actual N (into debt if need be) or gives
    /// the rest back. GET /api/tokens/quota peeks at it.
    #[arg(long = "token-rate", value_name = "RATE", default_value = "1000/m")]
    token_rate: Quota,
    /// Tokens reserved by each GET /api/tokens at admission (at most the --token-rate
    /// capacity).
    #[arg(long = "token-estimate", value_name = "N", default_value_t = 100)]
    token_estimate: u32,
}

/// An admin token a client can send in `Authorization: Bearer TOKEN`: not empty, no spaces or
/// control characters.
fn parse_admin_token(token: &str) -> Result<String, String> {
    if token.is_empty() {
        return Err(
            "the token is empty; write one a client can send, e.g. --admin-token s3cret".into(),
        );
    }
    if !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(
            "the token has spaces, control or non-ASCII characters, which an Authorization \
             header cannot carry; use printable ASCII only"
                .into(),
        );
    }
    Ok(token.to_owned())
}

fn parse_tier_of(item: &str) -> Result<(String, String), String> {
    match item.split_once('=') {
        Some((id, tier)) if !id.is_empty() && !tier.is_empty() => {
            Ok((id.to_owned(), tier.to_owned()))
        }
        _ => Err(format!("{item:?} is not ID=TIER, e.g. alice=pro")),
    }
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Mode {
    Open,
    Closed,
    Fallback,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum OnOff {
    On,
    Off,
}

/// `--breaker`: a configuration, or off.
#[derive(Debug, Clone, Copy)]
#[cfg_attr(not(feature = "redis"), allow(dead_code))]
struct Breaker(Option<tollgate::BreakerConfig>);

fn parse_breaker(spec: &str) -> Result<Breaker, String> {
    match spec {
        "off" => Ok(Breaker(None)),
        spec => spec
            .parse()
            .map(|c| Breaker(Some(c)))
            .map_err(|e| format!("{e}")),
    }
}

/// `--multi-quotas`: at least one quota.
#[derive(Debug, Clone)]
struct QuotaList(Vec<Quota>);

fn parse_quota_list(list: &str) -> Result<QuotaList, String> {
    let quotas = list
        .split(',')
        .map(|q| q.trim().parse::<Quota>().map_err(|e| e.to_string()))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(QuotaList(quotas))
}

/// The key extractor chosen with `--key`, behind one type.
#[derive(Clone)]
enum DemoKey {
    Ip(ClientIp),
    Header(Header),
    ApiKeyOrIp(ApiKeyOrIp),
}

impl DemoKey {
    fn inner(&self) -> &dyn KeyExtractor {
        match self {
            Self::Ip(k) => k,
            Self::Header(k) => k,
            Self::ApiKeyOrIp(k) => k,
        }
    }
}

impl KeyExtractor for DemoKey {
    fn extract(&self, req: &http::request::Parts) -> Option<Key> {
        self.inner().extract(req)
    }

    fn try_extract(&self, req: &http::request::Parts) -> Result<Option<Key>, KeyError> {
        self.inner().try_extract(req)
    }

    fn keys_for_identity(&self, identity: &str) -> Vec<Key> {
        self.inner().keys_for_identity(identity)
    }
}

fn key_extractor(args: &Args) -> Result<DemoKey, String> {
    let mut ip = ClientIp::new();
    for cidr in &args.trusted_proxies {
        ip = ip
            .trust(cidr)
            .map_err(|e| format!("--trusted-proxy: {e}"))?;
    }
    match args.key.as_str() {
        "ip" => Ok(DemoKey::Ip(ip)),
        "api-key-or-ip" => {
            let header = Header::new("x-api-key").map_err(|e| e.to_string())?;
            Ok(DemoKey::ApiKeyOrIp(ApiKeyOrIp::new(header, ip)))
        }
        other => match other.strip_prefix("header:") {
            Some(name) => Header::new(name)
                .map(DemoKey::Header)
                .map_err(|e| format!("--key: {e}")),
            None => Err(format!(
                "--key {other:?} is not one of ip, header:NAME, api-key-or-ip"
            )),
        },
    }
}

fn fail_mode(args: &Args) -> FailMode {
    match args.fail_mode {
        Mode::Open => FailMode::Open,
        Mode::Closed => FailMode::Closed,
        Mode::Fallback => FailMode::Fallback {
            divisor: args.fallback_divisor,
        },
    }
}

/// Store-specific counters for `/admin/stats` (deny cache, circuit breaker).
type StoreStats = Arc<dyn Fn() -> serde_json::Value + Send + Sync>;

/// Shared state of the admin routes.
#[derive(Clone)]
struct AppState {
    store_name: &'static str,
    store_stats: StoreStats,
    default: RateLimitLayer<BoxStore, DemoKey>,
    expensive: RateLimitLayer<BoxStore, DemoKey>,
    multi: RateLimitLayer<BoxStore, DemoKey>,
    login: RateLimitLayer<BoxStore, DemoKey>,
    tokens: RateLimitLayer<BoxStore, DemoKey>,
    admin_token: Option<String>,
}

impl AppState {
    /// Every layer of the demo, by policy name.
    fn layers(&self) -> [&RateLimitLayer<BoxStore, DemoKey>; 5] {
        [
            &self.default,
            &self.expensive,
            &self.multi,
            &self.login,
            &self.tokens,
        ]
    }
}

/// The demo app on `store`, whichever store the flags chose.
fn app(
    args: &Args,
    store: BoxStore,
    store_name: &'static str,
    store_stats: StoreStats,
) -> Result<Router, String> {
    let key = key_extractor(args)?;
    let fail_mode = fail_mode(args);
    let mut rate = args.rate;
    if let Some(capacity) = args.capacity {
        rate = rate
            .with_capacity(capacity)
            .map_err(|e| format!("--capacity: {e}"))?;
    }
    let mut default = RateLimitLayer::builder(rate).policy("default");
    if let Some(tiers) = &args.tiers {
        default = default.tiers(tiers.clone());
    }
    let default = default
        .store(store.clone())
        .key(key.clone())
        .headers(args.headers)
        .fail_mode(fail_mode)
        .skip(|req| {
            let path = req.uri.path();
            path == "/healthz"
                || path == "/api/multi"
                || path == "/api/login"
                || path.starts_with("/api/tokens")
                || path.starts_with("/admin/")
        })
        .cost(|req| u32::from(req.uri.path() != "/api/quota"))
        .build()
        .map_err(|e| format!("policy default: {e}"))?;
    for (identity, tier) in &args.tier_of {
        default
            .set_tier(identity, tier)
            .map_err(|e| format!("--tier-of {identity}={tier}: {e}"))?;
    }
    let expensive = RateLimitLayer::builder(args.expensive_rate)
        .policy("expensive")
        .store(store.clone())
        .key(key.clone())
        .headers(args.headers)
        .fail_mode(fail_mode)
        .build()
        .map_err(|e| format!("policy expensive: {e}"))?;
    let (first, more) = args
        .multi_quotas
        .0
        .split_first()
        .ok_or("--multi-quotas needs at least one quota")?;
    let multi = more
        .iter()
        .fold(RateLimitLayer::builder(*first), |b, q| b.and_quota(*q))
        .policy("multi")
        .store(store.clone())
        .key(key.clone())
        .headers(args.headers)
        .fail_mode(fail_mode)
        .build()
        .map_err(|e| format!("--multi-quotas: {e}"))?;
    let login = RateLimitLayer::builder(args.login_rate)
        .policy("login")
        .store(store.clone())
        .key(key.clone())
        .headers(args.headers)
        .fail_mode(fail_mode)
        .skip_successful()
        .build()
        .map_err(|e| format!("--login-rate: {e}"))?;
    let capacity = args.token_rate.capacity();
    if args.token_estimate > capacity {
        return Err(format!(
            "--token-estimate {} is above the capacity of --token-rate {} ({capacity}): no \
             request could ever be admitted; reserve at most {capacity}",
            args.token_estimate, args.token_rate
        ));
    }
    let estimate = args.token_estimate;
    let tokens = RateLimitLayer::builder(args.token_rate)
        .policy("tokens")
        .store(store.clone())
        .key(key.clone())
        .headers(args.headers)
        .fail_mode(fail_mode)
        .cost(move |req| {
            if req.uri.path() == "/api/tokens/quota" {
                0
            } else {
                estimate
            }
        })
        .reconcile(true)
        .build()
        .map_err(|e| format!("--token-rate: {e}"))?;
    let state = AppState {
        store_name,
        store_stats,
        default: default.clone(),
        expensive: expensive.clone(),
        multi: multi.clone(),
        login: login.clone(),
        tokens: tokens.clone(),
        admin_token: args.admin_token.clone(),
    };
    let tokens_routes = Router::new()
        .route("/api/tokens", get(tokens_handler))
        .route("/api/tokens/quota", get(quota))
        .route_layer(tokens);
    let mut router = Router::new()
        .route("/api/hello", get(hello))
        .route(
            "/api/expensive",
            get(expensive_handler).route_layer(expensive),
        )
        .route("/api/quota", get(quota))
        .route("/api/multi", get(multi_handler).route_layer(multi))
        .route("/api/login", post(login_handler).route_layer(login))
        .merge(tokens_routes)
        .route("/healthz", get(healthz));
    if state.admin_token.is_some() {
        router = router
            .route("/admin/stats", get(stats))
            .route("/admin/reset/{identity}", post(reset))
            .route("/admin/tier/{identity}/{tier}", post(move_tier));
    }
    Ok(router.layer(default).with_state(state))
}

async fn hello(decision: Option<Extension<Decision>>) -> Json<serde_json::Value> {
    Json(json!({
        "message": "hello",
        "remaining": decision.map(|Extension(d)| d.remaining()),
    }))
}

async fn multi_handler(Extension(d): Extension<Decision>) -> Json<serde_json::Value> {
    let remaining: Vec<u32> = d.per_quota().iter().map(Decision::remaining).collect();
    Json(json!({ "message": "every quota admitted this", "remaining": remaining }))
}

/// 200 for the right password, else 401: policy "login" refunds the 200s, so only failures
/// count.
async fn login_handler(headers: HeaderMap) -> Response {
    if headers
        .get("x-password")
        .is_some_and(|p| bool::from(p.as_bytes().ct_eq(b"open-sesame")))
    {
        Json(json!({ "message": "welcome" })).into_response()
    } else {
        (
            StatusCode::UNAUTHORIZED,
            Json(json!({ "error": "wrong password" })),
        )
            .into_response()
    }
}

/// Reports `used` as the request's actual cost: policy "tokens" reserved --token-estimate at
/// admission and settles the difference before this response leaves. Without a valid `used`,
/// 400, and the reservation stands.
async fn tokens_handler(uri: http::Uri) -> Response {
    let used = uri
        .query()
        .unwrap_or("")
        .split('&')
        .find_map(|pair| pair.strip_prefix("used="))
        .map(str::parse::<u32>);
    match used {
        Some(Ok(used)) => (
            Extension(tollgate::ActualCost(used)),
            Json(json!({ "used": used })),
        )
            .into_response(),
        _ => (
            StatusCode::BAD_REQUEST,
            Json(json!({ "error": "give the tokens used as ?used=N, a whole number" })),
        )
            .into_response(),
    }
}

async fn expensive_handler() -> Json<serde_json::Value> {
    Json(json!({ "message": "an expensive answer" }))
}

async fn quota(decision: Option<Extension<Decision>>) -> Json<serde_json::Value> {
    match decision {
        Some(Extension(d)) => Json(json!({
            "policy": d.policy(),
            "capacity": d.capacity(),
            "remaining": d.remaining(),
            "reset_after_ms": d.reset_after().as_millis() as u64,
            "next_available_ms": d.next_available().as_millis() as u64,
            "degraded": d.is_degraded(),
        })),
        None => Json(json!({ "policy": "default", "limited": false })),
    }
}

/// The request carries the admin token, compared in constant time (no timing side channel
/// tells an attacker how much of a guess was right).
fn authorized(state: &AppState, headers: &HeaderMap) -> bool {
    let Some(token) = &state.admin_token else {
        return false;
    };
    // The scheme is case-insensitive (RFC 9110 §11.1); the token is not.
    headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| {
            let v = v.as_bytes();
            let scheme = v.get(..b"Bearer ".len())?;
            scheme
                .eq_ignore_ascii_case(b"Bearer ")
                .then(|| v.get(b"Bearer ".len()..))
                .flatten()
        })
        .is_some_and(|given| bool::from(given.ct_eq(token.as_bytes())))
}

fn unauthorized() -> Response {
    (
        StatusCode::UNAUTHORIZED,
        [(http::header::WWW_AUTHENTICATE, "Bearer")],
        "missing or wrong admin token\n",
    )
        .into_response()
}

/// Never limited, never failing: 200 with the store's health as JSON (a Redis store is asked
/// for a PING within its command timeout).
async fn healthz(State(state): State<AppState>) -> Json<serde_json::Value> {
    let health = tollgate::Store::health(state.default.store()).await;
    Json(json!({
        "status": "ok",
        "store": state.store_name,
        "store_healthy": health.is_ok(),
        "store_error": health.err().map(|e| e.to_string()),
        "store_stats": (state.store_stats)(),
    }))
}

async fn stats(State(state): State<AppState>, headers: HeaderMap) -> Response {
    if !authorized(&state, &headers) {
        return unauthorized();
    }
    let policy = |layer: &RateLimitLayer<BoxStore, DemoKey>| {
        let s = layer.stats();
        json!({
            "quotas": layer
                .policy()
                .quotas()
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>(),
            "allowed": s.allowed,
            "denied": s.denied,
            "dry_run_denied": s.dry_run_denied,
            "unlimited": s.unlimited,
            "store_errors": s.store_errors,
            "degraded": s.degraded,
            "delayed": s.delayed,
            "unidentified": s.unidentified,
            "refunds": s.refunds,
            "extra_charges": s.extra_charges,
            "settle_failures": s.settle_failures,
        })
    };
    Json(json!({
        "store": state.store_name,
        "store_stats": (state.store_stats)(),
        "policies": {
            "default": policy(&state.default),
            "expensive": policy(&state.expensive),
            "multi": policy(&state.multi),
            "login": policy(&state.login),
            "tokens": policy(&state.tokens),
        }
    }))
    .into_response()
}

/// Resets one client, known by its identity (its API key, or its IP address), under every
/// policy, through each layer's own key extractor; the reply says what was cleared.
async fn reset(
    State(state): State<AppState>,
    Path(identity): Path<String>,
    headers: HeaderMap,
) -> Response {
    if !authorized(&state, &headers) {
        return unauthorized();
    }
    let mut cleared = serde_json::Map::new();
    for layer in state.layers() {
        match layer.reset_identity(&identity).await {
            Ok(keys) => {
                cleared.insert(layer.policy().name().to_owned(), json!(keys));
            }
            Err(e) => return (StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")).into_response(),
        }
    }
    if cleared.values().all(|keys| keys == 0) {
        let why = "no client can have this identity under the demo's --key (with --key ip, an \
                   identity is an IP address)";
        return (
            StatusCode::NOT_FOUND,
            Json(json!({ "reset": identity, "cleared": cleared, "error": why })),
        )
            .into_response();
    }
    // `cleared` counts, per policy, the store keys this identity can have (an API-key-else-IP
    // demo clears an address both as an API key and as an IP).
    Json(json!({ "reset": identity, "cleared": cleared })).into_response()
}

/// Moves one client, known by its identity, to another tier of the global policy, from its
/// next request on; 404 for a tier the demo does not have.
async fn move_tier(
    State(state): State<AppState>,
    Path((identity, tier)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    if !authorized(&state, &headers) {
        return unauthorized();
    }
    match state.default.set_tier(&identity, &tier) {
        Ok(0) => (
            StatusCode::NOT_FOUND,
            Json(json!({ "identity": identity, "error": "no client can have this identity under the demo's --key" })),
        )
            .into_response(),
        Ok(keys) => Json(json!({ "identity": identity, "tier": tier, "keys": keys })).into_response(),
        Err(e @ tollgate::ConfigError::UnknownTier { .. }) => (
            StatusCode::NOT_FOUND,
            Json(json!({ "tier": tier, "error": e.to_string() })),
        )
            .into_response(),
        Err(e) => (StatusCode::INSUFFICIENT_STORAGE, format!("{e}\n")).into_response(),
    }
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

/// Installs the Prometheus recorder and serves `GET /metrics` on `addr`.
#[cfg(feature = "metrics")]
async fn serve_metrics(addr: SocketAddr) -> Result<SocketAddr, String> {
    let handle = metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .map_err(|e| e.to_string())?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
    let metrics = Router::new().route(
        "/metrics",
        get(move || {
            let handle = handle.clone();
            async move {
                (
                    [(http::header::CONTENT_TYPE, "text/plain; version=0.0.4")],
                    handle.render(),
                )
            }
        }),
    );
    let bound = listener.local_addr().unwrap_or(addr);
    tokio::spawn(async move {
        let _ = axum::serve(listener, metrics).await;
    });
    Ok(bound)
}

#[cfg(not(feature = "metrics"))]
async fn serve_metrics(_addr: SocketAddr) -> Result<SocketAddr, String> {
    Err("metrics need the metrics feature: \
         cargo run --example demo --features metrics -- --metrics-listen 127.0.0.1:9090"
        .into())
}

/// Where the Redis store is: `--redis-url`, or `--redis-sentinel` with `--redis-master`.
#[cfg_attr(not(feature = "redis"), allow(dead_code))]
enum RedisTarget<'a> {
    Url(&'a str),
    Sentinel(&'a [String], &'a str),
}

#[cfg(feature = "redis")]
async fn redis_app(args: &Args, target: RedisTarget<'_>) -> Result<Router, String> {
    use tollgate::store::redis::RedisStore;
    use tollgate::{CircuitBreaker, DenyCache};
    let (builder, flag) = match target {
        RedisTarget::Url(url) => (RedisStore::builder(url), "--redis-url"),
        RedisTarget::Sentinel(sentinels, master) => (
            RedisStore::sentinel_builder(sentinels, master),
            "--redis-sentinel",
        ),
    };
    let redis = builder
        .command_timeout(Duration::from_millis(args.store_timeout_ms))
        .build()
        .await
        .map_err(|e| format!("{flag}: {e}"))?;
    // The deny cache sits in front, so a flood of denied requests never reaches the breaker or
    // Redis; the breaker sits right around Redis.
    match (args.deny_cache, args.breaker) {
        (OnOff::On, Breaker(Some(config))) => {
            let store = DenyCache::new(CircuitBreaker::new(redis).config(config));
            let (cache, breaker) = (store.clone(), store.get_ref().clone());
            let stats = Arc::new(
                move || json!({ "deny_cache": deny_cache_json(&cache), "breaker": breaker_json(&breaker) }),
            );
            app(args, BoxStore::new(store), "redis", stats)
        }
        (OnOff::On, Breaker(None)) => {
            let store = DenyCache::new(redis);
            let cache = store.clone();
            let stats = Arc::new(move || json!({ "deny_cache": deny_cache_json(&cache) }));
            app(args, BoxStore::new(store), "redis", stats)
        }
        (OnOff::Off, Breaker(Some(config))) => {
            let store = CircuitBreaker::new(redis).config(config);
            let breaker = store.clone();
            let stats = Arc::new(move || json!({ "breaker": breaker_json(&breaker) }));
            app(args, BoxStore::new(store), "redis", stats)
        }
        (OnOff::Off, Breaker(None)) => {
            app(args, BoxStore::new(redis), "redis", Arc::new(|| json!({})))
        }
    }
}

#[cfg(feature = "redis")]
fn deny_cache_json<S, C: tollgate::Clock>(cache: &tollgate::DenyCache<S, C>) -> serde_json::Value {
    let s = cache.stats();
    json!({ "local_denials": s.local_denials, "store_calls": s.store_calls, "entries": s.entries })
}

#[cfg(feature = "redis")]
fn breaker_json<S, C: tollgate::Clock>(
    breaker: &tollgate::CircuitBreaker<S, C>,
) -> serde_json::Value {
    let s = breaker.stats();
    json!({
        "state": s.state.to_string(),
        "consecutive_failures": s.consecutive_failures,
        "opened": s.opened,
        "rejected": s.rejected,
        "probes": s.probes,
    })
}

#[cfg(not(feature = "redis"))]
async fn redis_app(_args: &Args, target: RedisTarget<'_>) -> Result<Router, String> {
    Err(match target {
        RedisTarget::Url(_) => {
            "--redis-url needs the redis feature: \
             cargo run --example demo --features redis -- --redis-url redis://127.0.0.1:6379"
        }
        RedisTarget::Sentinel(..) => {
            "--redis-sentinel needs the redis feature: \
             cargo run --example demo --features redis -- --redis-sentinel 127.0.0.1:26379"
        }
    }
    .into())
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber_init();
    // Exits 2 with a message on a bad flag, 0 after --help.
    let args = Args::parse();
    // The recorder comes first: layers register their metrics when they are built.
    let metrics_addr = match args.metrics_listen {
        None => None,
        Some(addr) => match serve_metrics(addr).await {
            Ok(bound) => Some(bound),
            Err(e) => {
                eprintln!("error: --metrics-listen: {e}");
                return ExitCode::from(2);
            }
        },
    };
    let target = match (&args.redis_url, &args.redis_sentinel) {
        (Some(url), _) => Some(RedisTarget::Url(url)),
        (None, Some(sentinels)) => Some(RedisTarget::Sentinel(sentinels, &args.redis_master)),
        (None, None) => None,
    };
    let built = match target {
        Some(target) => redis_app(&args, target).await.map(|r| (r, "redis")),
        None => app(
            &args,
            BoxStore::new(MemoryStore::new()),
            "memory",
            Arc::new(|| json!({})),
        )
        .map(|r| (r, "memory")),
    };
    let (router, store_name) = match built {
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
    let limit = match &args.tiers {
        Some(tiers) => format!("tiers: {tiers}"),
        None => format!("rate: {}", args.rate),
    };
    let metrics = metrics_addr.map_or(String::new(), |m| format!(", metrics: {m}/metrics"));
    println!(
        "tollgate demo listening on http://{addr} (store: {store_name}, {limit}, key: {}{metrics})",
        args.key
    );
    let served = axum::serve(
        listener,
        router.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown_signal())
    .await;
    match served {
        Ok(()) => {
            println!("tollgate demo stopped");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Logs events to stderr: warnings and errors by default (a store that cannot be reached, a
/// request let through because the store failed, at most one a second), or what `RUST_LOG`
/// asks for (e.g. `RUST_LOG=info` for every denial as well).
fn tracing_subscriber_init() {
    let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".to_owned());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

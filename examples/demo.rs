//! The tollgate demo server: a small axum API behind rate-limit layers, per DESIGN.md §7.
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
//! `GET /healthz` (never limited), and with `--admin-token` `GET /admin/stats` and
//! `POST /admin/reset/{key}`. `--help` lists the flags.

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
use serde_json::json;
use tollgate::key::{ApiKeyOrIp, ClientIp, Header};
use tollgate::{
    Decision, FailMode, HeaderStyle, Key, KeyExtractor, MemoryStore, Quota, RateLimitLayer, Store,
};

const USAGE: &str = "\
tollgate demo: an axum API behind tollgate rate limits

USAGE: cargo run --example demo -- [FLAGS]

  --listen ADDR            listen address (default 127.0.0.1:3000)
  --redis-url URL          use RedisStore (needs --features redis); omitted: MemoryStore
  --rate RATE              global policy \"default\", e.g. 60/m (default 60/m)
  --capacity N             capacity of the global policy (default: its limit)
  --expensive-rate RATE    extra policy \"expensive\" on /api/expensive (default 5/m)
  --key KIND               ip | header:NAME | api-key-or-ip (default api-key-or-ip, header x-api-key)
  --trusted-proxy CIDR     repeatable; forwarding headers honoured only from these peers
  --fail-mode MODE         open | closed | fallback (default open)
  --fallback-divisor N     with --fail-mode fallback, each server enforces limit/N locally (default 1)
  --store-timeout-ms N     store command timeout (default 50)
  --headers STYLE          ietf | legacy | both | none (default ietf)
  --admin-token TOKEN      enables /admin/*, which then needs \"Authorization: Bearer TOKEN\"
  --deny-cache on|off      local deny cache in front of the shared store (default on; Redis only)
  --breaker SPEC           circuit breaker FAILURES/COOLDOWN_MS, e.g. 3/1000 (default), or off
                           (Redis only)
  --multi-quotas LIST      policy \"multi\" on GET /api/multi: comma-separated quotas, all checked in
                           one atomic decision (default \"2/s,5/h\"); a denial charges none of them
  --help                   this text
";

#[derive(Debug)]
struct Args {
    listen: SocketAddr,
    redis_url: Option<String>,
    rate: Quota,
    capacity: Option<u32>,
    expensive_rate: Quota,
    key: String,
    trusted_proxies: Vec<String>,
    fail_mode: String,
    fallback_divisor: u32,
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    store_timeout_ms: u64,
    headers: HeaderStyle,
    admin_token: Option<String>,
    multi_quotas: Vec<Quota>,
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    deny_cache: bool,
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    breaker: Option<tollgate::BreakerConfig>,
}

fn parse_args(mut argv: impl Iterator<Item = String>) -> Result<Option<Args>, String> {
    let mut args = Args {
        listen: SocketAddr::from(([127, 0, 0, 1], 3000)),
        redis_url: None,
        rate: "60/m".parse().map_err(|e| format!("{e}"))?,
        capacity: None,
        expensive_rate: "5/m".parse().map_err(|e| format!("{e}"))?,
        key: "api-key-or-ip".into(),
        trusted_proxies: Vec::new(),
        fail_mode: "open".into(),
        fallback_divisor: 1,
        store_timeout_ms: 50,
        headers: HeaderStyle::Ietf,
        admin_token: None,
        multi_quotas: parse_quota_list("2/s,5/h")?,
        deny_cache: true,
        breaker: Some(tollgate::BreakerConfig::default()),
    };
    while let Some(flag) = argv.next() {
        if flag == "--help" || flag == "-h" {
            return Ok(None);
        }
        let (name, inline) = match flag.split_once('=') {
            Some((n, v)) => (n.to_owned(), Some(v.to_owned())),
            None => (flag.clone(), None),
        };
        let mut value = || {
            inline
                .clone()
                .or_else(|| argv.next())
                .ok_or_else(|| format!("{name} needs a value"))
        };
        let bad = |what: &str, e: &dyn std::fmt::Display| format!("{name}: {what}: {e}");
        match name.as_str() {
            "--listen" => {
                let v = value()?;
                args.listen = v.parse().map_err(|e| bad(&v, &e))?;
            }
            "--redis-url" => args.redis_url = Some(value()?),
            "--rate" => {
                let v = value()?;
                args.rate = v.parse().map_err(|e| bad(&v, &e))?;
            }
            "--capacity" => {
                let v = value()?;
                args.capacity = Some(v.parse().map_err(|e| bad(&v, &e))?);
            }
            "--expensive-rate" => {
                let v = value()?;
                args.expensive_rate = v.parse().map_err(|e| bad(&v, &e))?;
            }
            "--key" => args.key = value()?,
            "--trusted-proxy" => args.trusted_proxies.push(value()?),
            "--fail-mode" => args.fail_mode = value()?,
            "--fallback-divisor" => {
                let v = value()?;
                args.fallback_divisor = v.parse().map_err(|e| bad(&v, &e))?;
            }
            "--store-timeout-ms" => {
                let v = value()?;
                args.store_timeout_ms = v.parse().map_err(|e| bad(&v, &e))?;
            }
            "--headers" => {
                let v = value()?;
                args.headers = v.parse().map_err(|e| bad(&v, &e))?;
            }
            "--admin-token" => args.admin_token = Some(value()?),
            "--deny-cache" => {
                args.deny_cache = match value()?.as_str() {
                    "on" => true,
                    "off" => false,
                    other => return Err(format!("--deny-cache {other:?} is not on or off")),
                }
            }
            "--breaker" => {
                let v = value()?;
                args.breaker = match v.as_str() {
                    "off" => None,
                    spec => Some(spec.parse().map_err(|e| bad(spec, &e))?),
                };
            }
            "--multi-quotas" => {
                let v = value()?;
                args.multi_quotas = parse_quota_list(&v).map_err(|e| bad(&v, &e))?;
            }
            other => return Err(format!("unknown flag {other:?}")),
        }
    }
    Ok(Some(args))
}

fn parse_quota_list(list: &str) -> Result<Vec<Quota>, String> {
    list.split(',')
        .map(|q| q.trim().parse::<Quota>().map_err(|e| e.to_string()))
        .collect()
}

/// The key extractor chosen with `--key`, behind one type.
#[derive(Clone)]
enum DemoKey {
    Ip(ClientIp),
    Header(Header),
    ApiKeyOrIp(ApiKeyOrIp),
}

impl KeyExtractor for DemoKey {
    fn extract(&self, req: &http::request::Parts) -> Option<Key> {
        match self {
            Self::Ip(k) => k.extract(req),
            Self::Header(k) => k.extract(req),
            Self::ApiKeyOrIp(k) => k.extract(req),
        }
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

fn fail_mode(args: &Args) -> Result<FailMode, String> {
    match args.fail_mode.as_str() {
        "open" => Ok(FailMode::Open),
        "closed" => Ok(FailMode::Closed),
        "fallback" if args.fallback_divisor > 0 => Ok(FailMode::Fallback {
            divisor: args.fallback_divisor,
        }),
        "fallback" => Err("--fallback-divisor must be at least 1".into()),
        other => Err(format!(
            "--fail-mode {other:?} is not one of open, closed, fallback"
        )),
    }
}

/// Store-specific counters for `/admin/stats` (deny cache, circuit breaker).
type StoreStats = Arc<dyn Fn() -> serde_json::Value + Send + Sync>;

/// Shared state of the admin routes.
struct AppState<St: Store> {
    store_name: &'static str,
    store_stats: StoreStats,
    store: St,
    default: RateLimitLayer<St, DemoKey>,
    expensive: RateLimitLayer<St, DemoKey>,
    multi: RateLimitLayer<St, DemoKey>,
    admin_token: Option<String>,
}

impl<St: Store> Clone for AppState<St>
where
    St: Clone,
{
    fn clone(&self) -> Self {
        Self {
            store_name: self.store_name,
            store_stats: Arc::clone(&self.store_stats),
            store: self.store.clone(),
            default: self.default.clone(),
            expensive: self.expensive.clone(),
            multi: self.multi.clone(),
            admin_token: self.admin_token.clone(),
        }
    }
}

fn app<St: Store + Clone>(
    args: &Args,
    store: St,
    store_name: &'static str,
    store_stats: StoreStats,
) -> Result<Router, String> {
    let key = key_extractor(args)?;
    let fail_mode = fail_mode(args)?;
    let mut rate = args.rate;
    if let Some(capacity) = args.capacity {
        rate = rate
            .with_capacity(capacity)
            .map_err(|e| format!("--capacity: {e}"))?;
    }
    let default = RateLimitLayer::builder(rate)
        .policy("default")
        .store(store.clone())
        .key(key.clone())
        .headers(args.headers)
        .fail_mode(fail_mode)
        .skip(|req| {
            let path = req.uri.path();
            path == "/healthz" || path == "/api/multi" || path.starts_with("/admin/")
        })
        .cost(|req| u32::from(req.uri.path() != "/api/quota"))
        .build()
        .map_err(|e| format!("policy default: {e}"))?;
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
    let state = AppState {
        store_name,
        store_stats,
        store,
        default: default.clone(),
        expensive: expensive.clone(),
        multi: multi.clone(),
        admin_token: args.admin_token.clone(),
    };
    let mut router = Router::new()
        .route("/api/hello", get(hello))
        .route(
            "/api/expensive",
            get(expensive_handler).route_layer(expensive),
        )
        .route("/api/quota", get(quota))
        .route("/api/multi", get(multi_handler).route_layer(multi))
        .route("/healthz", get(|| async { "ok\n" }));
    if state.admin_token.is_some() {
        router = router
            .route("/admin/stats", get(stats::<St>))
            .route("/admin/reset/{key}", post(reset::<St>));
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

async fn expensive_handler() -> Json<serde_json::Value> {
    Json(json!({ "message": "an expensive answer" }))
}

async fn quota(decision: Option<Extension<Decision>>) -> Json<serde_json::Value> {
    match decision {
        Some(Extension(d)) => Json(json!({
            "policy": "default",
            "capacity": d.capacity(),
            "remaining": d.remaining(),
            "reset_after_ms": d.reset_after().as_millis() as u64,
            "next_available_ms": d.next_available().as_millis() as u64,
            "degraded": d.is_degraded(),
        })),
        None => Json(json!({ "policy": "default", "limited": false })),
    }
}

fn authorized<St: Store>(state: &AppState<St>, headers: &HeaderMap) -> bool {
    let Some(token) = &state.admin_token else {
        return false;
    };
    headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|given| given.as_bytes() == token.as_bytes())
}

fn unauthorized() -> Response {
    (
        StatusCode::UNAUTHORIZED,
        [(http::header::WWW_AUTHENTICATE, "Bearer")],
        "missing or wrong admin token\n",
    )
        .into_response()
}

async fn stats<St: Store>(State(state): State<AppState<St>>, headers: HeaderMap) -> Response {
    if !authorized(&state, &headers) {
        return unauthorized();
    }
    let policy = |layer: &RateLimitLayer<St, DemoKey>| {
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
        })
    };
    Json(json!({
        "store": state.store_name,
        "store_stats": (state.store_stats)(),
        "policies": {
            "default": policy(&state.default),
            "expensive": policy(&state.expensive),
            "multi": policy(&state.multi),
        }
    }))
    .into_response()
}

async fn reset<St: Store>(
    State(state): State<AppState<St>>,
    Path(key): Path<String>,
    headers: HeaderMap,
) -> Response {
    if !authorized(&state, &headers) {
        return unauthorized();
    }
    let key = Key::from(key.as_str());
    for layer in [&state.default, &state.expensive, &state.multi] {
        if let Err(e) = state.store.reset(layer.policy(), &key).await {
            return (StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")).into_response();
        }
    }
    Json(json!({ "reset": key.raw().to_string(), "policies": ["default", "expensive", "multi"] }))
        .into_response()
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

#[cfg(feature = "redis")]
async fn redis_app(args: &Args, url: &str) -> Result<Router, String> {
    use tollgate::{CircuitBreaker, DenyCache};
    let redis = tollgate::store::redis::RedisStore::builder(url)
        .command_timeout(Duration::from_millis(args.store_timeout_ms))
        .build()
        .await
        .map_err(|e| format!("--redis-url: {e}"))?;
    // The deny cache sits in front, so a flood of denied requests never reaches the breaker or
    // Redis; the breaker sits right around Redis.
    match (args.deny_cache, args.breaker) {
        (true, Some(config)) => {
            let store = DenyCache::new(CircuitBreaker::new(redis).config(config));
            let (cache, breaker) = (store.clone(), store.get_ref().clone());
            let stats = Arc::new(
                move || json!({ "deny_cache": deny_cache_json(&cache), "breaker": breaker_json(&breaker) }),
            );
            app(args, store, "redis", stats)
        }
        (true, None) => {
            let store = DenyCache::new(redis);
            let cache = store.clone();
            let stats = Arc::new(move || json!({ "deny_cache": deny_cache_json(&cache) }));
            app(args, store, "redis", stats)
        }
        (false, Some(config)) => {
            let store = CircuitBreaker::new(redis).config(config);
            let breaker = store.clone();
            let stats = Arc::new(move || json!({ "breaker": breaker_json(&breaker) }));
            app(args, store, "redis", stats)
        }
        (false, None) => app(args, redis, "redis", Arc::new(|| json!({}))),
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
async fn redis_app(_args: &Args, _url: &str) -> Result<Router, String> {
    Err("--redis-url needs the redis feature: \
         cargo run --example demo --features redis -- --redis-url redis://127.0.0.1:6379"
        .into())
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber_init();
    let args = match parse_args(std::env::args().skip(1)) {
        Ok(Some(args)) => args,
        Ok(None) => {
            print!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("error: {e}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let built = match &args.redis_url {
        Some(url) => redis_app(&args, url).await.map(|r| (r, "redis")),
        None => {
            app(&args, MemoryStore::new(), "memory", Arc::new(|| json!({}))).map(|r| (r, "memory"))
        }
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
    println!(
        "tollgate demo listening on http://{addr} (store: {store_name}, rate: {}, key: {})",
        args.rate, args.key
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

/// Logs `tollgate::*` events to stderr when `RUST_LOG` is set (e.g. `RUST_LOG=info`).
fn tracing_subscriber_init() {
    if let Ok(filter) = std::env::var("RUST_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .try_init();
    }
}

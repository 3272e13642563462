//! [`RateLimitLayer`] and its builder: everything about a layer is decided here, at build time.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use http::request::Parts;
use http::{Response, StatusCode};
use tower_layer::Layer;
use tracing::Level;

use crate::MemoryStore;
use crate::decide::{CostFn, Counters, Shared, SkipFn, Stats, TierEntry};
use crate::error::{ConfigError, StoreError};
use crate::headers::{HeaderStyle, ResetStyle};
use crate::key::{ClientIp, KeyExtractor};
use crate::quota::Quota;
use crate::response::{DefaultRejection, RejectWith, Rejection, RejectionBody};
use crate::service::RateLimit;
use crate::settle::RefundFn;
use crate::store::{FailMode, Policy, Store};
use crate::telemetry::LayerMetrics;
use crate::tier::{
    DEFAULT_MAX_ASSIGNMENTS, ResolveFn, Resolver, SelectFn, Tier, TierCache, Tiering, Tiers,
};

/// A Tower layer that rate-limits requests by key, with one [`Policy`] and one [`Store`].
///
/// ```
/// use axum::{Router, routing::get};
/// use tollgate::{Quota, RateLimitLayer, key::ClientIp};
///
/// let app: Router = Router::new()
///     .route("/", get(|| async { "hello" }))
///     .layer(RateLimitLayer::new(Quota::per_minute(60)?, ClientIp::new()));
/// # Ok::<(), tollgate::QuotaError>(())
/// ```
///
/// Every clone of the layer, and every service it makes, shares one store and one set of
/// counters. Several layers stack: all must admit a request, and a request denied by one layer
/// is never charged by a layer that has not run yet (inner layers run after outer ones).
pub struct RateLimitLayer<St = MemoryStore, K = ClientIp, R = DefaultRejection> {
    pub(crate) shared: Arc<Shared<St, K, R>>,
}

impl<St, K, R> Clone for RateLimitLayer<St, K, R> {
    fn clone(&self) -> Self {
        Self {
            shared: Arc::clone(&self.shared),
        }
    }
}

impl<St, K, R> fmt::Debug for RateLimitLayer<St, K, R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimitLayer")
            .field("policy", self.shared.policy())
            .field("tiers", &self.shared.tiers.len())
            .field("fail_mode", &self.shared.fail_mode)
            .field("dry_run", &self.shared.dry_run)
            .finish_non_exhaustive()
    }
}

impl<K: KeyExtractor> RateLimitLayer<MemoryStore, K> {
    /// `quota` per client as `key` identifies them, in a new [`MemoryStore`] of its own, policy
    /// `"default"`, every other setting at its default.
    pub fn new(quota: Quota, key: K) -> Self {
        let policy = Policy::named_default(quota);
        let store = MemoryStore::new();
        if let Some(registry) = store.registry() {
            // A new store knows no other policy, so this cannot conflict.
            let _ = registry.register(&policy, false);
        }
        let tier = TierEntry::new(policy, 0, FailMode::default())
            .unwrap_or_else(|_| unreachable!("only a fallback divides the policy"));
        let parts = Builder::new(quota)
            .key(key)
            .store(store)
            .parts(vec![tier], None, "memory");
        Self::from_parts(parts)
    }
}

impl RateLimitLayer {
    /// A builder for every setting; call [`Builder::build`] to get the layer.
    pub fn builder(quota: Quota) -> Builder {
        Builder::new(quota)
    }
}

impl<St, K, R> RateLimitLayer<St, K, R> {
    fn from_parts(shared: Shared<St, K, R>) -> Self {
        Self {
            shared: Arc::new(shared),
        }
    }

    /// The layer's policy (name and quota); for a layer of tiers, the default tier's.
    pub fn policy(&self) -> &Policy {
        self.shared.policy()
    }

    /// The names of the layer's tiers, the default first (one name for a layer without tiers).
    pub fn tier_names(&self) -> impl Iterator<Item = &str> {
        self.shared.tiers.iter().map(|t| t.policy.name())
    }

    /// The policy of the tier called `name`.
    pub fn tier_policy(&self, name: &str) -> Option<&Policy> {
        self.tier_index(name).map(|i| &self.shared.tier(i).policy)
    }

    fn tier_index(&self, name: &str) -> Option<usize> {
        self.shared
            .tiers
            .iter()
            .position(|t| t.policy.name() == name)
    }

    /// The store the layer decides with.
    pub fn store(&self) -> &St {
        &self.shared.store
    }

    /// The key extractor the layer identifies clients with.
    pub fn key_extractor(&self) -> &K {
        &self.shared.key
    }

    /// The layer's counters so far.
    pub fn stats(&self) -> Stats {
        self.shared.counters.stats()
    }
}

impl<St: Store, K: KeyExtractor, R> RateLimitLayer<St, K, R> {
    /// Forgets the state of the client called `identity` under this layer's policy, in its
    /// store and in its fallback limiter: its next request is treated as a new client's.
    ///
    /// `identity` is what the client is known by (its API key, header value or IP address),
    /// not an internal store key: the layer's own key extractor says which keys that identity
    /// can have ([`KeyExtractor::keys_for_identity`]), so an API-key-else-IP layer resets both
    /// `key:<identity>` and, when it is an address, `ip:<identity>`. Returns how many keys were
    /// cleared: 0 when the extractor cannot map identities (a closure), so an admin endpoint
    /// can say truthfully that nothing was reset.
    ///
    /// ```
    /// use tollgate::RateLimitLayer;
    /// use tollgate::key::{ApiKeyOrIp, ClientIp, Header};
    ///
    /// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
    /// let layer = RateLimitLayer::builder("5/m".parse()?)
    ///     .key(ApiKeyOrIp::new(Header::new("x-api-key")?, ClientIp::new()))
    ///     .build()?;
    /// assert_eq!(layer.reset_identity("sk_live_123").await?, 1); // key:sk_live_123
    /// assert_eq!(layer.reset_identity("192.0.2.7").await?, 2); // as an API key and as an IP
    /// # Ok(()) }
    /// # tokio::runtime::Runtime::new().unwrap().block_on(run()).unwrap();
    /// ```
    ///
    /// # Errors
    /// The store's [`StoreError`] when it cannot reset (the fallback limiter never fails).
    ///
    /// A layer of tiers resets the identity under every tier (and keeps its tier assignment).
    pub async fn reset_identity(&self, identity: &str) -> Result<usize, StoreError> {
        let shared = &self.shared;
        let keys = shared.key.keys_for_identity(identity);
        for key in &keys {
            for tier in &*shared.tiers {
                shared.store.reset(&tier.policy, key).await?;
                if let (Some(fallback), Some(policy)) = (&shared.fallback, &tier.fallback) {
                    fallback.remove(policy, key);
                }
            }
        }
        Ok(keys.len())
    }

    /// Moves the client called `identity` (its API key or IP address, as for
    /// [`reset_identity`](Self::reset_identity)) to the tier called `tier`, from its next
    /// request on, whatever the selector or resolver say; returns how many keys the identity
    /// maps to (0: the key extractor cannot map identities, nothing was assigned).
    ///
    /// The client's next request is decided by that tier's own state (see
    /// [the tier docs](crate::tier) for exactly what it sees).
    ///
    /// ```
    /// use tollgate::{RateLimitLayer, Tiers};
    /// use tollgate::key::Header;
    ///
    /// let layer = RateLimitLayer::builder("3/m".parse()?)
    ///     .key(Header::new("x-api-key")?)
    ///     .tiers("free=3/m,pro=10/m".parse()?)
    ///     .build()?;
    /// assert_eq!(layer.set_tier("sk_live_42", "pro")?, 1);
    /// assert_eq!(layer.tier_of("sk_live_42"), Some("pro"));
    /// assert!(layer.set_tier("sk_live_42", "gold").is_err());
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    ///
    /// # Errors
    /// [`ConfigError::UnknownTier`] for a tier the layer does not have (the assignment is left
    /// as it was); [`ConfigError::Invalid`] past [`Builder::max_tier_assignments`].
    pub fn set_tier(&self, identity: &str, tier: &str) -> Result<usize, ConfigError> {
        let Some(index) = self.tier_index(tier) else {
            return Err(ConfigError::UnknownTier {
                name: tier.chars().take(80).collect(),
                known: self.tier_names().collect::<Vec<_>>().join(", "),
            });
        };
        let Some(tiering) = &self.shared.tiering else {
            // One tier only: it is already everyone's.
            return Ok(self.shared.key.keys_for_identity(identity).len());
        };
        let keys = self.shared.key.keys_for_identity(identity);
        tiering.assign(&keys, index)?;
        Ok(keys.len())
    }

    /// Forgets the runtime tier of the client called `identity`: the selector (or resolver,
    /// or default) decides its tier again. Returns how many assignments were removed.
    /// Cached resolver answers for it are dropped too, so the resolver is asked again.
    pub fn clear_tier(&self, identity: &str) -> usize {
        match &self.shared.tiering {
            Some(tiering) => {
                let keys = self.shared.key.keys_for_identity(identity);
                tiering.forget_resolved(&keys);
                tiering.unassign(&keys)
            }
            None => 0,
        }
    }

    /// How many times the tier resolver was called (every other request was answered from its
    /// cache, or did not need it).
    pub fn tier_lookups(&self) -> u64 {
        self.shared
            .tiering
            .as_ref()
            .map_or(0, Tiering::resolver_calls)
    }

    /// The tier assigned at runtime to the client called `identity`, if any.
    pub fn tier_of(&self, identity: &str) -> Option<&str> {
        let tiering = self.shared.tiering.as_ref()?;
        let keys = self.shared.key.keys_for_identity(identity);
        let index = keys.iter().find_map(|key| tiering.assigned(key))?;
        Some(self.shared.tier(index).policy.name())
    }
}

impl<S, St, K, R> RateLimit<S, St, K, R> {
    /// The layer that wraps services in `RateLimit`, named as tower-http names its own
    /// (`Timeout::layer(..)`): `RateLimit::layer(layer)` is `layer` itself. Build one with
    /// [`RateLimitLayer::builder`] or [`RateLimitLayer::new`].
    pub fn layer(layer: RateLimitLayer<St, K, R>) -> RateLimitLayer<St, K, R> {
        layer
    }
}

impl<S, St, K, R> Layer<S> for RateLimitLayer<St, K, R> {
    type Service = RateLimit<S, St, K, R>;

    fn layer(&self, inner: S) -> Self::Service {
        RateLimit::new(inner, Arc::clone(&self.shared))
    }
}

/// Configures a [`RateLimitLayer`]. Invalid settings are reported by [`Builder::build`].
///
/// ```
/// use axum::{Router, routing::get};
/// use tollgate::{FailMode, HeaderStyle, Quota, RateLimitLayer, RejectionBody, key::Header};
///
/// let layer = RateLimitLayer::builder("100/m;capacity=20".parse()?)
///     .policy("api")
///     .key(Header::new("x-api-key")?)
///     .cost(|req| if req.method == http::Method::POST { 5 } else { 1 })
///     .skip(|req| req.uri.path() == "/healthz")
///     .headers(HeaderStyle::Both)
///     .body(RejectionBody::Json)
///     .fail_mode(FailMode::Closed)
///     .build()?;
/// let app: Router = Router::new().route("/", get(|| async { "hi" })).layer(layer);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
///
/// A builder is `Clone` (when its store, key extractor and rejection are): configure a base
/// once and derive several layers from it, each with its own policy name.
#[must_use]
#[derive(Clone)]
pub struct Builder<St = MemoryStore, K = ClientIp, R = DefaultRejection> {
    settings: Settings,
    store: St,
    key: K,
    rejector: R,
}

/// Everything a builder holds besides its store, key extractor and rejection.
#[derive(Clone)]
struct Settings {
    quota: Quota,
    more_quotas: Vec<Quota>,
    policy_name: Option<String>,
    cost: Option<Arc<CostFn>>,
    skip: Option<Arc<SkipFn>>,
    refund: Option<Arc<RefundFn>>,
    reconcile: bool,
    fail_mode: FailMode,
    dry_run: bool,
    delay_after: Option<u32>,
    header_style: HeaderStyle,
    reset_style: ResetStyle,
    headers_on_allowed: bool,
    degraded_header: bool,
    /// A status given to [`Builder::status`] that is not 400..=599, reported by `build`.
    bad_status: Option<StatusCode>,
    rejection_fields: bool,
    response_decisions: bool,
    log_level: Level,
    log_raw_keys: bool,
    #[cfg(feature = "tonic")]
    grpc: crate::grpc::GrpcMode,
    tiers: Option<Tiers>,
    select_tier: Option<Arc<SelectFn>>,
    resolve_tier: Option<(Arc<ResolveFn>, TierCache)>,
    max_tier_assignments: usize,
}

impl<St, K, R> fmt::Debug for Builder<St, K, R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Builder")
            .field("quota", &self.settings.quota)
            .field("policy_name", &self.settings.policy_name)
            .finish_non_exhaustive()
    }
}

impl Builder {
    fn new(quota: Quota) -> Self {
        Self {
            settings: Settings {
                quota,
                more_quotas: Vec::new(),
                policy_name: None,
                cost: None,
                skip: None,
                refund: None,
                reconcile: false,
                fail_mode: FailMode::default(),
                dry_run: false,
                delay_after: None,
                header_style: HeaderStyle::default(),
                reset_style: ResetStyle::default(),
                headers_on_allowed: true,
                degraded_header: false,
                bad_status: None,
                rejection_fields: true,
                response_decisions: true,
                log_level: Level::INFO,
                log_raw_keys: false,
                #[cfg(feature = "tonic")]
                grpc: crate::grpc::GrpcMode::Auto,
                tiers: None,
                select_tier: None,
                resolve_tier: None,
                max_tier_assignments: DEFAULT_MAX_ASSIGNMENTS,
            },
            store: MemoryStore::new(),
            key: ClientIp::new(),
            rejector: DefaultRejection {
                rejection: Rejection {
                    status: StatusCode::TOO_MANY_REQUESTS,
                    body: RejectionBody::default(),
                },
            },
        }
    }
}

impl<St, K> Builder<St, K, DefaultRejection> {
    /// The status of a limited request's response (default `429 Too Many Requests`; 400..=599,
    /// checked by [`build`](Builder::build)).
    pub fn status(mut self, status: StatusCode) -> Self {
        if (400..=599).contains(&status.as_u16()) {
            self.rejector.rejection.status = status;
            self.settings.bad_status = None;
        } else {
            self.settings.bad_status = Some(status);
        }
        self
    }

    /// The body of a limited request's response (default short text).
    pub fn body(mut self, body: RejectionBody) -> Self {
        self.rejector.rejection.body = body;
        self
    }

    /// Answers denied requests with `reject(&decision, &request_parts)`, a response of the
    /// inner service's body type. tollgate still adds `Retry-After` (unless the response has
    /// one) and the rate-limit fields, unless [`rejection_fields(false)`](Builder::rejection_fields),
    /// and puts the decision into the response's extensions.
    ///
    /// ```
    /// use axum::{Router, body::Body, routing::get};
    /// use http::{Response, StatusCode};
    /// use tollgate::RateLimitLayer;
    ///
    /// let layer = RateLimitLayer::builder("60/m".parse()?)
    ///     .reject_with(|decision, req| {
    ///         let text = format!("slow down on {} ({} left)", req.uri.path(), decision.remaining());
    ///         let mut res = Response::new(Body::from(text));
    ///         *res.status_mut() = StatusCode::TOO_MANY_REQUESTS;
    ///         res
    ///     })
    ///     .build()?;
    /// let app: Router = Router::new().route("/", get(|| async { "hi" })).layer(layer);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn reject_with<F, B>(self, reject: F) -> Builder<St, K, RejectWith<F>>
    where
        F: Fn(&crate::Decision, &Parts) -> Response<B> + Send + Sync + 'static,
    {
        Builder {
            settings: self.settings,
            store: self.store,
            key: self.key,
            rejector: RejectWith(reject),
        }
    }

    /// Answers denied requests with anything axum can turn into a response (feature `axum`),
    /// as [`reject_with`](Builder::reject_with) does.
    ///
    /// ```
    /// use axum::{Json, Router, routing::get};
    /// use http::StatusCode;
    /// use tollgate::RateLimitLayer;
    ///
    /// let layer = RateLimitLayer::builder("60/m".parse()?)
    ///     .reject_into_response(|decision, _req| {
    ///         let retry = decision.retry_after().map(|r| r.as_secs_f64());
    ///         (StatusCode::TOO_MANY_REQUESTS, Json(serde_json::json!({ "retry_in": retry })))
    ///     })
    ///     .build()?;
    /// let app: Router = Router::new().route("/", get(|| async { "hi" })).layer(layer);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    #[cfg(feature = "axum")]
    pub fn reject_into_response<F, T>(
        self,
        reject: F,
    ) -> Builder<St, K, crate::response::RejectIntoResponse<F>>
    where
        F: Fn(&crate::Decision, &Parts) -> T + Send + Sync + 'static,
        T: axum::response::IntoResponse,
    {
        Builder {
            settings: self.settings,
            store: self.store,
            key: self.key,
            rejector: crate::response::RejectIntoResponse(reject),
        }
    }
}

impl<St, K, R> Builder<St, K, R> {
    /// The policy name, sent in `RateLimit` headers and used to namespace store keys
    /// (default `"default"`). 1 to 64 characters of ASCII letters, digits and `-_.:`.
    ///
    /// Layers that share a store and a name share their clients' state, which is right only
    /// when they enforce the same quotas (the same limit on several routers, or several app
    /// instances). So [`build`](Builder::build) fails when the store already has the name with
    /// other quotas, and when a second layer without a name of its own is built on a store
    /// that already has an unnamed one: name every layer of a shared store.
    pub fn policy(mut self, name: &str) -> Self {
        self.settings.policy_name = Some(name.to_owned());
        self
    }

    /// Adds another quota that every request must also satisfy, checked in the same atomic
    /// step (e.g. `"10/s;capacity=20"` and also `"1000/d"`). A denial by any quota charges
    /// none of them; the response reports every quota and `Retry-After` is the longest wait.
    ///
    /// ```
    /// use tollgate::RateLimitLayer;
    ///
    /// let layer = RateLimitLayer::builder("10/s;capacity=20".parse()?)
    ///     .and_quota("1000/d".parse()?)
    ///     .policy("api")
    ///     .build()?;
    /// assert_eq!(layer.policy().quotas().len(), 2);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn and_quota(mut self, quota: Quota) -> Self {
        self.settings.more_quotas.push(quota);
        self
    }

    /// How clients are identified (default: [`ClientIp`] with no trusted proxies).
    pub fn key<K2: KeyExtractor>(self, key: K2) -> Builder<St, K2, R> {
        Builder {
            settings: self.settings,
            store: self.store,
            key,
            rejector: self.rejector,
        }
    }

    /// Where state lives (default: a new [`MemoryStore`]). Pass a clone of one store to several
    /// layers to share it; each layer's policy name keeps their keys apart, and `build`
    /// refuses a name that the store already knows with other quotas, or a second layer left
    /// unnamed on one store (see [`Builder::policy`]).
    pub fn store<St2: Store>(self, store: St2) -> Builder<St2, K, R> {
        Builder {
            settings: self.settings,
            store,
            key: self.key,
            rejector: self.rejector,
        }
    }

    /// What each request costs (default 1). A cost of 0 is a peek: the request is checked and
    /// gets headers, but consumes nothing. A cost above the capacity can never pass.
    pub fn cost(mut self, cost: impl Fn(&Parts) -> u32 + Send + Sync + 'static) -> Self {
        self.settings.cost = Some(Arc::new(cost));
        self
    }

    /// Requests for which `skip` returns true pass unlimited, without headers.
    pub fn skip(mut self, skip: impl Fn(&Parts) -> bool + Send + Sync + 'static) -> Self {
        self.settings.skip = Some(Arc::new(skip));
        self
    }

    /// Gives an admitted request's charge back when `refund(status, headers)` of its response
    /// returns true: the limit then counts only the requests it returns false for (say, only
    /// failed logins). The request is still charged when it arrives, so concurrent attempts
    /// can never pass beyond the capacity; the refund is made once the inner service has
    /// answered, before the response is handed on (see [`crate::settle`] for exactly when a
    /// charge is given back, and what happens on panics, disconnects and store errors). A
    /// denied request is never refunded. Replaces an earlier rule (also the presets below).
    ///
    /// ```
    /// use http::StatusCode;
    /// use tollgate::RateLimitLayer;
    ///
    /// // Count only the requests that ended in 429 or 5xx from the upstream.
    /// let layer = RateLimitLayer::builder("100/m".parse()?)
    ///     .refund_when(|status, _headers| {
    ///         status != StatusCode::TOO_MANY_REQUESTS && !status.is_server_error()
    ///     })
    ///     .build()?;
    /// # let _ = layer;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn refund_when(
        mut self,
        refund: impl Fn(StatusCode, &http::HeaderMap) -> bool + Send + Sync + 'static,
    ) -> Self {
        self.settings.refund = Some(Arc::new(refund));
        self
    }

    /// Counts only failed requests: a response with a status below 400 gets its charge back
    /// (express-rate-limit's `skipSuccessfulRequests`; brute-force protection of a login, see
    /// `examples/login_recipe.rs`). A gRPC call (`content-type: application/grpc*`, always
    /// HTTP 200) is judged by its `grpc-status` header instead: a call that ended with an error
    /// status keeps its charge. A gRPC status sent in the trailers (after a response message)
    /// cannot be seen before the response is handed on, so such a call counts as successful.
    /// Same as [`refund_when`](Self::refund_when) with that rule.
    ///
    /// ```
    /// use tollgate::RateLimitLayer;
    ///
    /// let login = RateLimitLayer::builder("5/m".parse()?)
    ///     .policy("login")
    ///     .skip_successful()
    ///     .build()?;
    /// # let _ = login;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn skip_successful(self) -> Self {
        self.refund_when(|status, headers| {
            crate::settle::ended(status, headers) == crate::settle::Ended::Success
        })
    }

    /// Counts only successful requests: a response with a status of 400 or more (4xx, 5xx),
    /// or a gRPC call whose `grpc-status` header is not OK, gets its charge back
    /// (express-rate-limit's `skipFailedRequests`). Same as
    /// [`refund_when`](Self::refund_when) with that rule.
    pub fn skip_failed(self) -> Self {
        self.refund_when(|status, headers| {
            crate::settle::ended(status, headers) != crate::settle::Ended::Success
        })
    }

    /// Does not charge requests that failed on the server's side: a response with a 5xx status,
    /// or a gRPC call ended UNKNOWN, DEADLINE_EXCEEDED, INTERNAL, UNAVAILABLE or DATA_LOSS,
    /// gets its charge back. Same as [`refund_when`](Self::refund_when) with that rule.
    pub fn skip_server_errors(self) -> Self {
        self.refund_when(|status, headers| {
            crate::settle::ended(status, headers) == crate::settle::Ended::ServerError
        })
    }

    /// Reserve and reconcile: the cost charged at admission ([`cost`](Self::cost)) is an
    /// estimate, and the handler reports the real cost with an
    /// [`ActualCost`](crate::ActualCost) in the response's extensions. The layer then charges
    /// the difference unconditionally, into debt if need be (the client's next requests wait,
    /// or are denied with a `Retry-After` that counts the debt), or gives it back, before the
    /// response is handed on; a peek reports the reconciled state. A response without an
    /// `ActualCost` keeps the reservation. With a refund rule as well, a refunded response
    /// gives the whole reservation back instead. Default off. See [`crate::settle`].
    pub fn reconcile(mut self, on: bool) -> Self {
        self.settings.reconcile = on;
        self
    }

    /// What to do when the store fails (default [`FailMode::Open`]).
    pub fn fail_mode(mut self, mode: FailMode) -> Self {
        self.settings.fail_mode = mode;
        self
    }

    /// Evaluate, log and send headers, but never deny (nginx `limit_req_dry_run`). Requests
    /// that would have been denied are counted in [`Stats::dry_run_denied`] and charge nothing.
    pub fn dry_run(mut self, on: bool) -> Self {
        self.settings.dry_run = on;
        self
    }

    /// Smooth bursts instead of admitting them at once: the first `n` requests of a burst are
    /// served immediately, each later one (up to the capacity) waits until it conforms to the
    /// rate, and requests beyond the capacity are still rejected. This is nginx `limit_req`
    /// without `nodelay`: nginx `burst=b delay=d` is capacity `b + 1` with `delay_after(d + 1)`,
    /// and plain `burst=b` is `delay_after(1)`. Off by default (nginx `nodelay`).
    ///
    /// ```
    /// use tollgate::RateLimitLayer;
    ///
    /// // nginx: limit_req zone=z burst=12 delay=8; with rate=5r/s
    /// let layer = RateLimitLayer::builder("5/s;capacity=13".parse()?)
    ///     .delay_after(9)
    ///     .build()?;
    /// # let _ = layer;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    ///
    /// Delays hold the request in the service (a tokio timer; the runtime needs its time
    /// driver, as axum's has). `build` rejects `n = 0`.
    pub fn delay_after(mut self, n: u32) -> Self {
        self.settings.delay_after = Some(n);
        self
    }

    /// Which rate-limit header fields to send (default IETF draft-10).
    pub fn headers(mut self, style: HeaderStyle) -> Self {
        self.settings.header_style = style;
        self
    }

    /// How `X-RateLimit-Reset` is written (default: delta seconds).
    pub fn reset_style(mut self, style: ResetStyle) -> Self {
        self.settings.reset_style = style;
        self
    }

    /// Send the rate-limit fields on admitted responses too (default true).
    pub fn headers_on_allowed(mut self, on: bool) -> Self {
        self.settings.headers_on_allowed = on;
        self
    }

    /// Mark responses decided without the store (because it failed) with
    /// `X-RateLimit-Degraded: fallback`, `fail-open` or `fail-closed` (default false). The
    /// [`Decision`](crate::Decision) in the request extensions says so too
    /// ([`Decision::is_degraded`](crate::Decision::is_degraded)), and a `tollgate::store`
    /// warning is logged at most once a second.
    pub fn degraded_header(mut self, on: bool) -> Self {
        self.settings.degraded_header = on;
        self
    }

    /// Whether tollgate adds `Retry-After` and the rate-limit fields to rejections (default
    /// true). Turn it off when a custom rejection ([`reject_with`](Builder::reject_with)) sets
    /// exactly the fields it wants.
    pub fn rejection_fields(mut self, on: bool) -> Self {
        self.settings.rejection_fields = on;
        self
    }

    /// Which requests are answered the gRPC way when the layer answers without the service
    /// (feature `tonic`; default [`GrpcMode::Auto`](crate::grpc::GrpcMode::Auto): those whose
    /// `content-type` starts with `application/grpc`). A limited gRPC call then gets status
    /// `RESOURCE_EXHAUSTED` with `google.rpc.RetryInfo` and `google.rpc.QuotaFailure` details,
    /// whatever the layer's rejector; see [`tollgate::grpc`](crate::grpc).
    ///
    /// ```
    /// use tollgate::{RateLimitLayer, grpc::GrpcMode, key::Header};
    ///
    /// // In front of a tonic server only: every denial is a gRPC status.
    /// let layer = RateLimitLayer::builder("100/m".parse()?)
    ///     .key(Header::new("x-api-key")?)
    ///     .grpc(GrpcMode::Always)
    ///     .build()?;
    /// # let _ = layer;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    #[cfg(feature = "tonic")]
    pub fn grpc(mut self, mode: crate::grpc::GrpcMode) -> Self {
        self.settings.grpc = mode;
        self
    }

    /// A different quota per client: the layer's policies are `tiers` (the first is the
    /// default tier), instead of the builder's quota and policy name. Each tier reports under
    /// its own name and keeps its own state; see [`crate::tier`] for how a request's tier is
    /// picked and what a client sees when it changes tier.
    pub fn tiers(mut self, tiers: Tiers) -> Self {
        self.settings.tiers = Some(tiers);
        self
    }

    /// Picks a request's tier from its parts and key, on the hot path (it must not block;
    /// returning a [`Tier`] handle allocates nothing); `None` means the default tier. Runtime
    /// assignments ([`RateLimitLayer::set_tier`]) take precedence. Needs [`tiers`](Self::tiers).
    pub fn select_tier(
        mut self,
        select: impl Fn(&Parts, &crate::Key) -> Option<Tier> + Send + Sync + 'static,
    ) -> Self {
        self.settings.select_tier = Some(Arc::new(select));
        self
    }

    /// Looks a client's tier up asynchronously (a database, an auth service: API key -> plan)
    /// when neither a runtime assignment nor the selector decides it. `resolve(key)` answers
    /// the tier's name (`None`, or a name the layer does not have, means the default tier, the
    /// latter with a warning). Answers are cached per key as `cache` says, so the hot path
    /// asks the resolver only on a miss, and a miss is looked up once however many requests of
    /// that key arrive meanwhile. A lookup that fails or times out is a store failure: the
    /// layer's [`fail_mode`](Self::fail_mode) decides, for the default tier, and it is counted
    /// and logged as one. Needs [`tiers`](Self::tiers), and a Tokio runtime with its time driver
    /// (as axum's has) for the lookup's timeout.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tollgate::{RateLimitLayer, tier::TierCache};
    /// use tollgate::key::Header;
    ///
    /// let layer = RateLimitLayer::builder("60/m".parse()?)
    ///     .key(Header::new("x-api-key")?)
    ///     .tiers("free=60/m,pro=600/m".parse()?)
    ///     .resolve_tier(
    ///         |key| async move {
    ///             // e.g. SELECT plan FROM api_keys WHERE key = $1
    ///             let plan = if key.as_bytes().starts_with(b"pro_") { "pro" } else { "free" };
    ///             Ok::<_, std::io::Error>(Some(plan.to_owned()))
    ///         },
    ///         TierCache::default().ttl(Duration::from_secs(300)),
    ///     )
    ///     .build()?;
    /// # let _ = layer;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn resolve_tier<F, Fut, E>(mut self, resolve: F, cache: TierCache) -> Self
    where
        F: Fn(crate::Key) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = Result<Option<String>, E>> + Send + 'static,
        E: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let resolve: Arc<ResolveFn> = Arc::new(move |key| {
            let fut = resolve(key);
            Box::pin(async move { fut.await.map_err(Into::into) })
        });
        self.settings.resolve_tier = Some((resolve, cache));
        self
    }

    /// The most clients [`RateLimitLayer::set_tier`] may assign a tier to (default
    /// 1,000,000), so runtime assignments stay bounded.
    pub fn max_tier_assignments(mut self, max: usize) -> Self {
        self.settings.max_tier_assignments = max;
        self
    }

    /// Record the layer's decision in every response's extensions, as [`Decisions`](crate::Decisions),
    /// for outer layers and `map_response` (default true). Off, the response carries no
    /// decision, which spares the response its extension map: an allocation and an insert per
    /// request (see the README's benchmark figures). Handlers still find the decision in the
    /// request's extensions either way.
    pub fn response_decisions(mut self, on: bool) -> Self {
        self.settings.response_decisions = on;
        self
    }

    /// Log client keys as they are in `tollgate::*` events, instead of their fingerprints
    /// (default false).
    ///
    /// **Dangerous:** a key is the client's identity, often an API key, which is a credential:
    /// anyone who reads the logs can then act as that client. The default logs
    /// [`Key::fingerprint`](crate::Key::fingerprint), a keyed hash that lets you correlate the
    /// events of one client within a process without revealing the key. Turn this on only for
    /// local debugging, never where logs leave the machine.
    pub fn log_raw_keys(mut self, on: bool) -> Self {
        self.settings.log_raw_keys = on;
        self
    }

    /// The level of the `tollgate::limited` event logged for each denied request (default
    /// `INFO`; nginx's `limit_req_log_level`).
    pub fn log_level(mut self, level: Level) -> Self {
        self.settings.log_level = level;
        self
    }

    fn parts(
        self,
        tiers: Vec<TierEntry>,
        tiering: Option<Tiering>,
        store_name: &'static str,
    ) -> Shared<St, K, R> {
        let fallback = tiers
            .iter()
            .any(|t| t.fallback.is_some())
            .then(MemoryStore::new);
        let policies: Vec<&Policy> = tiers.iter().map(|t| &t.policy).collect();
        let metrics = LayerMetrics::new(&policies, store_name);
        Shared {
            metrics,
            tiers: tiers.into_boxed_slice(),
            tiering,
            store: self.store,
            key: self.key,
            cost: self.settings.cost,
            skip: self.settings.skip,
            settles: self.settings.refund.is_some() || self.settings.reconcile,
            refund: self.settings.refund,
            reconcile: self.settings.reconcile,
            fail_mode: self.settings.fail_mode,
            fallback,
            dry_run: self.settings.dry_run,
            delay_after: self.settings.delay_after,
            header_style: self.settings.header_style,
            reset_style: self.settings.reset_style,
            headers_on_allowed: self.settings.headers_on_allowed,
            degraded_header: self.settings.degraded_header,
            rejector: self.rejector,
            rejection_fields: self.settings.rejection_fields,
            response_decisions: self.settings.response_decisions,
            log_level: self.settings.log_level,
            log_raw_keys: self.settings.log_raw_keys,
            #[cfg(feature = "tonic")]
            grpc: self.settings.grpc,
            counters: Counters::new(),
            last_warning: AtomicU64::new(0),
            last_key_error: AtomicU64::new(0),
            started: std::time::Instant::now(),
        }
    }
}

impl<St: Store, K: KeyExtractor, R> Builder<St, K, R> {
    /// The layer.
    ///
    /// # Errors
    /// [`ConfigError`] for an invalid policy name, a status outside 400..=599, a fallback
    /// divisor of 0, or a policy that conflicts with one the store already has
    /// ([`ConfigError::PolicyConflict`], [`ConfigError::UnnamedPolicy`]; see
    /// [`Builder::policy`]).
    pub fn build(self) -> Result<RateLimitLayer<St, K, R>, ConfigError> {
        if let Some(status) = self.settings.bad_status {
            return Err(ConfigError::Status(status.as_u16()));
        }
        if self.settings.delay_after == Some(0) {
            return Err(ConfigError::Invalid(
                "delay_after must be at least 1: the first request of a burst is never delayed"
                    .into(),
            ));
        }
        let (policies, named, tiering) = match &self.settings.tiers {
            Some(tiers) => {
                let resolver = match &self.settings.resolve_tier {
                    Some((resolve, cache)) => {
                        cache.check()?;
                        let names = tiers
                            .policies()
                            .iter()
                            .map(|p| Arc::clone(p.name_arc()))
                            .collect();
                        Some(Resolver::new(Arc::clone(resolve), *cache, names))
                    }
                    None => None,
                };
                let tiering = Tiering::new(
                    tiers.id(),
                    self.settings.select_tier.clone(),
                    resolver,
                    self.settings.max_tier_assignments,
                );
                (tiers.clone().into_policies(), true, Some(tiering))
            }
            None => {
                if self.settings.select_tier.is_some() || self.settings.resolve_tier.is_some() {
                    return Err(ConfigError::Invalid(
                        "select_tier and resolve_tier need tiers to choose from: declare them \
                         with Builder::tiers(\"free=60/m,pro=600/m\".parse()?)"
                            .into(),
                    ));
                }
                let name = self.settings.policy_name.as_deref().unwrap_or("default");
                let quotas = std::iter::once(self.settings.quota)
                    .chain(self.settings.more_quotas.iter().copied());
                let policy = Policy::multi(name, quotas)?;
                (vec![policy], self.settings.policy_name.is_some(), None)
            }
        };
        if let Some(registry) = self.store.registry() {
            for policy in &policies {
                registry.register(policy, named)?;
            }
        }
        let tiers = policies
            .into_iter()
            .enumerate()
            .map(|(index, policy)| TierEntry::new(policy, index, self.settings.fail_mode))
            .collect::<Result<Vec<_>, _>>()?;
        let store_name = self.store.name();
        Ok(RateLimitLayer::from_parts(
            self.parts(tiers, tiering, store_name),
        ))
    }
}

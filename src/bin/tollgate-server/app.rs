//! What a configuration becomes: one store, one [`RateLimitLayer`] per policy, stacked around
//! a service that admits; and what a reload keeps of the previous one.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::request::Parts;
use http::{HeaderValue, Request, Response};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty};
use sha2::{Digest, Sha256};
use tollgate::key::{ApiKeyOrIp, ClientIp, Header, KeyError};
use tollgate::store::PolicyRegistry;
use tollgate::{
    BoxStore, CircuitBreaker, Decision, DenyCache, Key, KeyExtractor, MemoryStore, Policy,
    RateLimitLayer, Store, StoreError,
};
use tower::util::BoxCloneSyncService;
use tower::{Layer, ServiceExt};

use crate::config::{
    Clients, Config, KeyKind, Limit, Matcher, PolicyConfig, StoreConfig, StoreKind,
};

/// The body of every answer.
pub(crate) type Body = UnsyncBoxBody<Bytes, Infallible>;

/// The decision: every policy's layer, outermost first, around a service that admits.
pub(crate) type CheckService = BoxCloneSyncService<Request<()>, Response<Body>, Infallible>;

/// An empty body.
pub(crate) fn empty() -> Body {
    Empty::new().boxed_unsync()
}

/// The store of one configuration, kept across reloads while its settings stay the same.
#[derive(Clone)]
pub(crate) struct StoreHandle {
    pub(crate) config: StoreConfig,
    pub(crate) store: BoxStore,
}

impl StoreHandle {
    /// Builds the store `config` describes; a Redis store starts even while Redis is down
    /// (the fail mode decides meanwhile, and it reconnects by itself).
    pub(crate) async fn build(config: &StoreConfig) -> Result<Self, String> {
        let store = match &config.kind {
            StoreKind::Memory { max_keys } => BoxStore::new(Unregistered(
                MemoryStore::builder()
                    .max_keys(*max_keys)
                    .build()
                    .map_err(|e| format!("store.max_keys: {e}"))?,
            )),
            StoreKind::Redis { url, options } => {
                let builder = tollgate::RedisStore::builder(url);
                redis_store(builder, options).await?
            }
            #[cfg(feature = "redis-cluster")]
            StoreKind::Cluster { nodes, options } => {
                let builder = tollgate::RedisStore::cluster_builder(nodes);
                redis_store(builder, options).await?
            }
            StoreKind::Sentinel {
                sentinels,
                master,
                options,
            } => {
                let builder = tollgate::RedisStore::sentinel_builder(sentinels, master);
                redis_store(builder, options).await?
            }
            #[cfg(not(feature = "redis-cluster"))]
            StoreKind::Cluster { .. } => {
                return Err("store.kind: built without the redis-cluster feature".into());
            }
        };
        Ok(Self {
            config: config.clone(),
            store,
        })
    }
}

async fn redis_store(
    mut builder: tollgate::store::redis::RedisStoreBuilder,
    options: &crate::config::RedisOptions,
) -> Result<BoxStore, String> {
    builder = builder
        .command_timeout(options.timeout)
        .connect_timeout(options.connect_timeout);
    if let Some(prefix) = &options.prefix {
        builder = builder.prefix(prefix);
    }
    let redis = builder.build().await.map_err(|e| format!("store: {e}"))?;
    // The deny cache in front, so a flood of denied requests never reaches the breaker or
    // Redis; the breaker right around Redis.
    Ok(match (options.deny_cache, options.breaker) {
        (true, Some(config)) => BoxStore::new(Unregistered(DenyCache::new(
            CircuitBreaker::new(redis).config(config),
        ))),
        (true, None) => BoxStore::new(Unregistered(DenyCache::new(redis))),
        (false, Some(config)) => {
            BoxStore::new(Unregistered(CircuitBreaker::new(redis).config(config)))
        }
        (false, None) => BoxStore::new(Unregistered(redis)),
    })
}

/// A store without a policy registry. The registry stops two layers of one store from
/// sharing a policy name with different quotas; here a reload does exactly that on purpose,
/// and keeps the states apart itself: each key carries a tag of its policy's limit (see
/// [`TaggedKey`]), so a changed quota starts from fresh state while unchanged policies keep
/// theirs. Policy names are unique within one file (checked with the file).
struct Unregistered<S>(S);

impl<S: Store> Store for Unregistered<S> {
    type Future = S::Future;

    #[inline]
    fn check(&self, policy: &Policy, key: &Key, cost: u32) -> Self::Future {
        self.0.check(policy, key, cost)
    }

    fn peek(&self, policy: &Policy, key: &Key) -> Self::Future {
        self.0.peek(policy, key)
    }

    #[inline]
    fn check_ready(
        &self,
        policy: &Policy,
        key: &Key,
        cost: u32,
    ) -> Option<Result<Decision, StoreError>> {
        self.0.check_ready(policy, key, cost)
    }

    fn reset(
        &self,
        policy: &Policy,
        key: &Key,
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        self.0.reset(policy, key)
    }

    fn registry(&self) -> Option<&PolicyRegistry> {
        None
    }

    fn name(&self) -> &'static str {
        self.0.name()
    }

    fn health(&self) -> impl Future<Output = Result<(), StoreError>> + Send {
        self.0.health()
    }
}

/// What the proxy says the client asked for, put into each check request's extensions before
/// the layers run. From an untrusted peer the forwarding headers are ignored, and the check
/// request itself is what is matched.
#[derive(Debug, Clone)]
pub(crate) struct Original {
    /// The peer is a trusted proxy.
    pub(crate) trusted: bool,
    pub(crate) method: HeaderValue,
    /// The URI as the proxy reports it (origin form, or absolute form); its path is matched.
    pub(crate) uri: HeaderValue,
    pub(crate) host: Option<HeaderValue>,
}

impl Original {
    /// Reads `parts` (a check request from `trusted` or untrusted peer).
    pub(crate) fn of(parts: &Parts, trusted: bool) -> Self {
        let header = |names: &[&str]| {
            names
                .iter()
                .find_map(|name| parts.headers.get(*name))
                .cloned()
        };
        let forwarded = |names: &[&str]| if trusted { header(names) } else { None };
        let method = forwarded(&["x-original-method", "x-forwarded-method"])
            .or_else(|| HeaderValue::from_str(parts.method.as_str()).ok())
            .unwrap_or(HeaderValue::from_static("GET"));
        // Envoy's ext_authz (HTTP) asks for /check/<the original path>.
        let own_path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        let own_path = match own_path.strip_prefix("/check") {
            Some(rest) if rest.starts_with('/') => rest,
            _ => own_path,
        };
        let uri = forwarded(&["x-original-uri", "x-forwarded-uri"])
            .or_else(|| HeaderValue::from_str(own_path).ok())
            .unwrap_or(HeaderValue::from_static("/"));
        let host = forwarded(&["x-forwarded-host"]).or_else(|| header(&["host"]));
        Self {
            trusted,
            method,
            uri,
            host,
        }
    }

    /// The path of the URI, as bytes (which need not be UTF-8): without query or fragment,
    /// and without scheme and authority for an absolute URI.
    pub(crate) fn path(&self) -> &[u8] {
        let mut uri = self.uri.as_bytes();
        if let Some(at) = find(uri, b"://")
            && !uri[..at].contains(&b'/')
        {
            let after = &uri[at + 3..];
            uri = after
                .iter()
                .position(|&b| b == b'/')
                .map_or(b"/".as_slice(), |slash| &after[slash..]);
        }
        let end = uri
            .iter()
            .position(|&b| b == b'?' || b == b'#')
            .unwrap_or(uri.len());
        &uri[..end]
    }

    /// The host without its port.
    pub(crate) fn host(&self) -> Option<&[u8]> {
        let host = self.host.as_ref()?.as_bytes();
        if host.first() == Some(&b'[') {
            let end = host.iter().position(|&b| b == b']')?;
            return Some(&host[..=end]);
        }
        Some(match host.iter().rposition(|&b| b == b':') {
            Some(colon) if host[colon + 1..].iter().all(u8::is_ascii_digit) => &host[..colon],
            _ => host,
        })
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

impl Matcher {
    /// The policy applies to this request.
    pub(crate) fn matches(&self, original: &Original) -> bool {
        let method = original.method.as_bytes();
        let methods =
            self.methods.is_empty() || self.methods.iter().any(|m| m.as_bytes() == method);
        let hosts = self.hosts.is_empty()
            || original.host().is_some_and(|host| {
                self.hosts
                    .iter()
                    .any(|h| h.as_bytes().eq_ignore_ascii_case(host))
            });
        let path = original.path();
        let paths = self.path_prefixes.is_empty()
            || self
                .path_prefixes
                .iter()
                .any(|p| path.starts_with(p.as_bytes()));
        methods && hosts && paths
    }
}

/// How a policy identifies the client, with a tag of the policy's limit before every key.
///
/// The tag is the first 4 bytes of a SHA-256 of the limit's text and the key kind: the same
/// file gives the same keys in every tollgate-server on one Redis, a reload that keeps a
/// policy's limit keeps its clients' state, and a changed limit starts from fresh state
/// instead of reading the old quota's timestamps with the new one.
#[derive(Clone)]
pub(crate) struct TaggedKey {
    tag: [u8; 4],
    inner: ServerKey,
}

#[derive(Clone)]
enum ServerKey {
    Ip(ClientIp),
    Header(Header),
    HeaderOrIp(ApiKeyOrIp),
}

impl TaggedKey {
    fn new(policy: &PolicyConfig, clients: &Clients) -> Result<Self, String> {
        let mut ip = ClientIp::new()
            .header(clients.ip_header)
            .ipv6_prefix(clients.ipv6_prefix)
            .map_err(|e| format!("clients.ipv6_prefix: {e}"))?;
        for net in &clients.trusted_proxies {
            ip = ip.trust_net(*net);
        }
        let header = |name: &http::HeaderName| {
            Header::new(name.as_str()).map_err(|e| format!("policy {:?}: key: {e}", policy.name))
        };
        let inner = match &policy.key {
            KeyKind::Ip => ServerKey::Ip(ip),
            KeyKind::Header(name) => ServerKey::Header(header(name)?),
            KeyKind::HeaderOrIp(name) => ServerKey::HeaderOrIp(ApiKeyOrIp::new(header(name)?, ip)),
        };
        Ok(Self {
            tag: limit_tag(&policy.limit, &policy.key),
            inner,
        })
    }

    fn inner(&self) -> &dyn KeyExtractor {
        match &self.inner {
            ServerKey::Ip(k) => k,
            ServerKey::Header(k) => k,
            ServerKey::HeaderOrIp(k) => k,
        }
    }

    fn tagged(&self, key: &Key) -> Key {
        Key::from_parts(&[&self.tag, key.as_bytes()])
    }
}

/// The tag of a policy's state: its limit and key kind.
fn limit_tag(limit: &Limit, key: &KeyKind) -> [u8; 4] {
    let digest = Sha256::new()
        .chain_update(limit.canonical())
        .chain_update([0])
        .chain_update(key.to_string())
        .finalize();
    [digest[0], digest[1], digest[2], digest[3]]
}

impl KeyExtractor for TaggedKey {
    fn extract(&self, req: &Parts) -> Option<Key> {
        self.inner().extract(req).map(|k| self.tagged(&k))
    }

    fn try_extract(&self, req: &Parts) -> Result<Option<Key>, KeyError> {
        Ok(self.inner().try_extract(req)?.map(|k| self.tagged(&k)))
    }

    fn keys_for_identity(&self, identity: &str) -> Vec<Key> {
        self.inner()
            .keys_for_identity(identity)
            .iter()
            .map(|k| self.tagged(k))
            .collect()
    }
}

/// One policy, built.
pub(crate) type PolicyLayer = RateLimitLayer<BoxStore, TaggedKey>;

/// One configuration, ready to serve.
pub(crate) struct Generation {
    pub(crate) config: Config,
    pub(crate) store: StoreHandle,
    pub(crate) layers: Vec<PolicyLayer>,
    pub(crate) check: CheckService,
}

impl Generation {
    /// The peer is a trusted proxy.
    pub(crate) fn trusts(&self, peer: std::net::IpAddr) -> bool {
        let peer = match peer {
            std::net::IpAddr::V6(v6) => v6
                .to_ipv4_mapped()
                .map_or(std::net::IpAddr::V6(v6), std::net::IpAddr::V4),
            v4 => v4,
        };
        self.config
            .clients
            .trusted_proxies
            .iter()
            .any(|net| net.contains(&peer))
    }
}

/// What a reload did to each policy, for the log.
#[derive(Debug, Default)]
pub(crate) struct Changes {
    pub(crate) kept: Vec<String>,
    pub(crate) rebuilt: Vec<String>,
    pub(crate) store_rebuilt: bool,
}

/// Builds `config`, reusing from `old` the store (when its settings are unchanged) and the
/// layer of every policy whose settings (and the client and response settings) are unchanged:
/// those keep their counters, tier assignments and state.
pub(crate) async fn build(
    config: Config,
    old: Option<&Generation>,
) -> Result<(Generation, Changes), String> {
    let mut changes = Changes::default();
    let store = match old {
        Some(old) if old.store.config.kind == config.store.kind => old.store.clone(),
        _ => {
            changes.store_rebuilt = old.is_some();
            StoreHandle::build(&config.store).await?
        }
    };
    let reusable = old.filter(|old| {
        old.store.config == config.store
            && !changes.store_rebuilt
            && old.config.clients == config.clients
            && old.config.response == config.response
    });
    let mut layers = Vec::with_capacity(config.policies.len());
    for policy in &config.policies {
        let kept = reusable.and_then(|old| {
            old.config
                .policies
                .iter()
                .position(|p| p == policy)
                .map(|i| old.layers[i].clone())
        });
        match kept {
            Some(layer) => {
                changes.kept.push(policy.name.clone());
                layers.push(layer);
            }
            None => {
                changes.rebuilt.push(policy.name.clone());
                layers.push(policy_layer(&config, policy, &store.store)?);
            }
        }
    }
    let check = stack(&layers);
    Ok((
        Generation {
            config,
            store,
            layers,
            check,
        },
        changes,
    ))
}

fn policy_layer(
    config: &Config,
    policy: &PolicyConfig,
    store: &BoxStore,
) -> Result<PolicyLayer, String> {
    let context = |e: tollgate::ConfigError| format!("policy {:?}: {e}", policy.name);
    let key = TaggedKey::new(policy, &config.clients)?;
    let first = match &policy.limit {
        Limit::Quotas(quotas) => quotas[0],
        Limit::Tiers { tiers, .. } => tiers.0.policies()[0].quotas()[0],
    };
    let mut builder = RateLimitLayer::builder(first)
        .policy(&policy.name)
        .headers(config.response.headers)
        .status(config.response.status)
        .body(config.response.body.clone())
        .fail_mode(config.store.fail_mode)
        .dry_run(policy.dry_run)
        .response_decisions(false);
    match &policy.limit {
        Limit::Quotas(quotas) => {
            for quota in &quotas[1..] {
                builder = builder.and_quota(*quota);
            }
        }
        Limit::Tiers { tiers, header, .. } => {
            builder = builder.tiers(tiers.0.clone());
            if let Some(header) = header.clone() {
                let tiers = tiers.0.clone();
                builder = builder.select_tier(move |parts, _key| {
                    let original = parts.extensions.get::<Original>()?;
                    if !original.trusted {
                        return None;
                    }
                    let name = parts.headers.get(&header)?.to_str().ok()?;
                    tiers.get(name)
                });
            }
        }
    }
    let matcher = policy.matcher.clone();
    let layer = builder
        .skip(move |parts| {
            parts
                .extensions
                .get::<Original>()
                .is_none_or(|original| !matcher.matches(original))
        })
        .store(store.clone())
        .key(key)
        .build()
        .map_err(context)?;
    if let Limit::Tiers { assigned, .. } = &policy.limit {
        for (identity, tier) in assigned {
            layer.set_tier(identity, tier).map_err(context)?;
        }
    }
    Ok(layer)
}

/// Every layer around the service that admits, the first policy outermost.
fn stack(layers: &[PolicyLayer]) -> CheckService {
    let admit = tower::service_fn(|_req: Request<()>| async {
        Ok::<_, Infallible>(Response::new(empty()))
    });
    let mut service = BoxCloneSyncService::new(admit);
    for layer in layers.iter().rev() {
        service = BoxCloneSyncService::new(
            layer
                .layer(service)
                .map_response(|response| response.map(BodyExt::boxed_unsync)),
        );
    }
    service
}

/// A shared, swappable [`Generation`].
pub(crate) type Live = Arc<arc_swap::ArcSwap<Generation>>;

#[cfg(test)]
mod tests {
    use super::*;

    fn original(uri: &str, host: Option<&str>) -> Original {
        Original {
            trusted: true,
            method: HeaderValue::from_static("GET"),
            uri: HeaderValue::from_str(uri).unwrap(),
            host: host.map(|h| HeaderValue::from_str(h).unwrap()),
        }
    }

    #[test]
    fn paths_and_hosts_as_proxies_report_them() {
        assert_eq!(original("/api/x?y=1", None).path(), b"/api/x");
        assert_eq!(original("http://h:1/api#f", None).path(), b"/api");
        assert_eq!(original("http://h", None).path(), b"/");
        assert_eq!(original("/a?b=http://c/d", None).path(), b"/a");
        assert_eq!(
            original("/", Some("Api.Example.com:8080")).host(),
            Some(&b"Api.Example.com"[..])
        );
        assert_eq!(original("/", Some("[::1]:80")).host(), Some(&b"[::1]"[..]));
        let m = Matcher {
            hosts: vec!["api.example.com".into()],
            methods: vec!["GET".into()],
            path_prefixes: vec!["/api/".into()],
        };
        assert!(m.matches(&original("/api/v1", Some("API.example.com"))));
        assert!(!m.matches(&original("/apix", Some("api.example.com"))));
        assert!(!m.matches(&original("/api/v1", Some("other"))));
        assert!(!m.matches(&original("/api/v1", None)));
    }
}

//! Tiers: one layer, a different quota per client (a free API key 60/m, a pro key 600/m, an
//! enterprise key its contract).
//!
//! A [`Tiers`] set names a few policies; the first is the default tier. The layer picks a
//! client's tier per request, first match wins:
//! 1. an assignment made at runtime ([`RateLimitLayer::set_tier`](crate::RateLimitLayer::set_tier),
//!    e.g. an admin upgrading a customer);
//! 2. the selector closure ([`Builder::select_tier`](crate::Builder::select_tier)), which sees
//!    the request and its key, runs on the hot path and allocates nothing;
//! 3. the asynchronous resolver ([`Builder::resolve_tier`](crate::Builder::resolve_tier)), a
//!    database or auth-service lookup, cached;
//! 4. the default tier.
//!
//! Each tier is a policy of its own: it keeps its own state in the store, is reported under its
//! own name in `RateLimit-Policy`/`RateLimit` (`"pro";q=600;w=60`) and in
//! [`Decision::policy`](crate::Decision::policy). So when a client changes tier, its **first
//! request after the change is decided by the new tier's own state for that client**: fresh
//! (the new tier's full capacity) if it never used that tier or its state there has expired,
//! else where it left it. Its state under the old tier is kept, untouched, and expires by
//! itself; nothing carries over, so a downgrade never admits more than the new tier allows from
//! then on, and an upgrade is never denied because of a denial under the old tier (a deny cache
//! keeps entries per policy, so it has none for the new one).
//!
//! ```
//! use tollgate::{RateLimitLayer, Tiers};
//! use tollgate::key::Header;
//!
//! let tiers: Tiers = "free=60/m,pro=600/m;capacity=100".parse()?;
//! let pro = tiers.get("pro").expect("declared above");
//! let layer = RateLimitLayer::builder("60/m".parse()?)
//!     .key(Header::new("x-api-key")?)
//!     .tiers(tiers)
//!     .select_tier(move |req, _key| {
//!         req.headers.get("x-plan").filter(|plan| *plan == "pro").map(|_| pro)
//!     })
//!     .build()?;
//! assert_eq!(layer.tier_names().collect::<Vec<_>>(), ["free", "pro"]);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use http::request::Parts;

use crate::clock::once_a_second;
use crate::error::{ConfigError, StoreError, StoreErrorKind};
use crate::key::Key;
use crate::quota::Quota;
use crate::store::Policy;

/// A selector: the request's tier from its parts and key, `None` for "no opinion".
pub(crate) type SelectFn = dyn Fn(&Parts, &Key) -> Option<Tier> + Send + Sync;

/// A tier resolver's answer, boxed: the name of the client's tier, or `None` for the default.
pub type ResolveFuture = Pin<
    Box<
        dyn Future<Output = Result<Option<String>, Box<dyn std::error::Error + Send + Sync>>>
            + Send,
    >,
>;

/// A resolver, type-erased.
pub(crate) type ResolveFn = dyn Fn(Key) -> ResolveFuture + Send + Sync;

/// The future of a tier lookup the layer waits for: the tier's index, or a failure that the
/// layer's fail mode handles.
pub(crate) type LookupFuture = Pin<Box<dyn Future<Output = Result<usize, StoreError>> + Send>>;

/// How an asynchronous tier resolver's answers are cached (see
/// [`Builder::resolve_tier`](crate::Builder::resolve_tier)).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub struct TierCache {
    ttl: Duration,
    max_entries: usize,
    timeout: Duration,
}

impl Default for TierCache {
    /// One minute per answer, at most 100,000 clients, 200 ms per lookup.
    fn default() -> Self {
        Self {
            ttl: Duration::from_secs(60),
            max_entries: 100_000,
            timeout: Duration::from_millis(200),
        }
    }
}

impl TierCache {
    /// How long an answer is used before the resolver is asked again (default 1 min). A change
    /// of plan reaches the layer within this; [`RateLimitLayer::set_tier`](crate::RateLimitLayer::set_tier)
    /// applies one at once.
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// The most clients whose answers are kept (default 100,000); past it, expired answers
    /// are dropped, then a sixteenth of the rest.
    pub fn max_entries(mut self, max: usize) -> Self {
        self.max_entries = max;
        self
    }

    /// The longest one lookup may take (default 200 ms); past it the lookup fails and the
    /// layer's fail mode decides, as for a store that does not answer.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    pub(crate) fn check(&self) -> Result<(), ConfigError> {
        if self.ttl.is_zero() || self.timeout.is_zero() || self.max_entries == 0 {
            return Err(ConfigError::Invalid(format!(
                "the tier cache needs a ttl and a timeout above zero and max_entries of at least \
                 1, not {self:?}"
            )));
        }
        Ok(())
    }
}

/// An asynchronous tier resolver with its cache: hits are answered on the hot path; a miss is
/// looked up once per key however many requests wait for it (single flight).
pub(crate) struct Resolver {
    resolve: Arc<ResolveFn>,
    config: TierCache,
    /// Tier names, in index order, to turn the resolver's answer into an index.
    names: Box<[Arc<str>]>,
    cache: DashMap<Key, (u8, Instant), ahash::RandomState>,
    /// Lookups under way: every request for the key waits on the same cell.
    inflight: DashMap<Key, Arc<tokio::sync::OnceCell<Result<u8, StoreError>>>, ahash::RandomState>,
    /// How many times the resolver was called (for tests and stats).
    calls: AtomicU64,
    last_warning: AtomicU64,
    started: Instant,
}

impl Resolver {
    pub(crate) fn new(resolve: Arc<ResolveFn>, config: TierCache, names: Box<[Arc<str>]>) -> Self {
        Self {
            resolve,
            config,
            names,
            cache: DashMap::with_hasher(ahash::RandomState::new()),
            inflight: DashMap::with_hasher(ahash::RandomState::new()),
            calls: AtomicU64::new(0),
            last_warning: AtomicU64::new(0),
            started: Instant::now(),
        }
    }

    /// The cached tier of `key`, if it is still fresh.
    #[inline]
    fn cached(&self, key: &Key) -> Option<usize> {
        let entry = self.cache.get(key)?;
        let (tier, expires) = *entry;
        (Instant::now() < expires).then_some(usize::from(tier))
    }

    /// Looks `key`'s tier up, once for every request that waits for it at the same time.
    fn lookup(self: &Arc<Self>, key: &Key) -> LookupFuture {
        let this = Arc::clone(self);
        let key = key.clone();
        Box::pin(async move {
            let cell = Arc::clone(
                this.inflight
                    .entry(key.clone())
                    .or_insert_with(|| Arc::new(tokio::sync::OnceCell::new()))
                    .value(),
            );
            let result = cell.get_or_init(|| this.call(key.clone())).await.clone();
            if let Ok(tier) = result {
                this.remember(&key, tier);
            }
            // Only after the answer is cached, so a request arriving now finds it there.
            this.inflight.remove_if(&key, |_, c| Arc::ptr_eq(c, &cell));
            result.map(usize::from)
        })
    }

    async fn call(&self, key: Key) -> Result<u8, StoreError> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        let answer = tokio::time::timeout(self.config.timeout, (self.resolve)(key)).await;
        let name = match answer {
            Err(_) => {
                return Err(StoreError::new(
                    StoreErrorKind::Timeout,
                    format!(
                        "the tier resolver did not answer within {:?}",
                        self.config.timeout
                    ),
                ));
            }
            Ok(Err(e)) => {
                return Err(StoreError::new(
                    StoreErrorKind::Other,
                    format!("the tier resolver failed: {e}"),
                ));
            }
            Ok(Ok(name)) => name,
        };
        let Some(name) = name else { return Ok(0) };
        match self.names.iter().position(|n| **n == *name) {
            // At most MAX_TIERS (32) tiers.
            Some(index) => Ok(index as u8),
            None => {
                self.warn_unknown(&name);
                Ok(0)
            }
        }
    }

    fn remember(&self, key: &Key, tier: u8) {
        let now = Instant::now();
        if self.cache.len() >= self.config.max_entries {
            self.cache.retain(|_, (_, expires)| *expires > now);
            if self.cache.len() >= self.config.max_entries {
                let mut n = 0usize;
                self.cache.retain(|_, _| {
                    n += 1;
                    !n.is_multiple_of(16)
                });
            }
        }
        self.cache
            .insert(key.clone(), (tier, now + self.config.ttl));
    }

    fn warn_unknown(&self, name: &str) {
        if once_a_second(&self.last_warning, self.started) {
            tracing::warn!(
                target: "tollgate::tier",
                tier = %name.escape_default(),
                known = ?self.names,
                "the tier resolver named a tier the layer does not have; the default tier applies"
            );
        }
    }

    /// Forgets every cached answer for `keys`.
    pub(crate) fn forget(&self, keys: &[Key]) {
        for key in keys {
            self.cache.remove(key);
        }
    }
}

/// How a request's tier is known: now, or after a lookup.
pub(crate) enum Pick {
    Now(usize),
    Lookup(LookupFuture),
}

/// The default bound on runtime tier assignments per layer.
pub const DEFAULT_MAX_ASSIGNMENTS: usize = 1_000_000;

/// The most tiers one layer may have.
pub const MAX_TIERS: usize = 32;

/// A set of named tiers, each a [`Policy`] of one or more quotas; the first is the default.
///
/// Parsed from `"free=3/m,pro=10/m;capacity=20"`: comma-separated `NAME=QUOTA` items, where a
/// tier of several quotas joins them with `&` (`"pro=10/s;capacity=20&10000/d"`). Names follow
/// the policy-name rules (1 to 64 of ASCII letters, digits and `-_.:`), since they are sent in
/// header fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tiers {
    policies: Vec<Policy>,
    /// Tells this set's [`Tier`] handles from another set's.
    id: u32,
}

/// One tier of a [`Tiers`] set, as a selector returns it: a small copyable handle, so picking a
/// tier on the hot path allocates and hashes nothing. Get it from [`Tiers::get`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Tier {
    set: u32,
    index: u8,
}

impl Tier {
    /// The tier's position in its set (0 is the default tier).
    pub const fn index(self) -> usize {
        self.index as usize
    }
}

impl Tiers {
    /// A set whose default tier is `default`.
    pub fn new(default: Policy) -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(1);
        Self {
            policies: vec![default],
            id: NEXT.fetch_add(1, Ordering::Relaxed),
        }
    }

    /// Adds the tier `policy`.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] for a name already in the set, or more than [`MAX_TIERS`].
    pub fn with(mut self, policy: Policy) -> Result<Self, ConfigError> {
        if self.policies.iter().any(|p| p.name() == policy.name()) {
            return Err(ConfigError::Invalid(format!(
                "tier {:?} is declared twice; give each tier its own name",
                policy.name()
            )));
        }
        if self.policies.len() >= MAX_TIERS {
            return Err(ConfigError::Invalid(format!(
                "a layer has at most {MAX_TIERS} tiers; merge some (tier {:?} is one too many)",
                policy.name()
            )));
        }
        self.policies.push(policy);
        Ok(self)
    }

    /// The tier called `name`.
    pub fn get(&self, name: &str) -> Option<Tier> {
        let index = self.policies.iter().position(|p| p.name() == name)?;
        Some(Tier {
            set: self.id,
            // At most MAX_TIERS (32) tiers.
            index: index as u8,
        })
    }

    /// The default tier (the first).
    pub fn default_tier(&self) -> Tier {
        Tier {
            set: self.id,
            index: 0,
        }
    }

    /// Every tier's policy, the default first.
    pub fn policies(&self) -> &[Policy] {
        &self.policies
    }

    /// How many tiers there are.
    #[allow(clippy::len_without_is_empty)] // never empty: there is always a default tier
    pub fn len(&self) -> usize {
        self.policies.len()
    }

    /// The index of `tier` in this set (0 is the default tier), or `None` for a handle of
    /// another set.
    pub fn index_of(&self, tier: Tier) -> Option<usize> {
        (tier.set == self.id && tier.index() < self.policies.len()).then_some(tier.index())
    }

    pub(crate) fn id(&self) -> u32 {
        self.id
    }

    pub(crate) fn into_policies(self) -> Vec<Policy> {
        self.policies
    }
}

impl std::str::FromStr for Tiers {
    type Err = ConfigError;

    /// `"free=3/m,pro=10/m;capacity=20"`; a tier of several quotas joins them with `&`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut tiers: Option<Tiers> = None;
        for item in s.split(',') {
            let item = item.trim();
            let (name, quotas) = item.split_once('=').ok_or_else(|| {
                ConfigError::Invalid(format!(
                    "tier {item:?} is not NAME=QUOTA; write e.g. \"free=3/m,pro=10/m;capacity=20\""
                ))
            })?;
            let quotas = quotas
                .split('&')
                .map(|q| q.trim().parse::<Quota>())
                .collect::<Result<Vec<_>, _>>()?;
            let policy = Policy::multi(name.trim(), quotas)?;
            tiers = Some(match tiers {
                None => Tiers::new(policy),
                Some(t) => t.with(policy)?,
            });
        }
        tiers.ok_or_else(|| ConfigError::Invalid("no tiers given".into()))
    }
}

impl fmt::Display for Tiers {
    /// The form [`FromStr`](std::str::FromStr) reads.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.policies.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{}=", p.name())?;
            for (j, q) in p.quotas().iter().enumerate() {
                if j > 0 {
                    f.write_str("&")?;
                }
                write!(f, "{q}")?;
            }
        }
        Ok(())
    }
}

/// How a layer of several tiers picks a request's tier (see the module docs for the order).
pub(crate) struct Tiering {
    /// The [`Tiers`] set the layer was built from: handles of other sets are not ours.
    set: u32,
    select: Option<Arc<SelectFn>>,
    resolver: Option<Arc<Resolver>>,
    /// Tiers assigned at runtime, by the client's store key.
    assigned: DashMap<Key, u8, ahash::RandomState>,
    /// Skips the assignment map entirely while nothing was ever assigned.
    any_assigned: AtomicBool,
    max_assigned: usize,
    /// Microseconds since `started` of the last warning about a foreign tier handle.
    last_warning: AtomicU64,
    started: Instant,
}

impl Tiering {
    pub(crate) fn new(
        set: u32,
        select: Option<Arc<SelectFn>>,
        resolver: Option<Resolver>,
        max_assigned: usize,
    ) -> Self {
        Self {
            set,
            select,
            resolver: resolver.map(Arc::new),
            assigned: DashMap::with_hasher(ahash::RandomState::new()),
            any_assigned: AtomicBool::new(false),
            max_assigned,
            last_warning: AtomicU64::new(0),
            started: Instant::now(),
        }
    }

    /// The request's tier: a runtime assignment, else the selector's choice, else the
    /// resolver's (cached, or looked up), else the default (0).
    #[inline]
    pub(crate) fn pick(&self, parts: &Parts, key: &Key) -> Pick {
        if self.any_assigned.load(Ordering::Acquire)
            && let Some(tier) = self.assigned.get(key)
        {
            return Pick::Now(usize::from(*tier));
        }
        if let Some(tier) = self.select.as_ref().and_then(|select| select(parts, key)) {
            return Pick::Now(self.checked(tier));
        }
        match &self.resolver {
            None => Pick::Now(0),
            Some(resolver) => match resolver.cached(key) {
                Some(tier) => Pick::Now(tier),
                None => Pick::Lookup(resolver.lookup(key)),
            },
        }
    }

    /// How many times the resolver was called.
    pub(crate) fn resolver_calls(&self) -> u64 {
        self.resolver
            .as_ref()
            .map_or(0, |r| r.calls.load(Ordering::Relaxed))
    }

    /// Forgets the resolver's cached answers for `keys`.
    pub(crate) fn forget_resolved(&self, keys: &[Key]) {
        if let Some(resolver) = &self.resolver {
            resolver.forget(keys);
        }
    }

    /// The index of a selector's `tier`: the default for a handle of another set, with a
    /// warning (at most one a second).
    fn checked(&self, tier: Tier) -> usize {
        if tier.set == self.set {
            return tier.index();
        }
        if once_a_second(&self.last_warning, self.started) {
            tracing::warn!(
                target: "tollgate::tier",
                "the tier selector returned a tier of another Tiers set; the default tier applies \
                 (take the handles from the set given to Builder::tiers)"
            );
        }
        0
    }

    /// Assigns tier `index` to every key in `keys`.
    pub(crate) fn assign(&self, keys: &[Key], index: usize) -> Result<(), ConfigError> {
        let new = keys
            .iter()
            .filter(|k| !self.assigned.contains_key(*k))
            .count();
        if self.assigned.len() + new > self.max_assigned {
            return Err(ConfigError::Invalid(format!(
                "this layer already has {} runtime tier assignments, its maximum; clear some \
                 with clear_tier, or raise Builder::max_tier_assignments",
                self.assigned.len()
            )));
        }
        for key in keys {
            // At most MAX_TIERS (32) tiers.
            self.assigned.insert(key.clone(), index as u8);
        }
        self.any_assigned.store(true, Ordering::Release);
        Ok(())
    }

    /// Forgets the assignments of `keys`; how many there were.
    pub(crate) fn unassign(&self, keys: &[Key]) -> usize {
        keys.iter()
            .filter(|k| self.assigned.remove(*k).is_some())
            .count()
    }

    /// The tier assigned to `key`, if any.
    pub(crate) fn assigned(&self, key: &Key) -> Option<usize> {
        self.assigned.get(key).map(|t| usize::from(*t))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_tier_lists() {
        let t: Tiers = "free=3/m, pro=10/m;capacity=20,corp=10/s&1000/d"
            .parse()
            .unwrap();
        assert_eq!(t.len(), 3);
        assert_eq!(t.policies()[1].quota().capacity(), 20);
        assert_eq!(t.policies()[2].quotas().len(), 2);
        assert_eq!(
            t.to_string(),
            "free=3/m,pro=10/m;capacity=20,corp=10/s&1000/d"
        );
        assert_eq!(
            t.to_string().parse::<Tiers>().unwrap().policies(),
            t.policies()
        );
        assert_eq!(t.get("pro").unwrap().index(), 1);
        assert!(t.get("gold").is_none());
        for bad in ["", "free", "free=3/x", "a b=1/s", "x=1/s,x=2/s", "p=0/s"] {
            assert!(bad.parse::<Tiers>().is_err(), "{bad:?}");
        }
        let many = (0..=MAX_TIERS)
            .map(|i| format!("t{i}=1/s"))
            .collect::<Vec<_>>()
            .join(",");
        let err = many.parse::<Tiers>().unwrap_err();
        assert!(err.to_string().contains("at most 32"), "{err}");
    }

    #[test]
    fn handles_belong_to_their_own_set() {
        let a: Tiers = "free=1/s,pro=2/s".parse().unwrap();
        let b: Tiers = "free=1/s,pro=2/s".parse().unwrap();
        let pro = a.get("pro").unwrap();
        assert_eq!(a.index_of(pro), Some(1));
        assert_eq!(b.index_of(pro), None);
        assert_eq!(a.clone().index_of(pro), Some(1), "a clone is the same set");
    }
}

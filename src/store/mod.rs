//! Stores hold the per-client state and decide: the [`Store`] trait, [`Policy`] and [`FailMode`].
//!
//! A store keeps one GCRA timestamp per (policy, client key) and answers
//! [`Store::check`] with a [`Decision`]. Two stores ship with tollgate:
//! [`MemoryStore`](crate::MemoryStore) for one process, and `RedisStore` (feature `redis`) for
//! many app servers sharing one limit. Implement the trait to plug in your own.

mod boxed;
pub mod breaker;
#[cfg(feature = "test-util")]
pub mod conformance;
pub mod deny_cache;
mod frozen;
mod keyspace;
pub(crate) mod memory;
#[cfg(feature = "redis")]
pub mod redis;

pub use boxed::{BoxStore, BoxStoreFuture};
pub use breaker::{BreakerConfig, BreakerFuture, BreakerState, BreakerStats, CircuitBreaker};
pub use deny_cache::{DenyCache, DenyCacheFuture, DenyCacheStats};

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};

use crate::decision::Decision;
use crate::error::{ConfigError, StoreError};
use crate::key::Key;
use crate::quota::Quota;

/// A named quota, or several quotas checked together: the unit a store keeps state for.
/// Stores namespace keys by the name, so two layers sharing one store with different policies
/// never share state.
///
/// A policy with several quotas (say 10 per second with capacity 20 *and* 1000 per day) admits
/// a request only if every quota admits it, in one atomic step; a denial charges none of them.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Policy {
    name: Arc<str>,
    /// Never empty; the first is the primary quota.
    quotas: Arc<[Quota]>,
}

impl Policy {
    /// The longest policy name.
    pub const MAX_NAME_LEN: usize = 64;

    /// A policy called `name` enforcing `quota`.
    ///
    /// # Errors
    /// [`ConfigError::PolicyName`] unless the name is 1 to 64 characters of ASCII letters,
    /// digits and `-_.:` (it is sent inside `RateLimit` header strings and used in store keys).
    pub fn new(name: &str, quota: Quota) -> Result<Self, ConfigError> {
        Self::multi(name, [quota])
    }

    /// The most quotas one policy may combine.
    pub const MAX_QUOTAS: usize = 8;

    /// A policy called `name` that admits a request only if every one of `quotas` admits it.
    ///
    /// ```
    /// use tollgate::{Policy, Quota};
    ///
    /// let api = Policy::multi("api", ["10/s;capacity=20".parse::<Quota>()?, "1000/d".parse()?])?;
    /// assert_eq!(api.quotas().len(), 2);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    ///
    /// # Errors
    /// [`ConfigError::PolicyName`] as for [`Policy::new`]; [`ConfigError::Invalid`] for no
    /// quotas, more than [`Policy::MAX_QUOTAS`], or the same quota twice.
    pub fn multi(name: &str, quotas: impl IntoIterator<Item = Quota>) -> Result<Self, ConfigError> {
        let quotas: Vec<Quota> = quotas.into_iter().collect();
        if quotas.is_empty() || quotas.len() > Self::MAX_QUOTAS {
            return Err(ConfigError::Invalid(format!(
                "policy {name:?} has {} quotas; give it 1 to {}",
                quotas.len(),
                Self::MAX_QUOTAS
            )));
        }
        for (i, q) in quotas.iter().enumerate() {
            if quotas[..i].contains(q) {
                return Err(ConfigError::Invalid(format!(
                    "policy {name:?} lists the quota {q} twice; remove one"
                )));
            }
        }
        let valid = !name.is_empty()
            && name.len() <= Self::MAX_NAME_LEN
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'));
        if !valid {
            return Err(ConfigError::PolicyName(name.chars().take(80).collect()));
        }
        Ok(Self {
            name: name.into(),
            quotas: quotas.into(),
        })
    }

    /// The policy `"default"`, which needs no validation.
    pub(crate) fn named_default(quota: Quota) -> Self {
        Self {
            name: "default".into(),
            quotas: Arc::new([quota]),
        }
    }

    /// The name, shared: stores recognise a policy by it.
    pub(crate) fn name_arc(&self) -> &Arc<str> {
        &self.name
    }

    /// The policy's name, as sent in `RateLimit-Policy`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The (first) quota it enforces.
    #[inline]
    pub fn quota(&self) -> &Quota {
        &self.quotas[0]
    }

    /// Every quota it enforces, the first being [`Policy::quota`].
    pub fn quotas(&self) -> &[Quota] {
        &self.quotas
    }

    /// The same policy with each quota divided by `divisor` (see [`Quota::divided`]).
    ///
    /// # Errors
    /// [`QuotaError::ZeroDivisor`](crate::QuotaError::ZeroDivisor) for 0.
    pub fn divided(&self, divisor: u32) -> Result<Self, crate::QuotaError> {
        let quotas = self
            .quotas
            .iter()
            .map(|q| q.divided(divisor))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            name: Arc::clone(&self.name),
            quotas: quotas.into(),
        })
    }
}

/// Where rate-limit state lives, and where decisions are made.
///
/// `check` must be atomic per (policy, key): concurrent checks never admit more than the GCRA
/// allows, and a denied request changes nothing. The returned future owns everything it needs
/// (`'static`), so the middleware can hold it without borrowing the store.
///
/// A store that cannot decide returns a [`StoreError`]; the layer's [`FailMode`] then decides.
pub trait Store: Send + Sync + 'static {
    /// The future returned by [`Store::check`].
    type Future: Future<Output = Result<Decision, StoreError>> + Send + 'static;

    /// Checks and charges `cost` units for `key` under `policy`. A cost of 0 is a peek: it
    /// reports the state without changing it.
    fn check(&self, policy: &Policy, key: &Key, cost: u32) -> Self::Future;

    /// Reports `key`'s state under `policy` without charging anything.
    fn peek(&self, policy: &Policy, key: &Key) -> Self::Future {
        self.check(policy, key, 0)
    }

    /// Decides at once when the store can do so without waiting (an in-memory store always
    /// can), with the same meaning as [`Store::check`]; `None` sends the layer to
    /// [`Store::check`]. The layer tries this first, which spares a synchronous decision the
    /// trip through a future. The default returns `None`.
    fn check_ready(
        &self,
        policy: &Policy,
        key: &Key,
        cost: u32,
    ) -> Option<Result<Decision, StoreError>> {
        let _ = (policy, key, cost);
        None
    }

    /// Adjusts `key`'s state under `policy` after the fact, atomically: `delta > 0` charges
    /// `delta` units unconditionally (admitted or not, so the client may go into debt and its
    /// next requests wait), `delta < 0` gives `-delta` units back, but never further than a
    /// fresh state (the TAT never goes below now). Exactly [`gcra::adjust`](crate::gcra::adjust)
    /// per quota; the decision is a peek of the state after it. This is what the layer's
    /// refunds ([`Builder::refund_when`](crate::Builder::refund_when)) and reconciliations
    /// ([`Builder::reconcile`](crate::Builder::reconcile)) call, at most once per request.
    ///
    /// `None` means the store cannot adjust: the default, so a store of your own keeps
    /// compiling, and the layer then keeps every charge as it was made (it counts and logs each
    /// adjustment it could not make). Every store in tollgate implements it.
    ///
    /// A store must apply an adjustment at most once: the layer never retries one that failed
    /// (a timed-out refund may have been applied, and applying it twice would give back what
    /// another request was charged).
    fn adjust(&self, policy: &Policy, key: &Key, delta: i64) -> Option<Self::Future> {
        let _ = (policy, key, delta);
        None
    }

    /// Forgets `key`'s state under `policy`: its next request is treated as a new client's.
    fn reset(
        &self,
        policy: &Policy,
        key: &Key,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// The policies layers have been built with on this store, so that a layer whose policy
    /// would silently share state with another's is refused when it is built. Stores that
    /// keep one (every store in tollgate) return it; wrappers return their inner store's.
    /// The default is `None`: no check.
    fn registry(&self) -> Option<&PolicyRegistry> {
        None
    }

    /// Whether the store can decide right now, for health endpoints: `Ok` when it answers
    /// (Redis: a `PING` within the command timeout). Never called on the request path. The
    /// default is `Ok` (an in-process store is always there).
    fn health(&self) -> impl Future<Output = Result<(), StoreError>> + Send {
        std::future::ready(Ok(()))
    }

    /// What the store is, for the `store` label of metrics: `memory`, `redis`, or for a
    /// wrapper its inner store's name. The default is `custom`.
    fn name(&self) -> &'static str {
        "custom"
    }
}

/// The policies known to one store, by name: a layer whose policy has the name of another with
/// different quotas would share (and corrupt) its clients' state, so registering it fails.
///
/// A store that namespaces keys by policy name should own one and return it from
/// [`Store::registry`]; the layer registers its policy when it is built.
#[derive(Debug, Default)]
pub struct PolicyRegistry {
    policies: Mutex<HashMap<Arc<str>, Registered>>,
}

#[derive(Debug)]
struct Registered {
    quotas: Arc<[Quota]>,
    /// Registered by a layer that was not given a name (so it is called `default`).
    unnamed: bool,
}

impl PolicyRegistry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records `policy`; `named` says whether its layer was given the name explicitly.
    ///
    /// # Errors
    /// [`ConfigError::PolicyConflict`] when the name is known with other quotas;
    /// [`ConfigError::UnnamedPolicy`] when an unnamed layer's policy meets another unnamed one.
    pub fn register(&self, policy: &Policy, named: bool) -> Result<(), ConfigError> {
        let mut policies = self
            .policies
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match policies.get(policy.name()) {
            Some(known) if *known.quotas != *policy.quotas() => Err(ConfigError::PolicyConflict {
                name: policy.name().to_owned(),
                known: quota_list(&known.quotas),
                new: quota_list(policy.quotas()),
            }),
            Some(known) if known.unnamed && !named => Err(ConfigError::UnnamedPolicy),
            Some(_) => Ok(()),
            None => {
                policies.insert(
                    Arc::clone(policy.name_arc()),
                    Registered {
                        quotas: Arc::clone(&policy.quotas),
                        unnamed: !named,
                    },
                );
                Ok(())
            }
        }
    }

    /// The quotas registered under `name`, if any.
    pub fn quotas(&self, name: &str) -> Option<Arc<[Quota]>> {
        let policies = self
            .policies
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        policies.get(name).map(|known| Arc::clone(&known.quotas))
    }
}

fn quota_list(quotas: &[Quota]) -> String {
    quotas
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(" and ")
}

impl<S: Store> Store for Arc<S> {
    type Future = S::Future;

    fn check(&self, policy: &Policy, key: &Key, cost: u32) -> Self::Future {
        (**self).check(policy, key, cost)
    }

    fn peek(&self, policy: &Policy, key: &Key) -> Self::Future {
        (**self).peek(policy, key)
    }

    fn check_ready(
        &self,
        policy: &Policy,
        key: &Key,
        cost: u32,
    ) -> Option<Result<Decision, StoreError>> {
        (**self).check_ready(policy, key, cost)
    }

    fn adjust(&self, policy: &Policy, key: &Key, delta: i64) -> Option<Self::Future> {
        (**self).adjust(policy, key, delta)
    }

    fn reset(
        &self,
        policy: &Policy,
        key: &Key,
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        (**self).reset(policy, key)
    }

    fn registry(&self) -> Option<&PolicyRegistry> {
        (**self).registry()
    }

    fn name(&self) -> &'static str {
        (**self).name()
    }

    fn health(&self) -> impl Future<Output = Result<(), StoreError>> + Send {
        (**self).health()
    }
}

/// What the layer does when its store fails (cannot be reached, times out, answers garbage).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum FailMode {
    /// Let the request through, and log a warning (at most one a second). The default: a
    /// limiter outage never takes the app down.
    #[default]
    Open,
    /// Answer `503 Service Unavailable` with `Retry-After: 1`.
    Closed,
    /// Decide with a local in-memory limiter enforcing the quota divided by `divisor` (set it to
    /// the number of app servers sharing the store, so that together they stay near the quota).
    Fallback {
        /// How many app servers share the quota; each enforces `limit / divisor` locally.
        divisor: u32,
    },
}

impl std::str::FromStr for FailMode {
    type Err = ConfigError;

    /// Parses `open`, `closed`, `fallback` (divisor 1) or `fallback/N`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "open" => Ok(Self::Open),
            "closed" => Ok(Self::Closed),
            "fallback" => Ok(Self::Fallback { divisor: 1 }),
            other => match other.strip_prefix("fallback/").map(str::parse::<u32>) {
                Some(Ok(divisor)) if divisor > 0 => Ok(Self::Fallback { divisor }),
                _ => Err(ConfigError::Invalid(format!(
                    "fail mode {other:?} is not one of open, closed, fallback, fallback/N (N >= 1)"
                ))),
            },
        }
    }
}

//! [`BoxStore`]: any [`Store`] behind one type, so configuration can choose the store (memory,
//! Redis, cluster, with or without wrappers) when the app starts.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use crate::decision::Decision;
use crate::error::StoreError;
use crate::key::Key;
use crate::store::{Policy, PolicyRegistry, Store};

/// The future of [`BoxStore`]'s [`Store::check`].
pub type BoxStoreFuture = Pin<Box<dyn Future<Output = Result<Decision, StoreError>> + Send>>;

/// Any [`Store`], type-erased: one layer type whatever store the configuration picks.
///
/// ```
/// use tollgate::{BoxStore, DenyCache, MemoryStore, RateLimitLayer};
///
/// let use_cache = std::env::var("RATE_LIMIT_CACHE").is_ok();
/// let store = if use_cache {
///     BoxStore::new(DenyCache::new(MemoryStore::new()))
/// } else {
///     BoxStore::new(MemoryStore::new())
/// };
/// let layer = RateLimitLayer::builder("60/m".parse()?).store(store).build()?;
/// # let _ = layer;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
///
/// A store that decides at once ([`Store::check_ready`], as [`MemoryStore`](crate::MemoryStore)
/// does) still does so through the box, so the memory path allocates nothing more: it costs one
/// indirect call per decision. An asynchronous store's future is boxed once more (the Redis
/// store's is a box already). The `store_pairs` benchmark measures both: see
/// `scripts/bench-store`.
#[derive(Clone)]
pub struct BoxStore {
    inner: Arc<dyn DynStore>,
}

impl BoxStore {
    /// Erases `store`'s type.
    pub fn new<S: Store>(store: S) -> Self {
        Self {
            inner: Arc::new(store),
        }
    }
}

impl fmt::Debug for BoxStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BoxStore")
            .field("store", &self.inner.type_name())
            .finish()
    }
}

/// [`Store`] as an object-safe trait.
trait DynStore: Send + Sync + 'static {
    fn check(&self, policy: &Policy, key: &Key, cost: u32) -> BoxStoreFuture;
    fn peek(&self, policy: &Policy, key: &Key) -> BoxStoreFuture;
    fn check_ready(
        &self,
        policy: &Policy,
        key: &Key,
        cost: u32,
    ) -> Option<Result<Decision, StoreError>>;
    fn adjust(&self, policy: &Policy, key: &Key, delta: i64) -> Option<BoxStoreFuture>;
    fn reset<'a>(
        &'a self,
        policy: &'a Policy,
        key: &'a Key,
    ) -> Pin<Box<dyn Future<Output = Result<(), StoreError>> + Send + 'a>>;
    fn registry(&self) -> Option<&PolicyRegistry>;
    fn name(&self) -> &'static str;
    fn health<'a>(&'a self) -> Pin<Box<dyn Future<Output = Result<(), StoreError>> + Send + 'a>>;
    fn type_name(&self) -> &'static str;
}

impl<S: Store> DynStore for S {
    fn check(&self, policy: &Policy, key: &Key, cost: u32) -> BoxStoreFuture {
        Box::pin(Store::check(self, policy, key, cost))
    }

    fn peek(&self, policy: &Policy, key: &Key) -> BoxStoreFuture {
        Box::pin(Store::peek(self, policy, key))
    }

    #[inline]
    fn check_ready(
        &self,
        policy: &Policy,
        key: &Key,
        cost: u32,
    ) -> Option<Result<Decision, StoreError>> {
        Store::check_ready(self, policy, key, cost)
    }

    fn adjust(&self, policy: &Policy, key: &Key, delta: i64) -> Option<BoxStoreFuture> {
        let fut = Store::adjust(self, policy, key, delta)?;
        Some(Box::pin(fut))
    }

    fn reset<'a>(
        &'a self,
        policy: &'a Policy,
        key: &'a Key,
    ) -> Pin<Box<dyn Future<Output = Result<(), StoreError>> + Send + 'a>> {
        Box::pin(Store::reset(self, policy, key))
    }

    fn registry(&self) -> Option<&PolicyRegistry> {
        Store::registry(self)
    }

    fn name(&self) -> &'static str {
        Store::name(self)
    }

    fn health<'a>(&'a self) -> Pin<Box<dyn Future<Output = Result<(), StoreError>> + Send + 'a>> {
        Box::pin(Store::health(self))
    }

    fn type_name(&self) -> &'static str {
        std::any::type_name::<S>()
    }
}

impl Store for BoxStore {
    type Future = BoxStoreFuture;

    fn check(&self, policy: &Policy, key: &Key, cost: u32) -> Self::Future {
        self.inner.check(policy, key, cost)
    }

    fn peek(&self, policy: &Policy, key: &Key) -> Self::Future {
        self.inner.peek(policy, key)
    }

    #[inline]
    fn check_ready(
        &self,
        policy: &Policy,
        key: &Key,
        cost: u32,
    ) -> Option<Result<Decision, StoreError>> {
        self.inner.check_ready(policy, key, cost)
    }

    fn adjust(&self, policy: &Policy, key: &Key, delta: i64) -> Option<Self::Future> {
        self.inner.adjust(policy, key, delta)
    }

    fn reset(
        &self,
        policy: &Policy,
        key: &Key,
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        // Owned, so the future borrows nothing (resets are rare: two clones are nothing).
        let (inner, policy, key) = (Arc::clone(&self.inner), policy.clone(), key.clone());
        async move { inner.reset(&policy, &key).await }
    }

    fn registry(&self) -> Option<&PolicyRegistry> {
        self.inner.registry()
    }

    fn name(&self) -> &'static str {
        self.inner.name()
    }

    fn health(&self) -> impl Future<Output = Result<(), StoreError>> + Send {
        let inner = Arc::clone(&self.inner);
        async move { inner.health().await }
    }
}

//! [`DenyCache`]: answers a client that is over its limit locally, without a store round trip.
//!
//! An abusive client hammering one key costs a shared store (Redis) one round trip per request,
//! although every answer is the same "429". `DenyCache` wraps any [`Store`] and remembers, for
//! each (policy, key) the store has **denied**, the client's theoretical arrival time (TAT) on
//! this process's monotonic clock: `now + reset_after`, with `now` read *before* the store was
//! asked. Later checks run the GCRA step against that remembered TAT; when it says
//! [`Denied`](crate::Outcome::Denied) or [`Impossible`](crate::Outcome::Impossible), that is
//! the answer, at the cost of a [`MemoryStore`](crate::MemoryStore) denial. Otherwise the store
//! decides, and what it answers refreshes the remembered TAT.
//!
//! ## Why this is exact
//!
//! The remembered TAT is never later than the store's: it was computed from a `now` no later
//! than the store's own, and other app servers only ever *add* to the shared TAT. So:
//!
//! - it **never admits** anything: every admission is the store's own decision;
//! - it **never denies** what the store would admit at that instant: if the GCRA denies against
//!   an earlier TAT, it denies against the store's later one too;
//! - a denial for cost `n` says nothing about a smaller cost; the GCRA step is run for the cost
//!   asked, so a cost-2 request after a cost-5 denial goes to the store when it could pass;
//! - peeks (cost 0) are never denied by the GCRA, so they always go to the store.
//!
//! A local denial's `retry_after` and `remaining` are computed from what this server last saw;
//! other servers' charges since then can make the store's true wait longer, never shorter. When
//! the local wait is over, the next request asks the store again, which denies it if others
//! used the quota meanwhile. A client flooding far above its limit therefore costs each app
//! server about one store call per emission interval `T` (the one request that may pass).
//!
//! ## Caveats
//!
//! - **Resets made elsewhere are not seen.** [`Store::reset`] through this cache clears the
//!   local entry and the store's state; but a reset made on another app server (or directly in
//!   Redis, or a Redis key evicted under `maxmemory`) goes unnoticed here until the remembered
//!   deny time passes, at most the client's `reset_after` at its last denial. The same holds
//!   for a store that forgets state by evicting it (a full `MemoryStore`).
//! - The local clock and the store's clock only exchange durations, so an offset between them
//!   does not matter; a rate difference (parts per million) does, negligibly.
//! - Entries are keyed by policy name; a policy with the same name but a different quota never
//!   uses another quota's entry.
//!
//! ## Memory
//!
//! At most `max_keys` entries (default [`DEFAULT_MAX_KEYS`]), one per denied (policy, key).
//! Entries whose deny time has passed change no decision and are swept automatically as new
//! denials arrive; at `max_keys`, the entries closest to expiry are evicted first, and a denial
//! that finds the cache full is not remembered until there is room. No request waits for that
//! work: as in the [`MemoryStore`](crate::MemoryStore), a pass over more than 8,192 entries
//! runs on a sweeper thread of the cache's own (started when first needed, ended when the last
//! clone is dropped); no cleanup task is needed. A hit takes one shard read lock of a `DashMap` and allocates
//! nothing (short keys are stored inline); the layer gets it from [`Store::check_ready`], with
//! no future at all, at about the cost of a `MemoryStore` denial (`benches/resilience.rs`).
//! Multi-quota policies ([`Policy::multi`]) are remembered with one TAT per quota and decided
//! locally by the same all-or-nothing step as the stores.
//!
//! ## Example
//!
//! ```
//! use tollgate::{DenyCache, Key, MemoryStore, Policy, Quota, Store};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // In production the inner store is a RedisStore shared by many app servers.
//! let store = DenyCache::new(MemoryStore::new()).max_keys(50_000);
//! let policy = Policy::new("api", Quota::per_minute(2)?)?;
//! let key = Key::from("client-7");
//! assert!(store.check(&policy, &key, 1).await?.is_allowed());
//! assert!(store.check(&policy, &key, 1).await?.is_allowed());
//! // The store denies once; the next denials are answered locally.
//! for _ in 0..10 {
//!     assert!(!store.check(&policy, &key, 1).await?.is_allowed());
//! }
//! assert_eq!(store.stats().store_calls, 3);
//! assert_eq!(store.stats().local_denials, 9);
//! # Ok(()) }
//! ```

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use pin_project_lite::pin_project;

use crate::clock::{Clock, MonotonicClock};
use crate::decision::{Decision, Outcome};
use crate::error::StoreError;
use crate::gcra;
use crate::key::Key;
use crate::quota::Quota;
use crate::store::keyspace::{
    self, MAX_COMPOSED, Map, Plan, Removals, Sample, StoredKey, Sweep, Sweeper, Verdict, new_map,
};
use crate::store::{Policy, Store};

/// The default bound on remembered denials.
pub const DEFAULT_MAX_KEYS: usize = 100_000;

/// Fewest new entries between two automatic sweeps.
const MIN_SWEEP_INTERVAL: usize = 1_024;

/// A [`Store`] wrapper that answers over-limit clients locally; see the [module docs](self).
///
/// Clones share one cache (and clone the inner store, which for the shipped stores shares its
/// state too).
pub struct DenyCache<S, C = MonotonicClock> {
    store: S,
    shared: Arc<Shared<C>>,
}

struct Shared<C> {
    /// Single-quota policies: one slot per client.
    map: Map<Slot>,
    /// Policies of several quotas: one slot per quota.
    multi: Map<Box<[Slot]>>,
    clock: C,
    max_keys: AtomicUsize,
    /// Counts the entries and runs the passes over them.
    sweeper: Sweeper,
    local_denials: AtomicU64,
    store_calls: AtomicU64,
    /// `tollgate_deny_cache_hits_total`.
    hits: crate::telemetry::CounterHandle,
}

/// One remembered quota of a client: a TAT that is a lower bound of the store's, and the quota
/// it was computed under (24 bytes).
struct Slot {
    tat: AtomicU64,
    interval: u64,
    capacity: u32,
}

impl Slot {
    fn new(quota: &Quota, tat: u64) -> Self {
        Self {
            tat: AtomicU64::new(tat),
            interval: quota.interval_micros(),
            capacity: quota.capacity(),
        }
    }

    #[inline]
    fn matches(&self, quota: &Quota) -> bool {
        self.interval == quota.interval_micros() && self.capacity == quota.capacity()
    }

    fn tat(&self) -> u64 {
        self.tat.load(Ordering::Acquire)
    }
}

/// Remembered under exactly these quotas, in this order.
fn all_match(slots: &[Slot], quotas: &[Quota]) -> bool {
    slots.len() == quotas.len() && slots.iter().zip(quotas).all(|(s, q)| s.matches(q))
}

/// The latest of an entry's TATs: it changes no decision once that has passed.
fn latest(slots: &[Slot]) -> u64 {
    slots.iter().map(Slot::tat).max().unwrap_or(0)
}

/// A snapshot of a [`DenyCache`]'s counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct DenyCacheStats {
    /// Checks answered locally (denied or impossible) without calling the store. A statistic
    /// kept off the atomic read-modify-write path: under heavy concurrency on one key it may
    /// undercount slightly.
    pub local_denials: u64,
    /// Checks passed on to the inner store (peeks included).
    pub store_calls: u64,
    /// Remembered (policy, key) entries now.
    pub entries: usize,
}

impl<S> DenyCache<S> {
    /// Wraps `store`, on the monotonic clock, remembering at most [`DEFAULT_MAX_KEYS`] clients.
    ///
    /// ```
    /// use tollgate::{DenyCache, MemoryStore};
    ///
    /// let store = DenyCache::new(MemoryStore::new());
    /// assert!(store.is_empty());
    /// ```
    pub fn new(store: S) -> Self {
        Self {
            store,
            shared: Shared::new(MonotonicClock::new(), DEFAULT_MAX_KEYS),
        }
    }
}

impl<S, C: Clock> DenyCache<S, C> {
    /// Remembers at most `max_keys` clients (default [`DEFAULT_MAX_KEYS`]); `0` turns the cache
    /// off (every check goes to the store). Applies to every clone.
    ///
    /// ```
    /// use tollgate::{DenyCache, MemoryStore};
    ///
    /// let store = DenyCache::new(MemoryStore::new()).max_keys(1_000);
    /// assert_eq!(store.max_key_count(), 1_000);
    /// ```
    #[must_use]
    pub fn max_keys(mut self, max_keys: usize) -> Self {
        // Called before cloning, on an empty cache (as a builder step): maps sized afresh, with
        // shards small enough for the new bound.
        if Arc::strong_count(&self.shared) == 1 && self.is_empty() {
            match Arc::try_unwrap(self.shared) {
                Ok(old) => {
                    let shared = Shared::new(old.clock, max_keys);
                    for (new, old) in [
                        (&shared.local_denials, &old.local_denials),
                        (&shared.store_calls, &old.store_calls),
                    ] {
                        new.store(old.load(Ordering::Relaxed), Ordering::Relaxed);
                    }
                    self.shared = shared;
                    return self;
                }
                Err(shared) => self.shared = shared,
            }
        }
        self.shared.max_keys.store(max_keys, Ordering::Relaxed);
        self
    }

    /// Uses `clock` for the local deny times instead of the monotonic system clock (e.g. a
    /// [`ManualClock`](crate::ManualClock) in tests). Starts with an empty cache; call it before
    /// cloning.
    ///
    /// ```
    /// use tollgate::{DenyCache, ManualClock, MemoryStore};
    ///
    /// let clock = ManualClock::new();
    /// let store = DenyCache::new(MemoryStore::new()).clock(clock.clone());
    /// # let _ = store;
    /// ```
    pub fn clock<C2: Clock>(self, clock: C2) -> DenyCache<S, C2> {
        let max_keys = self.shared.max_keys.load(Ordering::Relaxed);
        DenyCache {
            store: self.store,
            shared: Shared::new(clock, max_keys),
        }
    }

    /// The wrapped store.
    pub fn get_ref(&self) -> &S {
        &self.store
    }

    /// The bound on remembered clients.
    pub fn max_key_count(&self) -> usize {
        self.shared.max_keys.load(Ordering::Relaxed)
    }

    /// How many (policy, key) denials are remembered.
    pub fn len(&self) -> usize {
        self.shared.len()
    }

    /// Nothing is remembered.
    pub fn is_empty(&self) -> bool {
        self.shared.map.is_empty() && self.shared.multi.is_empty()
    }

    /// The counters since the cache was made.
    ///
    /// ```
    /// use tollgate::{DenyCache, MemoryStore};
    ///
    /// let stats = DenyCache::new(MemoryStore::new()).stats();
    /// assert_eq!((stats.local_denials, stats.store_calls, stats.entries), (0, 0, 0));
    /// ```
    pub fn stats(&self) -> DenyCacheStats {
        let s = &*self.shared;
        DenyCacheStats {
            local_denials: s.local_denials.load(Ordering::Relaxed),
            store_calls: s.store_calls.load(Ordering::Relaxed),
            entries: s.len(),
        }
    }

    /// Forgets every remembered denial whose deny time has passed, and if the cache is full,
    /// the entries closest to expiry until it is 1/16 below `max_keys`. This runs automatically;
    /// call it only to release memory at a moment of your choosing. It waits for an automatic
    /// pass under way, then makes its own.
    pub fn sweep(&self) {
        self.shared.sweep_now(true);
    }

    /// Forgets every remembered denial (the store's state is untouched).
    pub fn clear(&self) {
        let shared = &*self.shared;
        shared.map.clear();
        shared.multi.clear();
        shared
            .sweeper
            .reset(shared.max_keys.load(Ordering::Relaxed));
    }
}

impl<S: Clone, C> Clone for DenyCache<S, C> {
    fn clone(&self) -> Self {
        Self {
            store: self.store.clone(),
            shared: Arc::clone(&self.shared),
        }
    }
}

impl<S: fmt::Debug, C> fmt::Debug for DenyCache<S, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DenyCache")
            .field("store", &self.store)
            .field(
                "entries",
                &(self.shared.map.len() + self.shared.multi.len()),
            )
            .field("max_keys", &self.shared.max_keys.load(Ordering::Relaxed))
            .finish()
    }
}

impl<C: Clock> Shared<C> {
    fn new(clock: C, max_keys: usize) -> Arc<Self> {
        Arc::new_cyclic(|shared: &Weak<Self>| {
            let target: Weak<dyn Sweep> = shared.clone();
            Self {
                map: new_map(max_keys),
                multi: new_map(max_keys),
                clock,
                max_keys: AtomicUsize::new(max_keys),
                sweeper: Sweeper::new(MIN_SWEEP_INTERVAL, max_keys, target),
                local_denials: AtomicU64::new(0),
                store_calls: AtomicU64::new(0),
                hits: crate::telemetry::CounterHandle::new("tollgate_deny_cache_hits_total"),
            }
        })
    }

    fn len(&self) -> usize {
        self.map.len() + self.multi.len()
    }

    /// A statistic: a plain load and store, no locked read-modify-write on the hit path;
    /// concurrent hits may lose an increment.
    #[inline]
    fn count_local(&self) {
        let n = self.local_denials.load(Ordering::Relaxed);
        self.local_denials
            .store(n.wrapping_add(1), Ordering::Relaxed);
        self.hits.increment();
    }

    /// The local answer for a charging check: `Some` when the remembered TATs deny it.
    #[inline]
    fn local(&self, key: &[u8], policy: &Policy, now: u64, cost: u32) -> Option<Decision> {
        let quotas = policy.quotas();
        let decision = if let [quota] = quotas {
            let tat = {
                let slot = self.map.get(key)?;
                if !slot.matches(quota) {
                    return None;
                }
                slot.tat()
            };
            gcra::step(tat, now, quota, cost).decision
        } else {
            let mut tats = [0u64; Policy::MAX_QUOTAS];
            {
                let slots = self.multi.get(key)?;
                if !all_match(&slots, quotas) || slots.len() > tats.len() {
                    return None;
                }
                for (t, slot) in tats.iter_mut().zip(slots.iter()) {
                    *t = slot.tat();
                }
            }
            gcra::step_all(&tats[..quotas.len()], now, quotas, cost).decision
        };
        (!decision.is_allowed()).then_some(decision)
    }

    /// Notes what the store decided for a check under `quotas` sent at `sent` (local clock).
    fn record(&self, key: &[u8], quotas: &[Quota], sent: u64, decision: &Decision) {
        let per_quota = decision.per_quota();
        if per_quota.len() != quotas.len() {
            // A store that does not report every quota's state: nothing safe to remember.
            return;
        }
        let tat = |d: &Decision| sent.saturating_add(micros(d.reset_after()));
        let denied = decision.outcome() == Outcome::Denied;
        if let ([quota], [d]) = (quotas, per_quota) {
            if let Some(slot) = self.map.get(key) {
                if slot.matches(quota) {
                    slot.tat.fetch_max(tat(d), Ordering::AcqRel);
                    return;
                }
                drop(slot);
                // Remembered under another quota of the same name: replaced or dropped.
                self.sweeper
                    .removed(usize::from(self.map.remove(key).is_some()));
            }
            if denied {
                self.insert(&self.map, key, Slot::new(quota, tat(d)));
            }
            return;
        }
        if let Some(slots) = self.multi.get(key) {
            if all_match(&slots, quotas) {
                for (slot, d) in slots.iter().zip(per_quota) {
                    slot.tat.fetch_max(tat(d), Ordering::AcqRel);
                }
                return;
            }
            drop(slots);
            self.sweeper
                .removed(usize::from(self.multi.remove(key).is_some()));
        }
        if denied {
            let slots = quotas
                .iter()
                .zip(per_quota)
                .map(|(q, d)| Slot::new(q, tat(d)))
                .collect();
            self.insert(&self.multi, key, slots);
        }
    }

    fn insert<V>(&self, map: &Map<V>, key: &[u8], value: V) {
        let max_keys = self.max_keys.load(Ordering::Relaxed);
        if max_keys == 0 {
            return;
        }
        let len = self.sweeper.len();
        if len >= max_keys {
            // Full: the sweeper makes room whatever the count says by the time it runs.
            self.sweeper.found_full();
            self.make_room(len);
            if self.sweeper.len() >= max_keys {
                // Still full (the pass runs on the sweeper thread, or everything is live): a
                // cache may forget, so this denial is not remembered.
                return;
            }
        }
        if map.insert(StoredKey::new(key), value).is_none() {
            let len = self.sweeper.inserted();
            if self.sweeper.is_due(len) {
                self.make_room(len);
            }
        }
    }

    /// A pass is due: runs it here if the maps are small (a bounded pass), or else wakes the
    /// sweeper and returns at once.
    fn make_room(&self, len: usize) {
        match self.sweeper.small_pass(len) {
            Some(mut stamps) => self.pass(&mut stamps, false),
            None => self.sweeper.request(),
        }
    }

    fn remove(&self, key: &[u8]) {
        let removed = usize::from(self.map.remove(key).is_some())
            + usize::from(self.multi.remove(key).is_some());
        self.sweeper.removed(removed);
    }

    /// One pass, now, on this thread: waits for one under way.
    fn sweep_now(&self, asked: bool) {
        let mut stamps = self.sweeper.lock_pass();
        self.pass(&mut stamps, asked);
    }

    /// Drops entries whose deny time has passed; if the cache is full, evicts the entries
    /// closest to expiry until it is 1/16 below `max_keys` (placed by a sample of the deny
    /// times, see `keyspace::Sample`). The pass lock is held; `stamps` is its buffer.
    fn pass(&self, stamps: &mut Vec<u64>, asked: bool) {
        let found_full = self.sweeper.take_full();
        let now = self.clock.now_micros();
        let max_keys = self.max_keys.load(Ordering::Relaxed);
        let plan = if Plan::needs_sample(self.sweeper.len(), max_keys) {
            let len = self.len();
            let mut sample = Sample::new(len, now, stamps);
            let share = sample.share(self.map.len());
            for entry in self.map.iter().take(share) {
                sample.offer(entry.value().tat());
            }
            let share = sample.share(self.multi.len());
            for entry in self.multi.iter().take(share) {
                sample.offer(latest(entry.value()));
            }
            let full = Plan::is_full(len, max_keys, found_full, asked);
            sample.plan(max_keys, full, 0)
        } else {
            Plan::fresh(now)
        };
        {
            let mut removals = Removals::new(&self.sweeper, &plan);
            let mut keep = |stamp: u64| match plan.judge(stamp) {
                Verdict::Keep | Verdict::Candidate => true,
                Verdict::Remove => {
                    removals.one();
                    false
                }
            };
            self.map.retain(|_, slot| keep(slot.tat()));
            self.multi.retain(|_, slots| keep(latest(slots)));
        }
        self.sweeper.passed(max_keys);
    }
}

impl<C: Clock> Sweep for Shared<C> {
    fn due(&self) -> bool {
        self.sweeper.is_due(self.sweeper.len())
    }

    fn sweep(&self) {
        self.sweep_now(false);
    }
}

impl<C: Clock> Shared<C> {
    /// Composes the key and answers locally when the cache can (counting the local denial).
    /// Returns the time of the attempt, the composed key (for noting the store's answer) and
    /// the local decision, if any. A peek is never denied by the GCRA, so only charging checks
    /// can be answered here.
    #[inline]
    fn try_local(
        &self,
        policy: &Policy,
        key: &Key,
        cost: u32,
    ) -> (u64, [u8; MAX_COMPOSED], Option<usize>, Option<Decision>) {
        let now = self.clock.now_micros();
        let mut buf = [0u8; MAX_COMPOSED];
        let len = compose(&mut buf, policy, key);
        let local = match len {
            Some(len) if cost > 0 => self.local(&buf[..len], policy, now, cost),
            _ => None,
        };
        if local.is_some() {
            self.count_local();
        }
        (now, buf, len, local)
    }
}

/// The composed key's length in `buf` (see [`keyspace::compose`]); always `Some` for keys
/// built by [`Key`].
#[inline]
fn compose(buf: &mut [u8; MAX_COMPOSED], policy: &Policy, key: &Key) -> Option<usize> {
    Some(keyspace::compose(buf, policy, key).len())
}

impl<S: Store, C: Clock> Store for DenyCache<S, C> {
    type Future = DenyCacheFuture<S::Future, C>;

    #[inline]
    fn check(&self, policy: &Policy, key: &Key, cost: u32) -> Self::Future {
        let shared = &*self.shared;
        let (now, buf, len, local) = shared.try_local(policy, key, cost);
        if let Some(decision) = local {
            return DenyCacheFuture {
                state: State::Local {
                    decision: Some(decision),
                },
            };
        }
        shared.store_calls.fetch_add(1, Ordering::Relaxed);
        let fut = self.store.check(policy, key, cost);
        let note = len.map(|len| Note {
            shared: Arc::clone(&self.shared),
            key: buf,
            len,
            sent: now,
            policy: policy.clone(),
            forget: false,
        });
        DenyCacheFuture {
            state: State::Store { fut, note },
        }
    }

    /// The inner store's adjustment. A refund (`delta < 0`) forgets the client's remembered
    /// denial before the store is asked and again when it has answered, so that no local
    /// denial outlives the refund that made it obsolete (a denial noted while the refund was on
    /// its way is older than it). An unconditional charge only adds to the store's TAT, so a
    /// remembered TAT stays a lower bound; it is brought forward with the store's answer.
    fn adjust(&self, policy: &Policy, key: &Key, delta: i64) -> Option<Self::Future> {
        let shared = &*self.shared;
        let now = shared.clock.now_micros();
        let mut buf = [0u8; MAX_COMPOSED];
        let len = compose(&mut buf, policy, key);
        let forget = delta < 0;
        if let (true, Some(len)) = (forget, len) {
            shared.remove(&buf[..len]);
        }
        let fut = self.store.adjust(policy, key, delta)?;
        let note = len.map(|len| Note {
            shared: Arc::clone(&self.shared),
            key: buf,
            len,
            sent: now,
            policy: policy.clone(),
            forget,
        });
        Some(DenyCacheFuture {
            state: State::Store { fut, note },
        })
    }

    /// A local denial at once; otherwise the inner store's own `check_ready` (whose decision is
    /// noted as [`Store::check`]'s would be), or `None` when it has none.
    #[inline]
    fn check_ready(
        &self,
        policy: &Policy,
        key: &Key,
        cost: u32,
    ) -> Option<Result<Decision, StoreError>> {
        let shared = &*self.shared;
        let (now, buf, len, local) = shared.try_local(policy, key, cost);
        if let Some(decision) = local {
            return Some(Ok(decision));
        }
        let result = self.store.check_ready(policy, key, cost)?;
        shared.store_calls.fetch_add(1, Ordering::Relaxed);
        if let (Ok(decision), Some(len)) = (&result, len) {
            shared.record(&buf[..len], policy.quotas(), now, decision);
        }
        Some(result)
    }

    fn registry(&self) -> Option<&crate::store::PolicyRegistry> {
        self.store.registry()
    }

    fn name(&self) -> &'static str {
        self.store.name()
    }

    /// The wrapped store's health, asked directly (whatever the wrapper's own state).
    fn health(&self) -> impl Future<Output = Result<(), StoreError>> + Send {
        self.store.health()
    }

    fn reset(
        &self,
        policy: &Policy,
        key: &Key,
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        let mut buf = [0u8; MAX_COMPOSED];
        let len = compose(&mut buf, policy, key);
        if let Some(len) = len {
            self.shared.remove(&buf[..len]);
        }
        let shared = Arc::clone(&self.shared);
        let inner = self.store.reset(policy, key);
        async move {
            let result = inner.await;
            // A denial noted while the reset was on its way is older than the reset.
            if let Some(len) = len {
                shared.remove(&buf[..len]);
            }
            result
        }
    }
}

/// What a store call must note when it completes.
struct Note<C> {
    shared: Arc<Shared<C>>,
    key: [u8; MAX_COMPOSED],
    len: usize,
    sent: u64,
    /// Two reference counts: cheaper than copying the quotas.
    policy: Policy,
    /// A refund: forget the key's remembered denial instead of noting the answer.
    forget: bool,
}

pin_project! {
    /// The future of [`DenyCache`]'s [`Store::check`]: ready at once for a local denial (no
    /// allocation), otherwise the inner store's future, whose decision is noted on completion.
    pub struct DenyCacheFuture<F, C> {
        #[pin]
        state: State<F, C>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F, C> {
        Local { decision: Option<Decision> },
        Store {
            #[pin]
            fut: F,
            note: Option<Note<C>>,
        },
        Done,
    }
}

impl<F, C> fmt::Debug for DenyCacheFuture<F, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.state {
            State::Local { .. } => "local",
            State::Store { .. } => "store",
            State::Done => "done",
        };
        f.debug_struct("DenyCacheFuture")
            .field("state", &state)
            .finish()
    }
}

impl<F, C> Future for DenyCacheFuture<F, C>
where
    F: Future<Output = Result<Decision, StoreError>>,
    C: Clock,
{
    type Output = Result<Decision, StoreError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut state = self.project().state;
        match state.as_mut().project() {
            // Taken once; polled again after completion, it stays pending (never panics).
            StateProj::Local { decision } => match decision.take() {
                Some(d) => Poll::Ready(Ok(d)),
                None => Poll::Pending,
            },
            StateProj::Store { fut, note } => {
                let result = ready!(fut.poll(cx));
                if let Some(note) = note.take() {
                    let key = note.key.get(..note.len).unwrap_or(&[]);
                    match &result {
                        // Whether or not the refund was applied (a failure may still have
                        // reached the store), a remembered denial may be obsolete.
                        _ if note.forget => note.shared.remove(key),
                        Ok(decision) => {
                            note.shared
                                .record(key, note.policy.quotas(), note.sent, decision);
                        }
                        Err(_) => {}
                    }
                }
                state.set(State::Done);
                Poll::Ready(result)
            }
            // Polled after completion: never panic, never complete twice.
            StateProj::Done => Poll::Pending,
        }
    }
}

/// `d` in whole microseconds, saturating.
fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ManualClock, MemoryStore, StoreErrorKind};
    use proptest::prelude::*;
    use std::future::{Ready, ready};
    use std::sync::atomic::{AtomicBool, AtomicUsize};
    use std::task::Waker;

    /// Polls a future that must be ready at once (every store here is synchronous).
    fn now<F: Future>(f: F) -> F::Output {
        let mut f = std::pin::pin!(f);
        match f.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
            Poll::Ready(out) => out,
            Poll::Pending => panic!("a synchronous store's future was pending"),
        }
    }

    /// A store that counts the checks reaching it, and can fail them on purpose.
    #[derive(Clone)]
    struct Counting {
        inner: MemoryStore<ManualClock>,
        calls: Arc<AtomicUsize>,
        fail: Arc<AtomicBool>,
    }

    impl Counting {
        fn new(clock: &ManualClock) -> Self {
            Self {
                inner: MemoryStore::builder().clock(clock.clone()).build().unwrap(),
                calls: Arc::default(),
                fail: Arc::default(),
            }
        }

        fn calls(&self) -> usize {
            self.calls.load(Ordering::SeqCst)
        }
    }

    impl Store for Counting {
        type Future = Ready<Result<Decision, StoreError>>;

        fn check(&self, policy: &Policy, key: &Key, cost: u32) -> Self::Future {
            self.calls.fetch_add(1, Ordering::SeqCst);
            if self.fail.load(Ordering::SeqCst) {
                return ready(Err(StoreError::new(StoreErrorKind::Connection, "down")));
            }
            ready(Ok(self.inner.check_now(policy, key, cost)))
        }

        fn reset(
            &self,
            policy: &Policy,
            key: &Key,
        ) -> impl Future<Output = Result<(), StoreError>> + Send {
            self.inner.reset(policy, key)
        }
    }

    fn setup() -> (DenyCache<Counting, ManualClock>, Counting, ManualClock) {
        let clock = ManualClock::new();
        let store = Counting::new(&clock);
        let cache = DenyCache::new(store.clone()).clock(clock.clone());
        (cache, store, clock)
    }

    fn policy(quota: &str) -> Policy {
        Policy::new("p", quota.parse().unwrap()).unwrap()
    }

    /// A flood far above the limit: decisions identical to the store's own at every instant,
    /// one store call per emission interval once the client is known to be over.
    #[test]
    fn flood_is_decided_exactly_with_one_store_call_per_interval() {
        let (cache, store, clock) = setup();
        let reference = MemoryStore::builder().clock(clock.clone()).build().unwrap();
        let p = policy("10/s;capacity=5");
        let (a, b) = (Key::from("flooder"), Key::from("reference"));
        let mut denied = 0;
        for _ in 0..1_000 {
            let got = now(cache.check(&p, &a, 1)).unwrap();
            let want = reference.check_now(&p, &b, 1);
            assert_eq!(got, want);
            denied += usize::from(!got.is_allowed());
            clock.advance(Duration::from_millis(1));
        }
        // 5 at once, then one every 100 ms over 1 s; each denial's first store call caches.
        assert_eq!(denied, 1_000 - 5 - 9);
        assert!(store.calls() <= 5 + 1 + 10, "store calls {}", store.calls());
        let stats = cache.stats();
        assert_eq!(stats.store_calls as usize, store.calls());
        assert_eq!(stats.local_denials as usize, 1_000 - store.calls());
        assert_eq!(stats.entries, 1);
    }

    /// V1: a denial of cost 5 says nothing about cost 2, which the store still admits.
    #[test]
    fn a_denial_of_a_large_cost_does_not_deny_a_smaller_one() {
        let (cache, store, _) = setup();
        let p = policy("5/5s");
        let k = Key::from("k");
        assert_eq!(now(cache.check(&p, &k, 3)).unwrap().remaining(), 2);
        let big = now(cache.check(&p, &k, 5)).unwrap();
        assert_eq!(big.retry_after(), Some(Duration::from_secs(3)));
        assert_eq!(store.calls(), 2);
        // Cost 5 again: local. Cost 2: the store, admitted.
        assert_eq!(now(cache.check(&p, &k, 5)).unwrap(), big);
        assert_eq!(store.calls(), 2);
        let small = now(cache.check(&p, &k, 2)).unwrap();
        assert!(small.is_allowed());
        assert_eq!(small.remaining(), 0);
        assert_eq!(store.calls(), 3);
        // The entry was refreshed by the admission: cost 1 is now denied locally.
        let one = now(cache.check(&p, &k, 1)).unwrap();
        assert_eq!(one.retry_after(), Some(Duration::from_secs(1)));
        assert_eq!(store.calls(), 3);
    }

    #[test]
    fn peeks_always_reach_the_store_and_impossible_costs_are_local_once_known() {
        let (cache, store, _) = setup();
        let p = policy("2/h");
        let k = Key::from("k");
        for _ in 0..3 {
            now(cache.check(&p, &k, 1)).unwrap();
        }
        assert_eq!(store.calls(), 3);
        for _ in 0..4 {
            let peek = now(cache.peek(&p, &k)).unwrap();
            assert!(peek.is_allowed());
            assert_eq!(peek.remaining(), 0);
        }
        assert_eq!(store.calls(), 7);
        let never = now(cache.check(&p, &k, 3)).unwrap();
        assert_eq!(never.outcome(), Outcome::Impossible);
        assert_eq!(never.reset_after(), Duration::from_secs(3_600));
        assert_eq!(store.calls(), 7);
    }

    #[test]
    fn reset_forgets_the_local_entry_and_the_store_state() {
        let (cache, store, _) = setup();
        let p = policy("1/h");
        let k = Key::from("k");
        now(cache.check(&p, &k, 1)).unwrap();
        assert!(!now(cache.check(&p, &k, 1)).unwrap().is_allowed());
        assert_eq!(cache.len(), 1);
        now(cache.reset(&p, &k)).unwrap();
        assert!(cache.is_empty());
        assert!(now(cache.check(&p, &k, 1)).unwrap().is_allowed());
        assert_eq!(store.calls(), 3);
    }

    /// Entries are remembered per quota: another quota under the same name never uses them.
    #[test]
    fn a_policy_of_the_same_name_with_another_quota_is_not_answered_locally() {
        let (cache, store, _) = setup();
        let strict = policy("1/h");
        let loose = policy("100/h;capacity=200");
        let k = Key::from("k");
        now(cache.check(&strict, &k, 1)).unwrap();
        assert!(!now(cache.check(&strict, &k, 1)).unwrap().is_allowed());
        assert_eq!(store.calls(), 2);
        // The underlying MemoryStore shares the TAT by name; only the store may decide.
        let d = now(cache.check(&loose, &k, 1)).unwrap();
        assert!(d.is_allowed());
        assert_eq!(store.calls(), 3);
        assert!(cache.is_empty(), "the mismatched entry was dropped");
    }

    #[test]
    fn store_failures_pass_through_and_keep_the_entry() {
        let (cache, store, clock) = setup();
        let p = policy("1/s");
        let k = Key::from("k");
        now(cache.check(&p, &k, 1)).unwrap();
        now(cache.check(&p, &k, 1)).unwrap();
        store.fail.store(true, Ordering::SeqCst);
        // Still over: local, the store is not even asked.
        assert!(!now(cache.check(&p, &k, 1)).unwrap().is_allowed());
        clock.advance(Duration::from_secs(1));
        let err = now(cache.check(&p, &k, 1)).unwrap_err();
        assert_eq!(err.kind(), StoreErrorKind::Connection);
        assert_eq!(cache.len(), 1);
    }

    #[test]
    fn memory_is_bounded_and_expired_entries_are_swept() {
        let clock = ManualClock::new();
        let store = Counting::new(&clock);
        let cache = DenyCache::new(store).clock(clock.clone()).max_keys(100);
        let p = policy("1/h");
        for i in 0..1_000u64 {
            let k = Key::from(i);
            now(cache.check(&p, &k, 1)).unwrap();
            now(cache.check(&p, &k, 1)).unwrap();
            assert!(cache.len() <= 100, "len {} after {i}", cache.len());
        }
        assert!(cache.len() >= 50, "still caching: {}", cache.len());
        clock.advance(Duration::from_secs(3_600));
        cache.sweep();
        assert!(cache.is_empty());
    }

    /// A cache too large for a pass to run where it falls due: with its sweeper stalled (the
    /// pass lock held here), denials that find it full are not remembered, and nothing waits;
    /// once the sweeper runs, the entries closest to expiry go, down to 1/16 below the bound.
    #[test]
    fn a_full_cache_never_waits_for_its_sweeper() {
        const MAX: u64 = 16_384;
        let clock = ManualClock::new();
        let store = MemoryStore::builder().clock(clock.clone()).build().unwrap();
        let cache = DenyCache::new(store)
            .clock(clock.clone())
            .max_keys(MAX as usize);
        let p = policy("1/h");
        let deny = |i: u64| {
            let k = Key::from(i);
            now(cache.check(&p, &k, 1)).unwrap();
            clock.advance(Duration::from_micros(1));
            assert!(!now(cache.check(&p, &k, 1)).unwrap().is_allowed());
        };
        for i in 0..MAX {
            deny(i);
        }
        cache.shared.sweeper.settle();
        assert_eq!(cache.len(), MAX as usize);

        let stalled = cache.shared.sweeper.lock_pass();
        for i in MAX..MAX + 100 {
            deny(i);
            assert_eq!(cache.len(), MAX as usize, "full: not remembered");
        }
        drop(stalled);
        cache.shared.sweeper.settle();
        assert_eq!(cache.len(), (MAX - MAX / 16 - 1) as usize);
        let calls = cache.stats().store_calls;
        now(cache.check(&p, &Key::from(MAX - 1), 1)).unwrap();
        assert_eq!(
            cache.stats().store_calls,
            calls,
            "the latest denial is still local"
        );
        now(cache.check(&p, &Key::from(0u64), 1)).unwrap();
        assert_eq!(
            cache.stats().store_calls,
            calls + 1,
            "the earliest was evicted"
        );
    }

    #[test]
    fn max_keys_zero_turns_the_cache_off() {
        let (cache, store, _) = setup();
        let cache = cache.max_keys(0);
        let p = policy("1/h");
        let k = Key::from("k");
        for _ in 0..10 {
            now(cache.check(&p, &k, 1)).unwrap();
        }
        assert_eq!(store.calls(), 10);
        assert!(cache.is_empty());
    }

    #[test]
    fn polled_after_completion_is_pending_not_a_panic() {
        let (cache, _, _) = setup();
        let p = policy("1/h");
        let k = Key::from("k");
        now(cache.check(&p, &k, 1)).unwrap();
        for _ in 0..2 {
            let mut f = std::pin::pin!(cache.check(&p, &k, 1));
            let mut cx = Context::from_waker(Waker::noop());
            assert!(matches!(f.as_mut().poll(&mut cx), Poll::Ready(Ok(_))));
            assert!(f.as_mut().poll(&mut cx).is_pending());
        }
    }

    /// Several quotas in one policy: remembered together, denied locally when any denies.
    #[test]
    fn multi_quota_policies_are_cached_exactly() {
        let (cache, store, clock) = setup();
        let reference = MemoryStore::builder().clock(clock.clone()).build().unwrap();
        let p = Policy::multi(
            "m",
            ["2/s".parse::<Quota>().unwrap(), "5/h".parse().unwrap()],
        )
        .unwrap();
        let (a, b) = (Key::from("a"), Key::from("b"));
        for _ in 0..400 {
            let got = now(cache.check(&p, &a, 1)).unwrap();
            assert_eq!(got, reference.check_now(&p, &b, 1));
            clock.advance(Duration::from_millis(10));
        }
        assert!(store.calls() <= 12, "store calls {}", store.calls());
    }

    /// Over a synchronous store (MemoryStore), through `check_ready` as the layer calls it:
    /// identical decisions, denials answered locally.
    #[test]
    fn check_ready_over_a_synchronous_store() {
        let clock = ManualClock::new();
        let inner = MemoryStore::builder().clock(clock.clone()).build().unwrap();
        let reference = MemoryStore::builder().clock(clock.clone()).build().unwrap();
        let cache = DenyCache::new(inner).clock(clock.clone());
        let p = policy("10/s;capacity=5");
        let (a, b) = (Key::from("a"), Key::from("b"));
        for i in 0..1_000u32 {
            let cost = 1 + i % 3;
            let got = cache.check_ready(&p, &a, cost).unwrap().unwrap();
            assert_eq!(got, reference.check_now(&p, &b, cost), "request {i}");
            clock.advance(Duration::from_millis(1));
        }
        let stats = cache.stats();
        assert_eq!(stats.local_denials + stats.store_calls, 1_000);
        assert!(stats.store_calls < 100, "{stats:?}");
        // Peeks go to the store, and say the same.
        let peek = cache.check_ready(&p, &a, 0).unwrap().unwrap();
        assert_eq!(peek, reference.check_now(&p, &b, 0));
        assert_eq!(cache.stats().store_calls, stats.store_calls + 1);
    }

    /// An asynchronous inner store: `check_ready` answers local denials only.
    #[test]
    fn check_ready_over_an_asynchronous_store_answers_only_local_denials() {
        let (cache, store, _) = setup();
        let p = policy("1/h");
        let k = Key::from("k");
        assert!(cache.check_ready(&p, &k, 1).is_none());
        now(cache.check(&p, &k, 1)).unwrap();
        now(cache.check(&p, &k, 1)).unwrap();
        let local = cache.check_ready(&p, &k, 1).unwrap().unwrap();
        assert_eq!(local.outcome(), Outcome::Denied);
        assert!(cache.check_ready(&p, &k, 0).is_none());
        assert_eq!(store.calls(), 2);
    }

    /// Four threads on two app servers' caches over one shared store, time frozen: exactly the
    /// capacity is admitted, whatever the interleaving of denials being noted and read.
    #[test]
    fn concurrent_floods_admit_exactly_the_capacity() {
        let clock = ManualClock::new();
        let shared = MemoryStore::builder().clock(clock.clone()).build().unwrap();
        let caches = [
            DenyCache::new(shared.clone()).clock(clock.clone()),
            DenyCache::new(shared.clone()).clock(clock.clone()),
        ];
        let p = Policy::new("p", "7/h".parse::<Quota>().unwrap()).unwrap();
        let k = Key::from("k");
        let admitted = AtomicUsize::new(0);
        std::thread::scope(|s| {
            for t in 0..4 {
                let (cache, p, k, admitted) = (&caches[t % 2], &p, &k, &admitted);
                s.spawn(move || {
                    for i in 0..2_000u32 {
                        let cost = if i % 2 == 0 { 1 + i % 3 } else { 1 };
                        let d = if i % 2 == 0 {
                            cache.check_ready(p, k, cost).unwrap().unwrap()
                        } else {
                            now(cache.check(p, k, cost)).unwrap()
                        };
                        if d.is_allowed() {
                            admitted.fetch_add(cost as usize, Ordering::SeqCst);
                        }
                    }
                });
            }
        });
        let used = 7 - shared.check_now(&p, &k, 0).remaining() as usize;
        assert_eq!(admitted.load(Ordering::SeqCst), used);
        assert!(used <= 7);
        assert!(caches.iter().all(|c| c.stats().local_denials > 1_000));
    }

    proptest! {
        /// Two app servers, each with its own cache, in front of one shared store: every
        /// outcome is the one the store alone would give at that instant; a local denial's wait
        /// is never longer than the store's; with one server the decisions are identical.
        #[test]
        fn caches_never_change_an_outcome(
            capacity in 1u32..6,
            interval_ms in 1u64..500,
            ops in proptest::collection::vec((0usize..2, 0u64..300, 0u32..8), 1..300),
            one_server in any::<bool>(),
        ) {
            let clock = ManualClock::new();
            let shared = Counting::new(&clock);
            let caches = [
                DenyCache::new(shared.clone()).clock(clock.clone()),
                DenyCache::new(shared.clone()).clock(clock.clone()),
            ];
            let quota = Quota::new(1, Duration::from_millis(interval_ms))
                .unwrap()
                .with_capacity(capacity)
                .unwrap();
            let p = Policy::new("p", quota).unwrap();
            let k = Key::from("k");
            let mut tat = 0u64;
            for (server, dt_ms, cost) in ops {
                clock.advance(Duration::from_micros(dt_ms * 700));
                let server = if one_server { 0 } else { server };
                let want = gcra::step(tat, clock.now_micros(), &quota, cost);
                let got = now(caches[server].check(&p, &k, cost)).unwrap();
                prop_assert_eq!(got.outcome(), want.decision.outcome());
                if one_server {
                    prop_assert_eq!(&got, &want.decision);
                }
                if let (Some(local), Some(true_wait)) =
                    (got.retry_after(), want.decision.retry_after())
                {
                    prop_assert!(local <= true_wait);
                }
                if let Some(w) = want.write {
                    tat = w;
                }
            }
        }
    }
}

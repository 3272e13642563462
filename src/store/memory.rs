//! [`MemoryStore`]: one process's limits in a sharded hash map of atomic timestamps.
//!
//! Each (policy, key) maps to one `AtomicU64` holding its TAT in microseconds. A decision takes
//! a shard read guard and runs a compare-and-swap loop on that one atomic (unless it is answered
//! from a frozen copy, below): no mutex, no allocation for a known key, and a denial writes
//! nothing. Only a new key takes a shard's write lock, once.
//!
//! The map is bounded: it never holds more than `max_keys` entries (give or take the inserts
//! under way on other threads at that instant). States that are already fresh (their TAT has
//! passed, so forgetting them changes no decision) are swept, and once the map reaches 15/16
//! of `max_keys` the entries closest to fresh are evicted, 1/16 at a time: the last 1/16 is
//! room kept for the inserts that arrive while that work is being done. A request never waits
//! for it, nor does it itself beyond a pass over at most 8,192 entries (tens of microseconds):
//! larger passes run on the store's one sweeper thread, started when the first such pass is
//! due and ended when the last clone of the store is dropped; an insert only counts itself and,
//! when a pass is due, wakes it. No cleanup task is needed. The sweeper holds each shard's lock
//! for a few microseconds (shards hold about 1,024 entries at the bound), so a decision may
//! wait that long, or, on a machine with more runnable threads than cores, for as long as the
//! sweeper is descheduled while it holds one.
//!
//! Every pass near the bound also names the next entries closest to fresh. An insert that
//! finds the map past 15/16 before the sweeper has made room evicts one of those itself (a
//! lookup and a removal, never a pass). Only if the sweeper has fallen further behind than that
//! (no named entry left, for instance when it got no CPU time for the while it takes to insert
//! 1/16 of the bound) does the map grow into the room kept; the insert that reaches `max_keys`
//! sweeps the map itself, as a last resort.
//!
//! A client denied even a request of cost 1 has a *frozen* state: with a clock that never goes
//! back ([`Clock::is_monotonic`]), nothing but a removal can change it until the clock thaws it
//! (see `frozen.rs`). Each thread remembers the frozen states it saw, so a flood from one client
//! is denied from core-local memory, with the same result the map would give, and the cores
//! serving it write no shared cache line. Resets and sweeps void every copy.

use std::borrow::Borrow;
use std::future::{Ready, ready};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError, Weak};

use dashmap::mapref::entry::Entry;

use crate::clock::{Clock, MonotonicClock};
use crate::decision::Decision;
use crate::error::{ConfigError, StoreError};
use crate::gcra;
use crate::key::Key;
use crate::store::frozen::{self, Frozen};
use crate::store::keyspace::{
    MAX_COMPOSED, Map, Plan, Removals, Sample, StoredKey, Sweep, Sweeper, Verdict, compose,
    new_map, room_target,
};
use crate::store::{Policy, PolicyRegistry, Store};
use crate::telemetry;

/// The default bound on stored keys.
pub const DEFAULT_MAX_KEYS: usize = 1_000_000;

/// Fewest new keys between two automatic sweeps.
const MIN_SWEEP_INTERVAL: usize = 4_096;

/// Named candidates an insert at the bound tries before it gives up on them (they may have
/// been charged, or removed, since they were named).
const EVICTION_TRIES: usize = 4;

/// An in-process store: exact, a shard read guard and a compare-and-swap per decision, bounded
/// in memory.
///
/// Clones share one map, so one store can back several layers (each layer's policy name keeps
/// its keys apart).
///
/// ```
/// use tollgate::{Key, MemoryStore, Policy, Quota};
///
/// let store = MemoryStore::new();
/// let policy = Policy::new("login", Quota::per_minute(5)?)?;
/// let key = Key::from("user-42");
/// for left in (0..5).rev() {
///     assert_eq!(store.check_now(&policy, &key, 1).remaining(), left);
/// }
/// assert!(!store.check_now(&policy, &key, 1).is_allowed());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone)]
pub struct MemoryStore<C: Clock = MonotonicClock> {
    inner: Arc<Inner<C>>,
}

struct Inner<C> {
    /// The first policies seen each get maps of their own, keyed by the bare client key: a
    /// decision then copies nothing. Found by name with a few pointer compares, no hashing.
    slots: [OnceLock<PolicySlot>; POLICY_SLOTS],
    /// Policies beyond the slots share these, keyed by `[name length][name][key]` (made when
    /// first needed).
    overflow: OnceLock<Maps>,
    clock: C,
    /// The bound on entries, which the store never exceeds.
    max_keys: usize,
    /// Where the sweeping aims: 1/16 below `max_keys`, so that the 1/16 inserts may overshoot
    /// it by while the sweeper catches up still fits within `max_keys` (see [`room_target`]).
    target: usize,
    /// Counts the entries and runs the passes over them, on a thread of its own.
    sweeper: Sweeper,
    /// The entries closest to fresh after those the last pass evicted, the closest last: what
    /// an insert that finds the store full evicts, one at a time.
    candidates: Mutex<Vec<Candidate>>,
    /// Frozen denials remembered per thread, for policies with a slot of their own.
    frozen: Frozen,
    /// The policies layers were built with, so that two never share a name by accident.
    registry: PolicyRegistry,
}

/// How many policies get maps of their own; more are served by the shared overflow maps.
const POLICY_SLOTS: usize = 32;
// Slots are numbered with a `u8`.
const _: () = assert!(POLICY_SLOTS <= u8::MAX as usize);

struct PolicySlot {
    name: Arc<str>,
    maps: Maps,
}

struct Maps {
    map: Map<AtomicU64>,
    /// Policies of several quotas: one TAT per quota, updated together under the shard's
    /// write lock so that the decision over all of them is atomic (made when first needed).
    multi: OnceLock<Map<Box<[u64]>>>,
}

/// Which maps an entry is in: a policy slot's (by index) or the overflow maps; the multi-quota
/// map or not.
#[derive(Debug, Clone, Copy)]
struct MapsAt {
    slot: Option<u8>,
    multi: bool,
}

/// An entry named by a pass as one of the next to evict, with its latest TAT then: it is only
/// evicted if it has not been charged since.
struct Candidate {
    at: MapsAt,
    key: StoredKey,
    tat: u64,
}

/// The latest of a multi-quota entry's TATs: it changes no decision once that has passed.
fn latest(tats: &[u64]) -> u64 {
    tats.iter().copied().max().unwrap_or(0)
}

impl Maps {
    fn new(max_keys: usize) -> Self {
        Self {
            map: new_map(max_keys),
            multi: OnceLock::new(),
        }
    }

    fn len(&self) -> usize {
        self.map.len() + self.multi.get().map_or(0, Map::len)
    }
}

impl<C> std::fmt::Debug for MemoryStore<C>
where
    C: Clock,
{
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryStore")
            .field("keys", &self.len())
            .field("max_keys", &self.inner.max_keys)
            .finish()
    }
}

impl MemoryStore {
    /// A store on the monotonic clock, bounded to [`DEFAULT_MAX_KEYS`] keys.
    pub fn new() -> Self {
        Self::build(MonotonicClock::new(), DEFAULT_MAX_KEYS)
    }

    /// A builder for `max_keys` and the clock.
    pub fn builder() -> MemoryStoreBuilder<MonotonicClock> {
        MemoryStoreBuilder {
            clock: MonotonicClock::new(),
            max_keys: DEFAULT_MAX_KEYS,
        }
    }
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

/// Configures a [`MemoryStore`].
#[derive(Debug, Clone)]
#[must_use]
pub struct MemoryStoreBuilder<C> {
    clock: C,
    max_keys: usize,
}

impl<C: Clock> MemoryStoreBuilder<C> {
    /// At most this many keys are kept (default 1,000,000), give or take the inserts of the
    /// moment on other threads. Eviction starts at 15/16 of it, so that the last 1/16 is room
    /// for the inserts that arrive while the sweeper thread makes room. See the module docs.
    pub fn max_keys(mut self, max_keys: usize) -> Self {
        self.max_keys = max_keys;
        self
    }

    /// Uses `clock` instead of the monotonic system clock (e.g. a
    /// [`ManualClock`](crate::ManualClock) in tests).
    pub fn clock<C2: Clock>(self, clock: C2) -> MemoryStoreBuilder<C2> {
        MemoryStoreBuilder {
            clock,
            max_keys: self.max_keys,
        }
    }

    /// The store.
    ///
    /// # Errors
    /// [`ConfigError::ZeroMaxKeys`] when `max_keys` is 0.
    pub fn build(self) -> Result<MemoryStore<C>, ConfigError> {
        if self.max_keys == 0 {
            return Err(ConfigError::ZeroMaxKeys);
        }
        Ok(MemoryStore::build(self.clock, self.max_keys))
    }
}

impl<C: Clock> MemoryStore<C> {
    fn build(clock: C, max_keys: usize) -> Self {
        Self {
            inner: Arc::new_cyclic(|inner: &Weak<Inner<C>>| {
                let target: Weak<dyn Sweep> = inner.clone();
                Inner {
                    slots: std::array::from_fn(|_| OnceLock::new()),
                    overflow: OnceLock::new(),
                    clock,
                    max_keys,
                    target: room_target(max_keys),
                    sweeper: Sweeper::new(MIN_SWEEP_INTERVAL, room_target(max_keys), target),
                    candidates: Mutex::new(Vec::new()),
                    frozen: Frozen::new(),
                    registry: PolicyRegistry::new(),
                }
            }),
        }
    }

    /// Decides now, synchronously. This is what [`Store::check`] does; it cannot fail.
    #[inline]
    pub fn check_now(&self, policy: &Policy, key: &Key, cost: u32) -> Decision {
        let inner = &*self.inner;
        let now = inner.clock.now_micros();
        match inner.slot(policy) {
            Some((slot, maps)) => {
                // Frozen copies only on a clock that never goes back (see the module docs).
                let slot = inner.clock.is_monotonic().then_some(slot);
                inner.decide(maps, slot, key.as_bytes(), now, policy, cost)
            }
            None => {
                let mut buf = [0u8; MAX_COMPOSED];
                let composed = compose(&mut buf, policy, key);
                inner.decide(inner.overflow(), None, composed, now, policy, cost)
            }
        }
    }

    /// Adjusts `key`'s state under `policy` now, synchronously, by `delta` units (a refund when
    /// negative, an unconditional charge when positive): what [`Store::adjust`] does, exactly
    /// [`gcra::adjust`] per quota, atomic per key (a compare-and-swap on the TAT; for several
    /// quotas, under the shard's write guard). Returns a peek of the state after it. A refund
    /// of an unknown or fresh key changes nothing and stores nothing.
    ///
    /// ```
    /// use tollgate::{Key, MemoryStore, Policy, Quota};
    ///
    /// let store = MemoryStore::new();
    /// let login = Policy::new("login", Quota::per_minute(5)?)?;
    /// let key = Key::from("alice@192.0.2.7");
    /// store.check_now(&login, &key, 1); // charged on arrival
    /// assert_eq!(store.adjust_now(&login, &key, -1).remaining(), 5); // the login succeeded
    /// assert_eq!(store.adjust_now(&login, &key, -1).remaining(), 5); // never beyond fresh
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn adjust_now(&self, policy: &Policy, key: &Key, delta: i64) -> Decision {
        let inner = &*self.inner;
        let mut buf = [0u8; MAX_COMPOSED];
        let (maps, stored) = match inner.slot(policy) {
            Some((_, maps)) => (maps, key.as_bytes()),
            None => (inner.overflow(), compose(&mut buf, policy, key)),
        };
        // A frozen state may change now: every thread's copies are void from here on (an
        // adjustment is rare next to checks, so this costs the flood path little).
        let _removal = inner.frozen.removal();
        inner.adjust(maps, stored, policy, delta)
    }

    /// How many keys are stored (entries for every policy).
    pub fn len(&self) -> usize {
        self.inner.all_maps().map(Maps::len).sum()
    }

    /// No keys are stored.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Forgets one key's state under `policy`.
    pub fn remove(&self, policy: &Policy, key: &Key) {
        let inner = &*self.inner;
        let mut buf = [0u8; MAX_COMPOSED];
        let (maps, stored) = match inner.slot(policy) {
            Some((_, maps)) => (maps, key.as_bytes()),
            None => match inner.overflow.get() {
                Some(maps) => (maps, compose(&mut buf, policy, key)),
                None => return,
            },
        };
        // Every thread's copies of this store's states are void from here on.
        let _removal = inner.frozen.removal();
        let single = maps.map.remove(stored).is_some();
        let multi = maps.multi.get().and_then(|multi| multi.remove(stored));
        inner
            .sweeper
            .removed(usize::from(single) + usize::from(multi.is_some()));
    }

    /// Removes every state that is already fresh (its TAT has passed), and if the store holds
    /// more than 15/16 of `max_keys`, evicts the entries closest to fresh until it is 1/16 below
    /// that. This runs
    /// automatically, on the store's sweeper thread; call it only to release memory at a moment
    /// of your choosing. It waits for an automatic pass under way, then makes its own.
    pub fn sweep(&self) {
        self.inner.sweep_now(true);
    }
}

/// The compare-and-swap loop on one key's TAT: the TAT and the instant the decision was made
/// on, and whether the request was charged. The caller works the decision out from those (it
/// is a pure function of them) after the shard guard is released; only the new TAT is needed
/// under it.
///
/// The clock is read after the TAT is loaded (and again after a lost race): a TAT written by a
/// charge is then never decided on with an instant older than that charge's own, so the
/// requests charged one after another see strictly decreasing `remaining` (a thread that read
/// the clock, was preempted, and charged after a later reader would otherwise report one
/// fewer).
#[inline]
fn charge<C: Clock>(
    tat: &AtomicU64,
    clock: &C,
    quota: &crate::Quota,
    cost: u32,
) -> (u64, u64, bool) {
    let mut current = tat.load(Ordering::Acquire);
    let mut now = clock.now_micros();
    loop {
        let Some(new_tat) = gcra::step(current, now, quota, cost).write else {
            return (current, now, false);
        };
        match tat.compare_exchange_weak(current, new_tat, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => return (current, now, true),
            Err(actual) => {
                current = actual;
                now = clock.now_micros();
            }
        }
    }
}

impl<C: Clock> Inner<C> {
    /// The maps of `policy`'s own slot (claiming a free one for a new policy), or `None` when
    /// every slot belongs to another policy.
    #[inline]
    fn slot(&self, policy: &Policy) -> Option<(u8, &Maps)> {
        let name = policy.name_arc();
        for (index, slot) in (0u8..).zip(&self.slots) {
            let taken = match slot.get() {
                Some(taken) => taken,
                None => slot.get_or_init(|| PolicySlot {
                    name: Arc::clone(name),
                    maps: Maps::new(self.max_keys),
                }),
            };
            if Arc::ptr_eq(&taken.name, name) || *taken.name == **name {
                return Some((index, &taken.maps));
            }
        }
        None
    }

    fn all_maps(&self) -> impl Iterator<Item = &Maps> {
        self.all_maps_at().map(|(_, maps)| maps)
    }

    /// Every policy slot's maps (with the slot's index), then the overflow maps.
    fn all_maps_at(&self) -> impl Iterator<Item = (Option<u8>, &Maps)> {
        (0u8..)
            .zip(&self.slots)
            .filter_map(|(index, slot)| slot.get().map(|s| (Some(index), &s.maps)))
            .chain(self.overflow.get().map(|maps| (None, maps)))
    }

    fn maps_at(&self, slot: Option<u8>) -> Option<&Maps> {
        match slot {
            Some(index) => self
                .slots
                .get(usize::from(index))
                .and_then(OnceLock::get)
                .map(|s| &s.maps),
            None => self.overflow.get(),
        }
    }

    fn overflow(&self) -> &Maps {
        self.overflow.get_or_init(|| Maps::new(self.max_keys))
    }

    /// One decision against `maps`, where the client's entry is spelled `stored`; `slot` is
    /// the policy's own slot, under which frozen states are remembered (`None` for the overflow
    /// maps, or when the clock might go back: no copies then).
    #[inline]
    fn decide(
        &self,
        maps: &Maps,
        slot: Option<u8>,
        stored: &[u8],
        now: u64,
        policy: &Policy,
        cost: u32,
    ) -> Decision {
        // One quota keeps a path of its own (one atomic TAT, a CAS under the shard's read
        // guard), measured against the general path of several quotas (a boxed slice of TATs
        // under the shard's write guard) on one hot key, interleaved, release build: 51-53 ns
        // against 132-137 ns per decision, 2.5-2.8x, admitted and denied alike.
        if policy.quotas().len() > 1 {
            return self.decide_multi(maps, stored, now, policy, cost);
        }
        let quota = policy.quota();
        let probe = slot.map(|slot| (slot, self.frozen.get(slot, stored, now)));
        if let Some((_, probe)) = &probe
            && let Some(tat) = probe.tat
            && frozen::is_frozen(tat, now, quota)
        {
            // Exactly what the map holds: a frozen state cannot have changed.
            return gcra::step(tat, now, quota, cost).decision;
        }
        let epoch = probe.as_ref().and_then(|_| self.frozen.epoch());
        let found = maps
            .map
            .get(stored)
            .map(|tat| charge(&tat, &self.clock, quota, cost));
        if let Some((current, now, charged)) = found {
            if !charged
                && let (Some((slot, probe)), Some(epoch)) = (&probe, epoch)
                && frozen::is_frozen(current, now, quota)
            {
                self.frozen
                    .remember(probe, *slot, stored, current, now, epoch);
            }
            return gcra::step(current, now, quota, cost).decision;
        }
        // A new key: decide against empty state first, so that denials and peeks insert nothing.
        let fresh = gcra::step(0, now, quota, cost);
        if fresh.write.is_none() {
            return fresh.decision;
        }
        let (current, now, inserted) = {
            let (tat, inserted) = match maps.map.entry(StoredKey::new(stored)) {
                // Inserted by another thread since the lookup above.
                Entry::Occupied(entry) => (entry.into_ref(), false),
                Entry::Vacant(entry) => (entry.insert(AtomicU64::new(0)), true),
            };
            let (current, now, _) = charge(&tat, &self.clock, quota, cost);
            (current, now, inserted)
        };
        if inserted {
            self.after_insert();
        }
        gcra::step(current, now, quota, cost).decision
    }

    /// One atomic decision over every quota of a multi-quota policy.
    fn decide_multi(
        &self,
        maps: &Maps,
        stored: &[u8],
        now: u64,
        policy: &Policy,
        cost: u32,
    ) -> Decision {
        let quotas = policy.quotas();
        let decide = |tats: &mut [u64]| {
            // A policy's quota count is fixed; an entry of another length cannot exist, but
            // would be treated as fresh rather than trusted.
            if tats.len() != quotas.len() {
                tats.iter_mut().for_each(|t| *t = 0);
            }
            let step = gcra::step_all(tats, now, quotas, cost);
            if let Some(writes) = &step.writes {
                tats.copy_from_slice(writes);
            }
            step.decision
        };
        let multi = maps.multi.get_or_init(|| new_map(self.max_keys));
        if let Some(mut tats) = multi.get_mut(stored) {
            return decide(&mut tats);
        }
        let fresh = vec![0u64; quotas.len()];
        let step = gcra::step_all(&fresh, now, quotas, cost);
        if step.writes.is_none() {
            return step.decision;
        }
        let (decision, inserted) = {
            let (mut tats, inserted) = match multi.entry(StoredKey::new(stored)) {
                Entry::Occupied(entry) => (entry.into_ref(), false),
                Entry::Vacant(entry) => (entry.insert(fresh.into_boxed_slice()), true),
            };
            (decide(&mut tats), inserted)
        };
        if inserted {
            self.after_insert();
        }
        decision
    }

    /// [`MemoryStore::adjust_now`] on `maps`, where the client's entry is spelled `stored`.
    fn adjust(&self, maps: &Maps, stored: &[u8], policy: &Policy, delta: i64) -> Decision {
        let quotas = policy.quotas();
        let now = self.clock.now_micros();
        if let [quota] = quotas {
            let cas = |tat: &AtomicU64| {
                let mut current = tat.load(Ordering::Acquire);
                loop {
                    let now = self.clock.now_micros();
                    let step = gcra::adjust(current, now, quota, delta);
                    let Some(new_tat) = step.write else {
                        return step.decision;
                    };
                    match tat.compare_exchange_weak(
                        current,
                        new_tat,
                        Ordering::AcqRel,
                        Ordering::Acquire,
                    ) {
                        Ok(_) => return step.decision,
                        Err(actual) => current = actual,
                    }
                }
            };
            if let Some(tat) = maps.map.get(stored) {
                return cas(&tat);
            }
            if delta <= 0 {
                return gcra::adjust(0, now, quota, delta).decision;
            }
            let (decision, inserted) = {
                let (tat, inserted) = match maps.map.entry(StoredKey::new(stored)) {
                    Entry::Occupied(entry) => (entry.into_ref(), false),
                    Entry::Vacant(entry) => (entry.insert(AtomicU64::new(0)), true),
                };
                (cas(&tat), inserted)
            };
            if inserted {
                self.after_insert();
            }
            return decision;
        }
        let apply = |tats: &mut [u64]| {
            if tats.len() != quotas.len() {
                tats.iter_mut().for_each(|t| *t = 0);
            }
            let step = gcra::adjust_all(tats, now, quotas, delta);
            if let Some(writes) = &step.writes {
                tats.copy_from_slice(writes);
            }
            step.decision
        };
        let mut fresh = vec![0u64; quotas.len()];
        if delta <= 0 {
            let Some(multi) = maps.multi.get() else {
                return apply(&mut fresh);
            };
            return match multi.get_mut(stored) {
                Some(mut tats) => apply(&mut tats),
                None => apply(&mut fresh),
            };
        }
        let multi = maps.multi.get_or_init(|| new_map(self.max_keys));
        let (decision, inserted) = {
            let (mut tats, inserted) = match multi.entry(StoredKey::new(stored)) {
                Entry::Occupied(entry) => (entry.into_ref(), false),
                Entry::Vacant(entry) => (entry.insert(fresh.into_boxed_slice()), true),
            };
            (apply(&mut tats), inserted)
        };
        if inserted {
            self.after_insert();
        }
        decision
    }

    /// After a new key landed (its shard's lock released): counts it, and if a pass is due,
    /// runs it here when the maps are small (a bounded pass, see `SMALL_PASS`), or else wakes
    /// the sweeper. Past the bound, makes room at once by evicting one named candidate; past
    /// `max_keys + max_keys / 16` with none left, sweeps here as a last resort.
    #[inline]
    fn after_insert(&self) {
        let len = self.sweeper.inserted();
        if !self.sweeper.is_due(len) {
            return;
        }
        if let Some(mut stamps) = self.sweeper.small_pass(len) {
            self.pass_locked(&mut stamps, false);
            return;
        }
        if len > self.target {
            if !self.evict_candidate() && len >= self.max_keys {
                self.sweep_now(false);
                return;
            }
            // Full: the sweeper makes room whatever the count says by the time it runs.
            self.sweeper.found_full();
        }
        self.sweeper.request();
    }

    /// Evicts the closest to fresh of the candidates the last pass named that has not been
    /// charged since; false if none is left (after a few tries).
    #[cold]
    fn evict_candidate(&self) -> bool {
        for _ in 0..EVICTION_TRIES {
            let Some(candidate) = lock(&self.candidates).pop() else {
                return false;
            };
            let Some(maps) = self.maps_at(candidate.at.slot) else {
                continue;
            };
            // Every thread's copies of this store's states are void from here on.
            let _removal = self.frozen.removal();
            let key: &[u8] = candidate.key.borrow();
            let evicted = if candidate.at.multi {
                maps.multi
                    .get()
                    .and_then(|multi| multi.remove_if(key, |_, tats| latest(tats) <= candidate.tat))
                    .is_some()
            } else {
                maps.map
                    .remove_if(key, |_, tat| tat.load(Ordering::Relaxed) <= candidate.tat)
                    .is_some()
            };
            if evicted {
                self.sweeper.removed(1);
                // A state that was not fresh yet: that client gets a fresh start.
                telemetry::add(
                    "tollgate_memory_evictions_total",
                    &[("reason", "capacity")],
                    1,
                );
                return true;
            }
        }
        false
    }

    /// One pass, now, on this thread: waits for one under way.
    fn sweep_now(&self, asked: bool) {
        let mut stamps = self.sweeper.lock_pass();
        self.pass_locked(&mut stamps, asked);
    }

    /// One pass, the pass lock held (`stamps` is its buffer).
    fn pass_locked(&self, stamps: &mut Vec<u64>, asked: bool) {
        let now = self.clock.now_micros();
        self.pass(now, stamps, asked);
        self.sweeper.passed(self.target);
    }

    /// Drops fresh states; if the maps are full, evicts the entries closest to fresh until they
    /// are 1/16 below `max_keys`. Near the bound, looks at a sample of the TATs first (a few
    /// shards' worth), to place the threshold of those and of the next entries closest to
    /// fresh, which it names as candidates for evictions to come; then visits every entry once
    /// to remove what goes (a write lock on one small shard at a time).
    fn pass(&self, now: u64, stamps: &mut Vec<u64>, asked: bool) {
        let found_full = self.sweeper.take_full();
        let plan = if Plan::needs_sample(self.sweeper.len(), self.target) {
            let len = self.all_maps().map(Maps::len).sum();
            let mut sample = Sample::new(len, now, stamps);
            for maps in self.all_maps() {
                let share = sample.share(maps.map.len());
                for entry in maps.map.iter().take(share) {
                    sample.offer(entry.value().load(Ordering::Relaxed));
                }
                if let Some(multi) = maps.multi.get() {
                    let share = sample.share(multi.len());
                    for entry in multi.iter().take(share) {
                        sample.offer(latest(entry.value()));
                    }
                }
            }
            let full = Plan::is_full(len, self.target, found_full, asked);
            sample.plan(self.target, full, self.target / 16)
        } else {
            Plan::fresh(now)
        };
        let mut named = Vec::with_capacity(plan.candidates());
        let (mut fresh, mut capacity) = (0usize, 0usize);
        {
            // Every thread's copies of this store's states are void from here until the end.
            let _removal = self.frozen.removal();
            let mut removals = Removals::new(&self.sweeper, &plan);
            for (slot, maps) in self.all_maps_at() {
                let mut judge = |key: &StoredKey, tat: u64, multi: bool| match plan.judge(tat) {
                    Verdict::Keep => true,
                    Verdict::Remove => {
                        removals.one();
                        // Fresh states: forgetting them changes no decision. The others were
                        // not fresh yet, and many of them mean `max_keys` is too small.
                        if tat <= now {
                            fresh += 1;
                        } else {
                            capacity += 1;
                        }
                        false
                    }
                    Verdict::Candidate => {
                        if named.len() < plan.candidates() {
                            let at = MapsAt { slot, multi };
                            let key = key.clone();
                            named.push(Candidate { at, key, tat });
                        }
                        true
                    }
                };
                maps.map
                    .retain(|key, tat| judge(key, tat.load(Ordering::Relaxed), false));
                if let Some(multi) = maps.multi.get() {
                    multi.retain(|key, tats| judge(key, latest(tats), true));
                }
            }
        }
        telemetry::add(
            "tollgate_memory_evictions_total",
            &[("reason", "fresh")],
            fresh,
        );
        telemetry::add(
            "tollgate_memory_evictions_total",
            &[("reason", "capacity")],
            capacity,
        );
        #[allow(clippy::cast_precision_loss)] // a gauge: exact to 2^53 keys
        telemetry::gauge_unlabelled("tollgate_memory_keys", self.sweeper.len() as f64);
        if plan.candidates() > 0 {
            // The closest to fresh last, where `pop` takes it.
            named.sort_unstable_by_key(|c| std::cmp::Reverse(c.tat));
            *lock(&self.candidates) = named;
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl<C: Clock> Sweep for Inner<C> {
    fn due(&self) -> bool {
        self.sweeper.is_due(self.sweeper.len())
    }

    fn sweep(&self) {
        self.sweep_now(false);
    }
}

impl<C: Clock> Store for MemoryStore<C> {
    type Future = Ready<Result<Decision, StoreError>>;

    #[inline]
    fn check(&self, policy: &Policy, key: &Key, cost: u32) -> Self::Future {
        ready(Ok(self.check_now(policy, key, cost)))
    }

    #[inline]
    fn check_ready(
        &self,
        policy: &Policy,
        key: &Key,
        cost: u32,
    ) -> Option<Result<Decision, StoreError>> {
        Some(Ok(self.check_now(policy, key, cost)))
    }

    /// Applied at once: the returned future is ready with the state after the adjustment.
    fn adjust(&self, policy: &Policy, key: &Key, delta: i64) -> Option<Self::Future> {
        Some(ready(Ok(self.adjust_now(policy, key, delta))))
    }

    fn reset(
        &self,
        policy: &Policy,
        key: &Key,
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        self.remove(policy, key);
        ready(Ok(()))
    }

    fn registry(&self) -> Option<&PolicyRegistry> {
        Some(&self.inner.registry)
    }

    fn name(&self) -> &'static str {
        "memory"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ManualClock, Quota};
    use std::time::Duration;

    fn store(max_keys: usize) -> (MemoryStore<ManualClock>, ManualClock) {
        let clock = ManualClock::new();
        let s = MemoryStore::builder()
            .clock(clock.clone())
            .max_keys(max_keys)
            .build()
            .unwrap();
        (s, clock)
    }

    #[test]
    fn denials_and_peeks_insert_nothing() {
        let (s, _) = store(10);
        let p = Policy::new("p", Quota::per_second(1).unwrap()).unwrap();
        assert!(s.check_now(&p, &Key::from("a"), 0).is_allowed());
        assert_eq!(s.check_now(&p, &Key::from("a"), 2).retry_after(), None);
        assert_eq!(s.len(), 0);
        s.check_now(&p, &Key::from("a"), 1);
        assert_eq!(s.len(), 1);
    }

    #[test]
    fn policies_do_not_share_state() {
        let (s, _) = store(10);
        let a = Policy::new("a", Quota::per_hour(1).unwrap()).unwrap();
        let b = Policy::new("b", Quota::per_hour(1).unwrap()).unwrap();
        let k = Key::from("k");
        assert!(s.check_now(&a, &k, 1).is_allowed());
        assert!(s.check_now(&b, &k, 1).is_allowed());
        assert!(!s.check_now(&a, &k, 1).is_allowed());
        // "a" + key "bk" must not collide with name "ab" + key "k".
        let ab = Policy::new("ab", Quota::per_hour(1).unwrap()).unwrap();
        assert!(s.check_now(&ab, &Key::from("k"), 1).is_allowed());
        assert!(s.check_now(&a, &Key::from("bk"), 1).is_allowed());
    }

    #[test]
    fn policies_beyond_the_slots_share_the_overflow_maps_safely() {
        let (s, _) = store(1_000);
        let policies: Vec<Policy> = (0..POLICY_SLOTS + 8)
            .map(|i| Policy::new(&format!("p{i}"), Quota::per_hour(1).unwrap()).unwrap())
            .collect();
        let k = Key::from("k");
        for p in &policies {
            assert!(s.check_now(p, &k, 1).is_allowed(), "{}", p.name());
        }
        for p in &policies {
            assert!(!s.check_now(p, &k, 1).is_allowed(), "{}", p.name());
        }
        assert_eq!(s.len(), POLICY_SLOTS + 8);
        // A policy built again with the same name shares its state, slot or overflow.
        for i in [0, POLICY_SLOTS + 7] {
            let again = Policy::new(&format!("p{i}"), Quota::per_hour(1).unwrap()).unwrap();
            assert!(!s.check_now(&again, &k, 1).is_allowed());
            s.remove(&again, &k);
            assert!(s.check_now(&policies[i], &k, 1).is_allowed());
        }
    }

    #[test]
    fn eviction_removes_entries_closest_to_fresh_first() {
        let (s, clock) = store(64);
        // Eviction starts past 15/16 of the bound.
        let full = room_target(64) as u64;
        assert_eq!(full, 60);
        // A quota where each charge adds a long, distinct debt: key i is charged i+1 times.
        let p = Policy::new("p", "1000/h;capacity=1000".parse().unwrap()).unwrap();
        for i in 0..full {
            for _ in 0..=i {
                s.check_now(&p, &Key::from(i), 1);
            }
        }
        assert_eq!(s.len(), full as usize);
        // One more key forces an eviction of the lightest entries.
        clock.advance(Duration::from_millis(1));
        s.check_now(&p, &Key::from(1_000u64), 1);
        assert!(
            s.len() < full as usize,
            "evicted down below 15/16, len {}",
            s.len()
        );
        let survivors: Vec<u64> = (0..full)
            .filter(|i| s.check_now(&p, &Key::from(*i), 0).remaining() < 1000)
            .collect();
        let evicted = full as usize - survivors.len();
        assert!(evicted >= 4, "evicted a batch, got {evicted}");
        // Every evicted key had less debt than every surviving one.
        assert_eq!(survivors, (evicted as u64..full).collect::<Vec<_>>());
    }

    #[test]
    fn expired_entries_are_swept_automatically() {
        let (s, clock) = store(1_000_000);
        let p = Policy::new("p", Quota::per_second(10).unwrap()).unwrap();
        for i in 0..MIN_SWEEP_INTERVAL as u64 {
            s.check_now(&p, &Key::from(i), 1);
        }
        clock.advance(Duration::from_secs(1));
        // All of those are fresh again; the next batch of inserts triggers a sweep.
        for i in 0..MIN_SWEEP_INTERVAL as u64 {
            s.check_now(&p, &Key::from(1_000_000 + i), 1);
        }
        assert!(s.len() <= MIN_SWEEP_INTERVAL, "len {}", s.len());
    }

    /// A store too large for a pass to run where it falls due: the sweeper thread runs them.
    /// Sweeping aims 1/16 below the bound. With the sweeper stalled (its pass lock held here),
    /// inserts past that target go on: each evicts one of the entries closest to fresh that the
    /// last pass named, then the store overshoots the target, still within `max_keys`; once the
    /// sweeper runs, it evicts the closest to fresh down to 1/16 below the target.
    #[test]
    fn inserts_past_the_bound_never_wait_for_the_sweeper() {
        const MAX: u64 = 16_384;
        let target = room_target(MAX as usize) as u64;
        assert_eq!(target, MAX - MAX / 16);
        let (s, clock) = store(MAX as usize);
        // Each client charged once, one microsecond after the last: the earlier, the closer
        // to fresh.
        let p = Policy::new("p", Quota::per_hour(10).unwrap()).unwrap();
        let insert = |i: u64| {
            clock.advance(Duration::from_micros(1));
            assert!(s.check_now(&p, &Key::from(i), 1).is_allowed());
        };
        let kept = |i: u64| s.check_now(&p, &Key::from(i), 0).remaining() < 10;
        for i in 0..target {
            insert(i);
        }
        s.inner.sweeper.settle();
        assert_eq!(
            s.len(),
            target as usize,
            "nothing fresh, nothing past the target"
        );
        assert!(
            s.inner.sweeper.take_thread().is_some(),
            "passes ran on the thread"
        );

        let stalled = s.inner.sweeper.lock_pass();
        let named = target / 16;
        for i in 0..named {
            insert(MAX + i);
            assert_eq!(s.len(), target as usize);
        }
        assert!(
            (0..named).all(|i| !kept(i)),
            "the named closest to fresh went"
        );
        assert!((named..target).all(kept));
        // Up to one below the bound: an insert that reaches it would sweep here.
        let over = MAX - target - 1;
        for i in 0..over {
            insert(2 * MAX + i);
        }
        assert_eq!(
            s.len(),
            (MAX - 1) as usize,
            "overshoot within the bound, no named entry left"
        );
        drop(stalled);

        s.inner.sweeper.settle();
        assert_eq!(s.len(), (target - target / 16 - 1) as usize);
        // The closest to fresh went first: what is left of the first clients is the latest.
        let cut = (0..target).find(|&i| kept(i)).unwrap_or(target);
        assert!(cut > named, "evicted beyond the named ones, cut at {cut}");
        assert!((cut..target).all(kept));
        assert!((MAX..MAX + named).chain(2 * MAX..2 * MAX + over).all(kept));
    }

    /// With no pass able to run (the sweeper stalled), the insert that reaches `max_keys`
    /// makes room itself: the store never holds more than its bound.
    #[test]
    fn the_bound_holds_when_the_sweeper_cannot_run() {
        const MAX: u64 = 16_384;
        let (s, clock) = store(MAX as usize);
        let p = Policy::new("p", Quota::per_hour(10).unwrap()).unwrap();
        let mut peak = 0;
        let stop = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|scope| {
            // The sweeper's passes are slowed by a thread that keeps taking the pass lock.
            let hog = scope.spawn(|| {
                while !stop.load(Ordering::Relaxed) {
                    let _held = s.inner.sweeper.lock_pass();
                    std::thread::yield_now();
                }
            });
            for i in 0..4 * MAX {
                clock.advance(Duration::from_micros(1));
                s.check_now(&p, &Key::from(i), 1);
                peak = peak.max(s.len());
            }
            stop.store(true, Ordering::Relaxed);
            hog.join().unwrap();
        });
        assert!(peak <= MAX as usize, "peak {peak} > max_keys {MAX}");
        assert!(
            s.len() >= (MAX / 2) as usize,
            "eviction is partial, not a wipe"
        );
    }

    #[test]
    fn the_sweeper_thread_ends_with_the_last_clone() {
        let (s, _) = store(100_000);
        let p = Policy::new("p", Quota::per_hour(1).unwrap()).unwrap();
        for i in 0..20_000u64 {
            s.check_now(&p, &Key::from(i), 1);
        }
        s.inner.sweeper.settle();
        let thread = s
            .inner
            .sweeper
            .take_thread()
            .expect("a pass ran on the thread");
        let clone = s.clone();
        drop(s);
        assert!(!thread.is_finished(), "a clone still holds the store");
        drop(clone);
        thread.join().expect("the sweeper thread ended cleanly");
    }

    proptest::proptest! {
        /// With the per-thread copies of frozen states in play, every decision is still the
        /// one the GCRA gives on the true state: a model map of TATs, stepped alike.
        #[test]
        fn frozen_copies_decide_exactly_as_the_map(
            capacity in 1u32..4,
            ops in proptest::collection::vec((0u8..3, 0u32..4, 0u64..120, 0u8..12), 1..300),
        ) {
            let (s, clock) = store(1_000);
            let quota = Quota::new(10, Duration::from_secs(1))
                .unwrap()
                .with_capacity(capacity)
                .unwrap();
            let p = Policy::new("p", quota).unwrap();
            let mut model = std::collections::HashMap::<u8, u64>::new();
            for (key, cost, advance_ms, action) in ops {
                clock.advance(Duration::from_millis(advance_ms));
                let k = Key::from(format!("client-{key}"));
                if action == 0 {
                    s.remove(&p, &k);
                    model.remove(&key);
                    continue;
                }
                let now = clock.now_micros();
                let expected = gcra::step(model.get(&key).copied().unwrap_or(0), now, &quota, cost);
                if let Some(tat) = expected.write {
                    model.insert(key, tat);
                }
                proptest::prop_assert_eq!(s.check_now(&p, &k, cost), expected.decision);
            }
        }
    }

    #[test]
    fn a_reset_voids_every_threads_copy() {
        let (s, _) = store(1_000);
        let p = Policy::new("p", Quota::per_hour(1).unwrap()).unwrap();
        let k = Key::from("flooder");
        assert!(s.check_now(&p, &k, 1).is_allowed());
        // Each thread sees the frozen state twice: once from the map, once from its copy.
        std::thread::scope(|scope| {
            for _ in 0..2 {
                scope.spawn(|| {
                    for _ in 0..2 {
                        assert!(!s.check_now(&p, &k, 1).is_allowed());
                    }
                });
            }
        });
        assert!(!s.check_now(&p, &k, 1).is_allowed());
        assert!(!s.check_now(&p, &k, 1).is_allowed());
        s.remove(&p, &k);
        assert!(
            s.check_now(&p, &k, 1).is_allowed(),
            "served from a stale copy"
        );
        // A store of its own never answers from another store's copies.
        let (other, _) = store(1_000);
        assert!(other.check_now(&p, &k, 1).is_allowed());
    }

    #[test]
    fn an_eviction_voids_the_copies_of_what_it_evicted() {
        let (s, clock) = store(64);
        let p = Policy::new("p", "1000/h;capacity=1000".parse().unwrap()).unwrap();
        // Frozen for a second, but the closest to fresh of all entries: the first evicted.
        let light = Policy::new("light", Quota::per_second(1).unwrap()).unwrap();
        let k = Key::from("light");
        assert!(s.check_now(&light, &k, 1).is_allowed());
        assert!(!s.check_now(&light, &k, 1).is_allowed());
        assert!(!s.check_now(&light, &k, 1).is_allowed()); // from this thread's copy
        // Fill the store with heavier entries (21.6 s of debt each) within 200 ms, so that the
        // light one is evicted while it is still frozen.
        for i in 0..200u64 {
            for _ in 0..=5 {
                s.check_now(&p, &Key::from(i), 1);
            }
            clock.advance(Duration::from_millis(1));
        }
        assert!(s.len() < 64);
        assert!(
            s.check_now(&light, &k, 1).is_allowed(),
            "evicted, so fresh again, not denied from a copy"
        );
    }

    #[test]
    fn a_clock_that_goes_back_never_uses_a_copy_from_its_future() {
        let (s, clock) = store(1_000);
        let p = Policy::new("p", Quota::per_second(1).unwrap()).unwrap();
        let k = Key::from("k");
        assert!(s.check_now(&p, &k, 1).is_allowed());
        clock.advance(Duration::from_millis(500));
        let d = s.check_now(&p, &k, 1); // remembered at +500 ms
        assert_eq!(d.retry_after(), Some(Duration::from_millis(500)));
        clock.rewind(Duration::from_millis(400));
        let earlier = s.check_now(&p, &k, 1);
        assert_eq!(earlier.retry_after(), Some(Duration::from_millis(900)));
    }

    #[test]
    fn a_clock_rewound_after_a_thaw_decides_from_the_map() {
        let (s, clock) = store(1_000);
        let p = Policy::new("p", Quota::per_second(1).unwrap()).unwrap();
        let k = Key::from("k");
        assert!(s.check_now(&p, &k, 1).is_allowed());
        assert!(!s.check_now(&p, &k, 1).is_allowed()); // frozen: remembered
        clock.advance(Duration::from_secs(1));
        assert!(s.check_now(&p, &k, 1).is_allowed()); // thawed: the map moves on
        clock.rewind(Duration::from_millis(500));
        // The old copy would say 0.5 s; the map says 1.5 s.
        assert_eq!(
            s.check_now(&p, &k, 1).retry_after(),
            Some(Duration::from_millis(1500))
        );
    }
}

//! What the in-process maps (the [`MemoryStore`](crate::MemoryStore) and the
//! [`DenyCache`](crate::DenyCache)) share: composed keys, their compact stored form, and the
//! bookkeeping that keeps a map bounded without making a request wait for it.
//!
//! ## Keeping a map bounded
//!
//! A pass over the whole map (drop what is stale, evict what is closest to stale if the map is
//! full) costs time in proportion to the map: tens of milliseconds at a million keys. No
//! request runs a pass over more than [`SMALL_PASS`] entries (tens of microseconds, whatever
//! the bound). Larger passes run on the owner's one sweeper thread ([`Sweeper`]), started the
//! first time one is due and holding only a [`Weak`] reference to the owner, so it ends when
//! the last clone of the store is dropped. A request that finds such a pass due only wakes it:
//! an atomic add per insert, a load, and a lock-free flag once per pass.
//!
//! The maps have many small shards ([`shard_amount`]: about 1,024 entries each at the bound),
//! so that the sweeper, which visits them one at a time, holds a shard's lock for a few
//! microseconds at most, and a shard that must grow or rehash inside an insert is small.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError, Weak};

use dashmap::DashMap;

use crate::key::Key;
use crate::store::Policy;

/// The longest composed key: name length byte, policy name, key (a hashed key is one byte
/// longer than [`Key::MAX_LEN`]).
pub(crate) const MAX_COMPOSED: usize = 1 + Policy::MAX_NAME_LEN + Key::MAX_LEN + 1;

/// `[name length][name][key]` in `buf`: injective because the name's length comes first.
#[inline]
pub(crate) fn compose<'a>(buf: &'a mut [u8; MAX_COMPOSED], policy: &Policy, key: &Key) -> &'a [u8] {
    // Both lengths are bounded by construction (`Policy::new`, `Key::new`); the clamps only
    // make that visible to the compiler, so that nothing here can panic.
    let name = policy.name().as_bytes();
    let name = &name[..name.len().min(Policy::MAX_NAME_LEN)];
    let key = key.as_bytes();
    let key = &key[..key.len().min(Key::MAX_LEN + 1)];
    let len = 1 + name.len() + key.len();
    buf[0] = name.len() as u8;
    buf[1..1 + name.len()].copy_from_slice(name);
    buf[1 + name.len()..len].copy_from_slice(key);
    &buf[..len]
}

/// A composed key as a map stores it: inline up to 22 bytes (a policy name plus an IPv4
/// address fits), so most entries need no allocation of their own; 24 bytes either way.
pub(crate) enum StoredKey {
    Inline { len: u8, bytes: [u8; STORED_INLINE] },
    Heap(Box<[u8]>),
}

const STORED_INLINE: usize = 22;

impl StoredKey {
    pub(crate) fn new(bytes: &[u8]) -> Self {
        match u8::try_from(bytes.len()) {
            Ok(len) if bytes.len() <= STORED_INLINE => {
                let mut inline = [0u8; STORED_INLINE];
                inline[..bytes.len()].copy_from_slice(bytes);
                Self::Inline { len, bytes: inline }
            }
            _ => Self::Heap(bytes.into()),
        }
    }

    #[inline]
    fn as_bytes(&self) -> &[u8] {
        match self {
            Self::Inline { len, bytes } => bytes.get(..usize::from(*len)).unwrap_or(bytes),
            Self::Heap(b) => b,
        }
    }
}

impl std::borrow::Borrow<[u8]> for StoredKey {
    fn borrow(&self) -> &[u8] {
        self.as_bytes()
    }
}

/// Hashes exactly as the `[u8]` it borrows as, which `Borrow` requires.
impl std::hash::Hash for StoredKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.as_bytes().hash(state);
    }
}

impl PartialEq for StoredKey {
    fn eq(&self, other: &Self) -> bool {
        self.as_bytes() == other.as_bytes()
    }
}

impl Eq for StoredKey {}

impl Clone for StoredKey {
    fn clone(&self) -> Self {
        match self {
            Self::Inline { len, bytes } => Self::Inline {
                len: *len,
                bytes: *bytes,
            },
            Self::Heap(b) => Self::Heap(b.clone()),
        }
    }
}

/// The map type both stores keep their entries in.
pub(crate) type Map<V> = DashMap<StoredKey, V, ahash::RandomState>;

/// Entries per shard that a map is sized for at its bound.
const SHARD_LEN: usize = 1_024;
/// Fewest and most shards per map.
const MIN_SHARDS: usize = 32;
const MAX_SHARDS: usize = 4_096;

/// Shards for a map of at most `max_keys` entries: about [`SHARD_LEN`] each when full, between
/// 32 and 4,096, a power of two (as `DashMap` requires).
pub(crate) fn shard_amount(max_keys: usize) -> usize {
    (max_keys / SHARD_LEN)
        .next_power_of_two()
        .clamp(MIN_SHARDS, MAX_SHARDS)
}

/// An empty map sized for at most `max_keys` entries.
pub(crate) fn new_map<V>(max_keys: usize) -> Map<V> {
    DashMap::with_capacity_and_hasher_and_shard_amount(
        0,
        ahash::RandomState::new(),
        shard_amount(max_keys),
    )
}

/// The most entries a pass may visit in the request that made it due, rather than on the
/// sweeper thread: tens of microseconds of work, whatever the bound. Measured on a 2-core VM,
/// a pass over 4,097 entries in 1,024 shards took 40 µs inline; on the sweeper thread it took
/// 110-160 µs and, by the cache lines it took from the inserting core, slowed a workload in
/// which every key turns fresh within microseconds (`scripts/bench-store`, allowed, 100k
/// keys) from 0.34x to 0.6-0.7x governor's time per decision.
pub(crate) const SMALL_PASS: usize = 8_192;

/// Where a store bounded to `max_keys` entries aims its sweeping: 1/16 below the bound. A pass
/// that finds the maps past it evicts down to 1/16 below it again, and inserts that arrive
/// before the sweeper thread has made room overshoot it by up to 1/16 of it, which still fits
/// within `max_keys`; only an insert that reaches `max_keys` itself sweeps, as a last resort.
pub(crate) fn room_target(max_keys: usize) -> usize {
    max_keys - max_keys / 16
}

/// The size a full map is brought down to by eviction: 1/16 below `max_keys`.
fn eviction_target(max_keys: usize) -> usize {
    max_keys.saturating_sub(max_keys / 16 + 1)
}

/// From this size on, passes also look at every live entry's time stamp, to find the entries
/// closest to fresh (7/8 of `max_keys`).
fn sampled_from(max_keys: usize) -> usize {
    max_keys - max_keys / 8
}

/// What a [`Sweeper`] runs: one pass over the maps it keeps bounded.
pub(crate) trait Sweep: Send + Sync + 'static {
    /// Whether a pass is still due: a request may be stale by the time the sweeper takes it up.
    fn due(&self) -> bool;
    /// One pass, now.
    fn sweep(&self);
}

/// Keeps maps bounded without a request ever running a large pass over them: counts their
/// entries, says when a pass is due, and runs large passes on a thread of its own.
///
/// A pass is due after as many inserts as the maps held after the last one (at least
/// `min_interval`), so its cost is amortised O(1) per insert; once the maps are near their
/// bound (7/8 of it, so that a pass has named the entries closest to fresh before the bound is
/// reached); and when an insert finds them full. The thread is started by the first request
/// and holds only a [`Weak`] reference to the maps' owner: it ends when the owner is dropped.
pub(crate) struct Sweeper {
    min_interval: usize,
    /// Entries, counted as inserts land and removals happen: the maps' size without visiting
    /// their shards.
    len: AtomicUsize,
    /// The count at which the next pass is due.
    due: AtomicUsize,
    /// An insert found the maps full since the last pass began: the next one evicts.
    full: AtomicBool,
    /// One pass at a time, automatic or asked for; the buffer its sample is kept in.
    pass: Mutex<Vec<u64>>,
    signal: Arc<Signal>,
    target: Weak<dyn Sweep>,
}

/// Between the requests and the thread.
#[derive(Default)]
struct Signal {
    /// A pass was asked for and not taken up yet: later requests cost one load.
    pending: AtomicBool,
    state: Mutex<State>,
    changed: Condvar,
}

#[derive(Default)]
struct State {
    requested: bool,
    running: bool,
    started: bool,
    closed: bool,
    /// The thread, once started (tests join it, to see it end with the maps' owner).
    thread: Option<std::thread::JoinHandle<()>>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Sweeper {
    /// For maps of at most `max_keys` entries, swept by `target` (the maps' owner).
    pub(crate) fn new(min_interval: usize, max_keys: usize, target: Weak<dyn Sweep>) -> Self {
        let sweeper = Self {
            min_interval,
            len: AtomicUsize::new(0),
            due: AtomicUsize::new(0),
            full: AtomicBool::new(false),
            pass: Mutex::new(Vec::new()),
            signal: Arc::default(),
            target,
        };
        sweeper.passed(max_keys);
        sweeper
    }

    /// The entries counted.
    #[inline]
    pub(crate) fn len(&self) -> usize {
        self.len.load(Ordering::Relaxed)
    }

    /// Counts one inserted entry; the count with it.
    #[inline]
    pub(crate) fn inserted(&self) -> usize {
        self.len.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Counts `n` removed entries.
    pub(crate) fn removed(&self, n: usize) {
        if n > 0 {
            // Saturating: a `clear` racing with inserts may have counted below the truth.
            let _ = self
                .len
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |len| {
                    Some(len.saturating_sub(n))
                });
        }
    }

    /// Whether maps of `len` entries are due for a pass.
    #[inline]
    pub(crate) fn is_due(&self, len: usize) -> bool {
        len >= self.due.load(Ordering::Relaxed)
    }

    /// Notes that an insert found the maps full: the next pass is due whatever the count, and
    /// evicts.
    pub(crate) fn found_full(&self) {
        self.full.store(true, Ordering::Relaxed);
        self.due.store(0, Ordering::Relaxed);
    }

    /// Whether an insert found the maps full since the last call (a pass begins with it).
    pub(crate) fn take_full(&self) -> bool {
        self.full.swap(false, Ordering::Relaxed)
    }

    /// Asks the sweeper thread for a pass, starting it the first time, and returns at once.
    pub(crate) fn request(&self) {
        let signal = &*self.signal;
        if signal.pending.load(Ordering::Relaxed) || signal.pending.swap(true, Ordering::AcqRel) {
            return;
        }
        let start = {
            let mut state = lock(&signal.state);
            state.requested = true;
            !std::mem::replace(&mut state.started, true)
        };
        signal.changed.notify_all();
        if start && !self.start() {
            // The system refused a thread: this caller sweeps, as the store did before it had
            // one, and the next request tries again.
            {
                let mut state = lock(&signal.state);
                state.started = false;
                state.requested = false;
            }
            signal.pending.store(false, Ordering::Release);
            if let Some(target) = self.target.upgrade() {
                target.sweep();
            }
        }
    }

    fn start(&self) -> bool {
        let signal = Arc::clone(&self.signal);
        let target = self.target.clone();
        let spawned = std::thread::Builder::new()
            .name("tollgate-sweep".into())
            .spawn(move || run(&signal, &target));
        match spawned {
            Ok(thread) => {
                lock(&self.signal.state).thread = Some(thread);
                true
            }
            Err(_) => false,
        }
    }

    /// Held for the length of a pass (a pass asked for waits for one under way); the buffer in
    /// it is the pass's to use.
    pub(crate) fn lock_pass(&self) -> MutexGuard<'_, Vec<u64>> {
        lock(&self.pass)
    }

    /// The pass lock if maps of `len` entries are small enough for the request that made a
    /// pass due to run it (see [`SMALL_PASS`]) and no pass is under way.
    pub(crate) fn small_pass(&self, len: usize) -> Option<MutexGuard<'_, Vec<u64>>> {
        if len > SMALL_PASS {
            return None;
        }
        match self.pass.try_lock() {
            Ok(guard) => Some(guard),
            Err(std::sync::TryLockError::Poisoned(poisoned)) => Some(poisoned.into_inner()),
            Err(std::sync::TryLockError::WouldBlock) => None,
        }
    }

    /// Notes that a pass ended, for maps of at most `max_keys`: when the next one is due.
    pub(crate) fn passed(&self, max_keys: usize) {
        let left = self.len();
        let sampled = sampled_from(max_keys);
        let next = if left >= sampled {
            // The next pass when an insert finds the maps full.
            max_keys.saturating_add(1)
        } else {
            left.saturating_mul(2)
                .max(left.saturating_add(self.min_interval))
                .min(sampled)
        };
        self.due.store(next.max(1), Ordering::Relaxed);
    }

    /// Forgets the counts (after the maps were cleared).
    pub(crate) fn reset(&self, max_keys: usize) {
        self.len.store(0, Ordering::Relaxed);
        self.passed(max_keys);
    }

    /// The sweeper thread's handle, if it was started.
    #[cfg(test)]
    pub(crate) fn take_thread(&self) -> Option<std::thread::JoinHandle<()>> {
        lock(&self.signal.state).thread.take()
    }

    /// Waits until no pass is asked for or under way (tests use it to see what the automatic
    /// passes did, deterministically).
    #[cfg(test)]
    pub(crate) fn settle(&self) {
        let mut state = lock(&self.signal.state);
        while state.requested || state.running {
            state = self
                .signal
                .changed
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }
}

impl Drop for Sweeper {
    fn drop(&mut self) {
        lock(&self.signal.state).closed = true;
        self.signal.changed.notify_all();
    }
}

/// The sweeper thread: one pass per request taken up, until the maps' owner is gone.
fn run(signal: &Signal, target: &Weak<dyn Sweep>) {
    loop {
        {
            let mut state = lock(&signal.state);
            while !state.requested && !state.closed {
                state = signal
                    .changed
                    .wait(state)
                    .unwrap_or_else(PoisonError::into_inner);
            }
            if state.closed {
                return;
            }
            state.requested = false;
            state.running = true;
        }
        // Requests from here on ask for another pass.
        signal.pending.store(false, Ordering::Release);
        // The owner may be dropped here, on this thread, once the pass lets go of it.
        let alive = target.upgrade().map(|target| {
            if target.due() {
                target.sweep();
            }
        });
        lock(&signal.state).running = false;
        signal.changed.notify_all();
        if alive.is_none() {
            return;
        }
    }
}

/// Counts a pass's removals into its [`Sweeper`]: near the bound one by one, so that an insert
/// meanwhile sees the room made at once, and otherwise in batches of 64 (and when dropped), so
/// that the sweeper does not write the count's cache line, which every insert writes, for
/// each entry it removes.
pub(crate) struct Removals<'a> {
    sweeper: &'a Sweeper,
    batch: usize,
    pending: usize,
}

impl<'a> Removals<'a> {
    /// For a pass with `plan`.
    pub(crate) fn new(sweeper: &'a Sweeper, plan: &Plan) -> Self {
        let near_bound = plan.evict_at.is_some() || plan.candidates_at.is_some();
        Self {
            sweeper,
            batch: if near_bound { 1 } else { 64 },
            pending: 0,
        }
    }

    #[inline]
    pub(crate) fn one(&mut self) {
        self.pending += 1;
        if self.pending >= self.batch {
            self.sweeper.removed(std::mem::take(&mut self.pending));
        }
    }
}

impl Drop for Removals<'_> {
    fn drop(&mut self) {
        self.sweeper.removed(self.pending);
    }
}

/// How many entries' time stamps a pass looks at to place its thresholds: within about a
/// tenth of a percent of the entries.
const SAMPLE: usize = 1 << 16;

/// The latest time stamps of some entries, fresh or not: the first ones a map's iterator
/// yields, which are those of its first shards. A key's shard is chosen by its hash, so they
/// are a sample of the whole map as good as a random one, and taking them costs a few shards'
/// read locks, not a visit of every entry.
pub(crate) struct Sample<'a> {
    now: u64,
    /// Entries in the maps when the sample was taken.
    len: usize,
    stamps: &'a mut Vec<u64>,
}

impl<'a> Sample<'a> {
    /// For maps of `len` entries at `now`, kept in `stamps` (cleared first).
    pub(crate) fn new(len: usize, now: u64, stamps: &'a mut Vec<u64>) -> Self {
        stamps.clear();
        Self { now, len, stamps }
    }

    /// How many entries to take from a map of `map_len` of the `len` entries: its share of
    /// the sample (all of them, even those inserted meanwhile, in maps smaller than the
    /// sample).
    pub(crate) fn share(&self, map_len: usize) -> usize {
        if self.len <= SAMPLE {
            return usize::MAX;
        }
        let share = (map_len as u128 * SAMPLE as u128).div_ceil(self.len as u128);
        usize::try_from(share).unwrap_or(map_len).min(map_len)
    }

    /// One entry, whose latest time stamp is `stamp`.
    #[inline]
    pub(crate) fn offer(&mut self, stamp: u64) {
        self.stamps.push(stamp);
    }

    /// What a pass over the maps (bounded by `max_keys`) removes, and which entries it names as
    /// up to `candidates` for evictions to come. Fresh entries always go. If the maps are
    /// `full`, the entries closest to fresh go too, down to 1/16 below the bound. The next
    /// `candidates` closest to fresh after those are named, so that an insert that finds the
    /// maps full before the next pass can evict one of them at once.
    pub(crate) fn plan(self, max_keys: usize, full: bool, candidates: usize) -> Plan {
        let Self { now, len, stamps } = self;
        // Entries inserted while the sample was taken may be in it.
        let len = len.max(stamps.len()).max(1);
        stamps.sort_unstable();
        let n = stamps.len();
        // Where `k` of the `len` entries fall in the sample.
        let scaled = |k: usize| {
            let i = (k as u128 * n as u128).div_ceil(len as u128);
            usize::try_from(i).unwrap_or(n).min(n)
        };
        let at = |i: usize| i.checked_sub(1).and_then(|i| stamps.get(i)).copied();
        let fresh = stamps.partition_point(|&t| t <= now);
        let evict = if full {
            scaled(len.saturating_sub(eviction_target(max_keys)))
        } else {
            0
        };
        let first = fresh.max(evict);
        let named = scaled(candidates).min(n - first);
        Plan {
            now,
            evict_at: at(evict).filter(|_| evict > fresh),
            candidates_at: at(first + named).filter(|_| named > 0),
            candidates: if named > 0 { candidates } else { 0 },
        }
    }
}

/// What one pass does with each entry, by its latest time stamp.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Plan {
    now: u64,
    /// Live entries at or below this are evicted (only at the bound).
    evict_at: Option<u64>,
    /// Entries above `evict_at` and at or below this are named as candidates.
    candidates_at: Option<u64>,
    candidates: usize,
}

/// What a [`Plan`] says of one entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    Keep,
    /// Keep, and name it as a candidate for eviction.
    Candidate,
    Remove,
}

impl Plan {
    /// Only what is fresh at `now` goes.
    pub(crate) fn fresh(now: u64) -> Self {
        Self {
            now,
            evict_at: None,
            candidates_at: None,
            candidates: 0,
        }
    }

    /// Whether the maps are large enough, at `len` entries of `max_keys`, for a pass to sample
    /// them first.
    pub(crate) fn needs_sample(len: usize, max_keys: usize) -> bool {
        len >= sampled_from(max_keys)
    }

    /// Whether a pass finds maps of `len` entries full, so that live entries go: past
    /// `max_keys`; or at it, when [`sweep`](crate::MemoryStore::sweep) was `asked` for; or
    /// above the eviction target when an insert `found_full` them since the last pass began
    /// (it then made room by one itself, and the count it saw may be a few ahead of `len`).
    pub(crate) fn is_full(len: usize, max_keys: usize, found_full: bool, asked: bool) -> bool {
        len > max_keys
            || (asked && len >= max_keys)
            || (found_full && len > eviction_target(max_keys))
    }

    /// How many candidates this pass may name, at most.
    pub(crate) fn candidates(&self) -> usize {
        self.candidates
    }

    #[inline]
    pub(crate) fn judge(&self, stamp: u64) -> Verdict {
        if stamp <= self.now || self.evict_at.is_some_and(|t| stamp <= t) {
            Verdict::Remove
        } else if self.candidates_at.is_some_and(|t| stamp <= t) {
            Verdict::Candidate
        } else {
            Verdict::Keep
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_hold_about_a_thousand_entries_at_the_bound() {
        assert_eq!(shard_amount(0), MIN_SHARDS);
        assert_eq!(shard_amount(10_000), MIN_SHARDS);
        assert_eq!(shard_amount(100_000), 128);
        assert_eq!(shard_amount(1_000_000), 1_024);
        assert_eq!(shard_amount(usize::MAX), MAX_SHARDS);
    }

    fn plan(stamps: &[u64], len: usize, now: u64, max_keys: usize, candidates: usize) -> Plan {
        let mut buf = Vec::new();
        let mut sample = Sample::new(len, now, &mut buf);
        stamps.iter().for_each(|&t| sample.offer(t));
        sample.plan(max_keys, len >= max_keys, candidates)
    }

    #[test]
    fn a_whole_map_sample_places_thresholds_exactly() {
        // 64 entries stamped 1..=64 at now = 10: ten are fresh.
        let stamps: Vec<u64> = (1..=64).rev().collect();
        // Below the bound: only the fresh go; the next four closest to fresh are named.
        let p = plan(&stamps, 64, 10, 100, 4);
        let verdicts: Vec<Verdict> = (1..=64).map(|t| p.judge(t)).collect();
        assert!(verdicts[..10].iter().all(|v| *v == Verdict::Remove));
        assert!(verdicts[10..14].iter().all(|v| *v == Verdict::Candidate));
        assert!(verdicts[14..].iter().all(|v| *v == Verdict::Keep));
        // At the bound of 64: down to 64 - 4 - 1 = 59, so 5 go (the fresh ones, here), and
        // the four after those are named.
        let p = plan(&stamps, 64, 0, 64, 4);
        assert_eq!(p.judge(5), Verdict::Remove);
        assert_eq!(p.judge(6), Verdict::Candidate);
        assert_eq!(p.judge(9), Verdict::Candidate);
        assert_eq!(p.judge(10), Verdict::Keep);
        // Nothing to name, nothing to evict.
        assert_eq!(plan(&stamps, 64, 0, 100, 0), Plan::fresh(0));
    }

    #[test]
    fn a_partial_sample_places_thresholds_by_proportion() {
        // Every 16th of 1,600,000 entries stamped 1..: the sample has 100,000 stamps (more
        // than SAMPLE, as if taken from more shards), spread as evenly as the whole.
        let stamps: Vec<u64> = (0..100_000u64).map(|i| 1 + i * 16).collect();
        let len = 1_600_000;
        let p = plan(&stamps, len, 0, len, 0);
        // 1/16 + 1 of them go: stamps up to about 100,001.
        let evict_at = p.evict_at.unwrap_or(0);
        assert!((100_001..=100_017).contains(&evict_at), "{evict_at}");
    }
}

//! Frozen denials, remembered per thread: how the [`MemoryStore`](crate::MemoryStore) answers a
//! client that floods it from several cores without those cores writing one shared cache line.
//!
//! A key's state is *frozen* while even a request of cost 1 would be denied: `tat - now` is
//! above `tolerance - T`. With a clock that never goes back, nothing can change a frozen state
//! (a denial writes nothing, and no request can be admitted until it thaws) except removing
//! the entry (reset, sweep, eviction). So a thread that saw the TAT of a frozen state can decide
//! the next requests of that key from its own copy, with exactly the result the map would give,
//! until the state thaws by the clock or a removal begins. Removals are bracketed by two
//! counters: a copy is only made while no removal is in flight, and it is void once another
//! removal has begun. Each thread keeps a small direct-mapped table (32 entries of 72 bytes);
//! stores are told apart by a process-unique id. (Two policies sharing one name but not one
//! quota share one state, and such copies may then report stale numbers: give each quota its
//! own policy name.)

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::quota::Quota;

/// Keys up to this long are remembered: IPv4 and grouped IPv6 addresses, most API keys (as
/// long as a [`Key`](crate::Key) kept inline).
const MAX_KEY: usize = 38;
/// Entries per thread (a power of two): few enough cache lines to stay hot while the thread
/// also walks a large map.
const ENTRIES: usize = 32;

/// The outcome of [`Frozen::get`]: where the key lives in this thread's table, and its
/// remembered TAT if that still applies.
pub(crate) struct Probe {
    /// `None` when nothing was hashed: this thread never remembered anything, or the key is too
    /// long to remember.
    at: Option<usize>,
    pub(crate) tat: Option<u64>,
}

/// One store's side of the per-thread tables: its id, and how many removals (resets, sweeps)
/// have begun and finished.
#[derive(Debug)]
#[repr(align(128))] // alone on its cache line: read on every decision, written by removals only
pub(crate) struct Frozen {
    id: u64,
    started: AtomicU64,
    finished: AtomicU64,
}

/// A removal in progress (see [`Frozen::removal`]); finished when dropped.
pub(crate) struct Removal<'a>(&'a Frozen);

impl Drop for Removal<'_> {
    fn drop(&mut self) {
        self.0.finished.fetch_add(1, Ordering::SeqCst);
    }
}

#[derive(Clone, Copy)]
struct Entry {
    store: u64,
    epoch: u64,
    tat: u64,
    /// When the state was read: a clock that went back before it voids the entry.
    seen: u64,
    slot: u8,
    len: u8,
    key: [u8; MAX_KEY],
}

impl Entry {
    /// No store has id 0, so this matches nothing.
    const EMPTY: Self = Self {
        store: 0,
        epoch: 0,
        tat: 0,
        seen: 0,
        slot: 0,
        len: 0,
        key: [0; MAX_KEY],
    };
}

// Constant-initialised and without destructors, so reaching them costs a plain thread-local
// access (no lazy registration on each use).
thread_local! {
    static TABLE: [Cell<Entry>; ENTRIES] = const { [const { Cell::new(Entry::EMPTY) }; ENTRIES] };
    /// Whether this thread ever remembered a state: until then, lookups hash nothing.
    static USED: Cell<bool> = const { Cell::new(false) };
}

/// Whether a state with `tat` is frozen at `now`: a request of cost 1 would be denied.
#[inline]
pub(crate) fn is_frozen(tat: u64, now: u64, quota: &Quota) -> bool {
    let t = quota.interval_micros();
    let tolerance = t.saturating_mul(u64::from(quota.capacity()));
    tat.saturating_sub(now) > tolerance - t.min(tolerance)
}

impl Frozen {
    pub(crate) fn new() -> Self {
        static NEXT_ID: AtomicU64 = AtomicU64::new(1);
        Self {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            started: AtomicU64::new(0),
            finished: AtomicU64::new(0),
        }
    }

    /// Call before removing entries from the map, and keep the guard until they are removed:
    /// from the start every remembered state of this store is void, and until the end none is
    /// remembered.
    pub(crate) fn removal(&self) -> Removal<'_> {
        self.started.fetch_add(1, Ordering::SeqCst);
        Removal(self)
    }

    /// Where `key` of policy `slot` is remembered on this thread, and the TAT remembered there
    /// if it still applies at `now` (the caller checks that it is still frozen).
    #[inline]
    pub(crate) fn get(&self, slot: u8, key: &[u8], now: u64) -> Probe {
        if key.len() > MAX_KEY || !USED.with(Cell::get) {
            return Probe {
                at: None,
                tat: None,
            };
        }
        let at = index(self.id, slot, key);
        let tat = TABLE.with(|table| {
            let entry = table.get(at)?.get();
            let hit = entry.store == self.id
                && entry.slot == slot
                && usize::from(entry.len) == key.len()
                && entry.key.get(..key.len()) == Some(key)
                && now >= entry.seen
                && entry.epoch == self.started.load(Ordering::SeqCst);
            hit.then_some(entry.tat)
        });
        Probe { at: Some(at), tat }
    }

    /// Remembers, where `probe` looked, that `key` of policy `slot` had the frozen state `tat`
    /// at `now`, read from the map after [`Frozen::epoch`] gave `epoch`.
    pub(crate) fn remember(
        &self,
        probe: &Probe,
        slot: u8,
        key: &[u8],
        tat: u64,
        now: u64,
        epoch: u64,
    ) {
        if key.len() > MAX_KEY {
            return;
        }
        let mut entry = Entry {
            store: self.id,
            epoch,
            tat,
            seen: now,
            slot,
            len: key.len() as u8, // at most MAX_KEY
            key: [0; MAX_KEY],
        };
        if let Some(bytes) = entry.key.get_mut(..key.len()) {
            bytes.copy_from_slice(key);
        }
        let at = probe.at.unwrap_or_else(|| index(self.id, slot, key));
        TABLE.with(|table| {
            if let Some(place) = table.get(at) {
                place.set(entry);
            }
        });
        USED.with(|used| used.set(true));
    }

    /// Read before looking a key up in the map, to remember what it finds under: `None` while a
    /// removal is in flight (nothing may be remembered then). A removal that begins after this
    /// read voids the copy.
    #[inline]
    pub(crate) fn epoch(&self) -> Option<u64> {
        let started = self.started.load(Ordering::SeqCst);
        (self.finished.load(Ordering::SeqCst) == started).then_some(started)
    }
}

/// The table index for (store, slot, key): a multiplicative hash over the key's 8-byte words.
#[inline]
fn index(store: u64, slot: u8, key: &[u8]) -> usize {
    const K: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut h = store.wrapping_mul(K) ^ u64::from(slot) ^ ((key.len() as u64) << 8);
    for chunk in key.chunks(8) {
        let mut word = [0u8; 8];
        if let Some(w) = word.get_mut(..chunk.len()) {
            w.copy_from_slice(chunk);
        }
        h = (h.rotate_left(5) ^ u64::from_le_bytes(word)).wrapping_mul(K);
    }
    (h >> (64 - ENTRIES.trailing_zeros())) as usize
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn quota(per_second: u32, capacity: u32) -> Quota {
        Quota::new(per_second, Duration::from_secs(1))
            .unwrap()
            .with_capacity(capacity)
            .unwrap()
    }

    #[test]
    fn frozen_means_even_one_unit_is_denied() {
        // T = 100 ms, capacity 3: tolerance 300 ms; frozen past tat - now > 200 ms.
        let q = quota(10, 3);
        let now = 10_000_000;
        assert!(!is_frozen(now + 200_000, now, &q));
        assert!(is_frozen(now + 200_001, now, &q));
        assert!(!is_frozen(0, now, &q));
        // Capacity 1: frozen as long as the TAT is ahead of now.
        let one = quota(1, 1);
        assert!(is_frozen(now + 1, now, &one));
        assert!(!is_frozen(now, now, &one));
    }

    #[test]
    fn remembered_per_store_slot_key_and_epoch() {
        let a = Frozen::new();
        let b = Frozen::new();
        let now = 1_000;
        let remember = |f: &Frozen, key: &[u8], tat, epoch: Option<u64>| {
            if let Some(epoch) = epoch {
                f.remember(&f.get(0, key, now), 0, key, tat, now, epoch);
            }
        };
        assert_eq!(a.get(0, b"k", now).tat, None);
        remember(&a, b"k", 42, a.epoch());
        assert_eq!(a.get(0, b"k", now).tat, Some(42));
        assert_eq!(a.get(0, b"k", now + 1).tat, Some(42));
        assert_eq!(a.get(0, b"k", now - 1).tat, None, "the clock went back");
        assert_eq!(a.get(1, b"k", now).tat, None, "another policy");
        assert_eq!(a.get(0, b"kk", now).tat, None, "another key");
        assert_eq!(b.get(0, b"k", now).tat, None, "another store");
        // Another thread has a table of its own.
        std::thread::scope(|s| {
            s.spawn(|| assert_eq!(a.get(0, b"k", now).tat, None));
        });
        let removal = a.removal();
        assert_eq!(a.get(0, b"k", now).tat, None, "void once a removal begins");
        assert_eq!(a.epoch(), None, "nothing is remembered during a removal");
        drop(removal);
        assert_eq!(a.get(0, b"k", now).tat, None, "and after it");
        // Read before a removal, remembered after it began: void from the start.
        let stale = a.epoch();
        let removal = a.removal();
        remember(&a, b"k", 7, stale);
        assert_eq!(a.get(0, b"k", now).tat, None);
        drop(removal);
        assert_eq!(a.get(0, b"k", now).tat, None);
        remember(&a, b"k", 8, a.epoch());
        assert_eq!(a.get(0, b"k", now).tat, Some(8));
        // Too long to remember.
        let long = [b'x'; MAX_KEY + 1];
        remember(&a, &long, 9, a.epoch());
        assert_eq!(a.get(0, &long, now).tat, None);
    }
}

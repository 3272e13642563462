//! What the in-process maps (the [`MemoryStore`](crate::MemoryStore) and the
//! [`DenyCache`](crate::DenyCache)) share: composed keys, their compact stored form, and the
//! bookkeeping that keeps a map bounded without a background task.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

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

/// Keeps a map bounded with work done by the inserting threads: a sweep (drop what is stale,
/// then evict what is closest to stale if still full) runs when the map may be full, and
/// otherwise after as many inserts as the map held at the last sweep, so its cost is amortised
/// O(1) per insert. One sweeper at a time; other threads carry on meanwhile.
#[derive(Debug)]
pub(crate) struct Bound {
    /// Fewest inserts between two automatic sweeps.
    min_interval: usize,
    /// Inserts since the last sweep, and the size the maps had after it: together an upper
    /// bound on their size that costs no shard locks to read.
    inserts: AtomicUsize,
    swept_len: AtomicUsize,
    sweeping: AtomicBool,
}

impl Bound {
    pub(crate) fn new(min_interval: usize) -> Self {
        Self {
            min_interval,
            inserts: AtomicUsize::new(0),
            swept_len: AtomicUsize::new(0),
            sweeping: AtomicBool::new(false),
        }
    }

    /// An upper bound on the number of entries.
    pub(crate) fn approx_len(&self) -> usize {
        self.swept_len
            .load(Ordering::Relaxed)
            .saturating_add(self.inserts.load(Ordering::Relaxed))
    }

    /// Counts one insert; true when an amortised sweep is due.
    pub(crate) fn note_insert(&self) -> bool {
        let inserted = self.inserts.fetch_add(1, Ordering::Relaxed) + 1;
        inserted
            >= self
                .swept_len
                .load(Ordering::Relaxed)
                .max(self.min_interval)
    }

    /// Runs `sweep` (which returns the entries left) unless another thread is sweeping.
    pub(crate) fn sweep(&self, sweep: impl FnOnce() -> usize) {
        if self.sweeping.swap(true, Ordering::Acquire) {
            return;
        }
        let left = sweep();
        self.swept_len.store(left, Ordering::Relaxed);
        self.inserts.store(0, Ordering::Relaxed);
        self.sweeping.store(false, Ordering::Release);
    }

    /// Forgets the counts (after the maps were cleared).
    pub(crate) fn reset(&self) {
        self.swept_len.store(0, Ordering::Relaxed);
        self.inserts.store(0, Ordering::Relaxed);
    }
}

/// For maps of `len` entries over `max_keys`: the time stamp at or below which entries must go
/// to bring them 1/16 below `max_keys`, given every entry's latest time stamp (the smallest
/// are closest to fresh). `None` when nothing needs evicting.
pub(crate) fn eviction_threshold(
    len: usize,
    max_keys: usize,
    latest: impl Iterator<Item = u64>,
) -> Option<u64> {
    if len < max_keys {
        return None;
    }
    let target = max_keys.saturating_sub(max_keys / 16 + 1);
    let excess = len - target.min(len);
    let mut stamps: Vec<u64> = latest.collect();
    if excess == 0 || excess > stamps.len() {
        return None;
    }
    let (_, threshold, _) = stamps.select_nth_unstable(excess - 1);
    Some(*threshold)
}

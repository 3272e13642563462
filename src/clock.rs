//! Clocks for the in-memory store: a monotonic system clock and a manual clock for tests.
//!
//! Time is integer microseconds since an arbitrary epoch. Stores never use wall-clock time,
//! so NTP steps and daylight-saving changes cannot admit extra requests.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// A source of "now" for a store, in microseconds since an epoch of the clock's choosing.
///
/// Implement it to drive a [`MemoryStore`](crate::MemoryStore) from your own time source.
pub trait Clock: Send + Sync + 'static {
    /// The current time in microseconds. Should not go backwards; if it does, the GCRA stays
    /// safe (it never admits extra requests), it only stops refilling until time catches up.
    fn now_micros(&self) -> u64;

    /// Whether the clock has never gone backwards. While it holds, a
    /// [`MemoryStore`](crate::MemoryStore) may answer a flooding client from per-thread copies
    /// of its denied state; a clock that might step back should keep the default, `false`.
    fn is_monotonic(&self) -> bool {
        false
    }
}

/// The system's monotonic clock, counted from the moment this clock was created.
///
/// It reads the CPU's time-stamp counter where that is reliable (through `quanta`, as governor
/// does), which costs a few nanoseconds instead of a `clock_gettime` call.
#[derive(Debug, Clone)]
pub struct MonotonicClock {
    clock: quanta::Clock,
    start: u64,
}

/// The epoch offset: a fresh clock already reads one hour, so that "time 0" (which stores use
/// to mean "no state") is never a real instant.
const EPOCH_OFFSET_MICROS: u64 = 3_600_000_000;

impl MonotonicClock {
    /// A clock whose epoch is now.
    pub fn new() -> Self {
        let clock = quanta::Clock::new();
        let start = clock.raw();
        Self { clock, start }
    }
}

impl Default for MonotonicClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for MonotonicClock {
    #[inline]
    fn now_micros(&self) -> u64 {
        // u64 nanoseconds last 584 years; the delta saturates at 0 rather than wrapping.
        let nanos = self.clock.delta_as_nanos(self.start, self.clock.raw());
        (nanos / 1_000).saturating_add(EPOCH_OFFSET_MICROS)
    }

    fn is_monotonic(&self) -> bool {
        true
    }
}

/// A clock that only moves when told to: for deterministic tests of limits and refills.
///
/// Clones share one time.
///
/// ```
/// use std::time::Duration;
/// use tollgate::{Clock, ManualClock};
///
/// let clock = ManualClock::new();
/// let t0 = clock.now_micros();
/// clock.advance(Duration::from_millis(1500));
/// assert_eq!(clock.now_micros() - t0, 1_500_000);
/// ```
#[derive(Debug, Clone)]
pub struct ManualClock {
    now: Arc<AtomicU64>,
    /// Set once the clock was ever moved backwards.
    went_back: Arc<AtomicBool>,
}

impl ManualClock {
    /// A clock reading one hour after its epoch (so that time can also be stepped backwards).
    pub fn new() -> Self {
        Self {
            now: Arc::new(AtomicU64::new(EPOCH_OFFSET_MICROS)),
            went_back: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Moves the clock forwards by `by`.
    pub fn advance(&self, by: Duration) {
        let micros = u64::try_from(by.as_micros()).unwrap_or(u64::MAX);
        let _ = self
            .now
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                Some(n.saturating_add(micros))
            });
    }

    /// Moves the clock backwards by `by` (as a badly behaved clock might), stopping at 1 µs.
    pub fn rewind(&self, by: Duration) {
        self.went_back.store(true, Ordering::SeqCst);
        let micros = u64::try_from(by.as_micros()).unwrap_or(u64::MAX);
        let _ = self
            .now
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                Some(n.saturating_sub(micros).max(1))
            });
    }

    /// Sets the clock to `at` after its epoch plus the initial hour: `set(Duration::ZERO)`
    /// returns it to where [`ManualClock::new`] started.
    pub fn set(&self, at: Duration) {
        let micros = u64::try_from(at.as_micros()).unwrap_or(u64::MAX);
        let at = micros.saturating_add(EPOCH_OFFSET_MICROS);
        if at < self.now.load(Ordering::SeqCst) {
            self.went_back.store(true, Ordering::SeqCst);
        }
        self.now.store(at, Ordering::SeqCst);
    }
}

impl Default for ManualClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for ManualClock {
    fn now_micros(&self) -> u64 {
        self.now.load(Ordering::SeqCst)
    }

    /// True until the clock is first moved backwards.
    fn is_monotonic(&self) -> bool {
        !self.went_back.load(Ordering::Relaxed)
    }
}

impl<C: Clock> Clock for Arc<C> {
    fn now_micros(&self) -> u64 {
        (**self).now_micros()
    }

    fn is_monotonic(&self) -> bool {
        (**self).is_monotonic()
    }
}

/// True at most once a second per `last` (microseconds since `started`; 0 = never).
pub(crate) fn once_a_second(last: &AtomicU64, started: Instant) -> bool {
    let now = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
    let before = last.load(Ordering::Relaxed);
    if before != 0 && now.saturating_sub(before) < 1_000_000 {
        return false;
    }
    last.compare_exchange(before, now.max(1), Ordering::Relaxed, Ordering::Relaxed)
        .is_ok()
}

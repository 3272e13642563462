//! [`CircuitBreaker`]: stops calling a failing store for a cool-down, so that the layer's
//! [`FailMode`](crate::FailMode) decides at once instead of after a timeout per request.
//!
//! A store that is down or stalled costs every request its full timeout (Redis: the command
//! timeout, 50 ms by default). The breaker counts consecutive failures (any [`StoreError`],
//! timeouts included):
//!
//! - **Closed** (normal): every check goes to the store. After `failures` consecutive failures
//!   (default 3) it **opens**.
//! - **Open**: checks fail at once with [`StoreErrorKind::CircuitOpen`], without calling the
//!   store, for `cooldown` (default 1 s). The layer's fail mode applies with no store latency.
//! - **Half-open**: after the cool-down, exactly one check (the probe) goes to the store; the
//!   others keep failing fast. A successful probe closes the breaker; a failed one re-opens it
//!   for another cool-down. So while the store stays down, at most one request per cool-down
//!   waits for it.
//!
//! The breaker does not time calls out itself: the inner store's own timeout (RedisStore's
//! command timeout) bounds the calls that do go through, so with a breaker no request waits
//! longer than that timeout, and once it is open at most one request per cool-down does.
//!
//! The state is one `AtomicU64` (no lock anywhere); [`CircuitBreaker::state`] and
//! [`CircuitBreaker::stats`] expose it for health checks. A probe whose future is dropped
//! before it completes (the client went away) hands the probe to the next request. Transitions
//! are logged as `tracing` events with target `tollgate::store` (warn on open, info on close).
//!
//! Put it around the shared store, inside a [`DenyCache`](crate::DenyCache):
//! `DenyCache::new(CircuitBreaker::new(redis_store))`, so that clients known to be over their
//! limit stay denied locally during an outage too.
//!
//! ## Example
//!
//! ```
//! use std::time::Duration;
//! use tollgate::{BreakerState, CircuitBreaker, MemoryStore, Quota, RateLimitLayer};
//! use tollgate::key::ClientIp;
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // In production the inner store is a RedisStore.
//! let store = CircuitBreaker::new(MemoryStore::new())
//!     .failures(3)
//!     .cooldown(Duration::from_secs(1));
//! assert_eq!(store.state(), BreakerState::Closed);
//! // From a "FAILURES/COOLDOWN_MS" setting:
//! let store = CircuitBreaker::new(MemoryStore::new()).config("5/250".parse()?);
//! assert_eq!(store.cooldown_duration(), Duration::from_millis(250));
//! let layer = RateLimitLayer::builder(Quota::per_minute(60)?)
//!     .key(ClientIp::new())
//!     .store(store)
//!     .build()?;
//! # let _ = layer;
//! # Ok(()) }
//! ```

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use pin_project_lite::pin_project;

use crate::clock::{Clock, MonotonicClock};
use crate::decision::Decision;
use crate::error::{ConfigError, StoreError, StoreErrorKind};
use crate::key::Key;
use crate::store::{Policy, Store};

/// The default number of consecutive failures that opens the breaker.
pub const DEFAULT_FAILURES: u32 = 3;

/// The default cool-down of an open breaker.
pub const DEFAULT_COOLDOWN: Duration = Duration::from_secs(1);

/// The state word: `CLOSED`; or an open-until time (µs, without `PROBE`); or `PROBE | start`,
/// a probe in flight since `start`.
const CLOSED: u64 = 0;
const PROBE: u64 = 1 << 63;
const TIME_MASK: u64 = PROBE - 1;

/// Where a [`CircuitBreaker`] stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
pub enum BreakerState {
    /// Checks go to the store.
    Closed,
    /// Checks fail fast with [`StoreErrorKind::CircuitOpen`] until the cool-down ends.
    Open,
    /// The cool-down is over: one probe goes (or is going) to the store; other checks fail fast.
    HalfOpen,
}

impl fmt::Display for BreakerState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Closed => "closed",
            Self::Open => "open",
            Self::HalfOpen => "half-open",
        })
    }
}

/// A snapshot of a [`CircuitBreaker`]'s state and counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct BreakerStats {
    /// The state now.
    pub state: BreakerState,
    /// Failures in a row so far (reset by any success).
    pub consecutive_failures: u32,
    /// Times the breaker opened (re-opening after a failed probe included).
    pub opened: u64,
    /// Checks failed fast without calling the store.
    pub rejected: u64,
    /// Probes sent to the store after a cool-down.
    pub probes: u64,
}

/// A circuit breaker's settings: consecutive failures that open it, and its cool-down.
///
/// Parses from `FAILURES/COOLDOWN_MS`, e.g. `"3/1000"` (the defaults). A setting such as
/// `"off"` is for the caller to handle (by not wrapping the store at all).
///
/// ```
/// use std::time::Duration;
/// use tollgate::BreakerConfig;
///
/// let config: BreakerConfig = "5/250".parse()?;
/// assert_eq!(config.failures(), 5);
/// assert_eq!(config.cooldown(), Duration::from_millis(250));
/// assert!("0/250".parse::<BreakerConfig>().is_err());
/// assert!("off".parse::<BreakerConfig>().is_err());
/// # Ok::<(), tollgate::ConfigError>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BreakerConfig {
    failures: u32,
    cooldown: Duration,
}

impl BreakerConfig {
    /// Settings opening after `failures` consecutive failures, for `cooldown`.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] when `failures` or `cooldown` is zero.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tollgate::BreakerConfig;
    ///
    /// assert!(BreakerConfig::new(3, Duration::from_secs(1)).is_ok());
    /// assert!(BreakerConfig::new(0, Duration::from_secs(1)).is_err());
    /// ```
    pub fn new(failures: u32, cooldown: Duration) -> Result<Self, ConfigError> {
        if failures == 0 {
            return Err(ConfigError::Invalid(
                "a circuit breaker needs at least 1 failure to open".to_owned(),
            ));
        }
        if cooldown.is_zero() {
            return Err(ConfigError::Invalid(
                "a circuit breaker's cool-down must be longer than zero".to_owned(),
            ));
        }
        Ok(Self { failures, cooldown })
    }

    /// Consecutive failures that open the breaker.
    pub const fn failures(&self) -> u32 {
        self.failures
    }

    /// How long the breaker stays open before a probe.
    pub const fn cooldown(&self) -> Duration {
        self.cooldown
    }
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            failures: DEFAULT_FAILURES,
            cooldown: DEFAULT_COOLDOWN,
        }
    }
}

impl fmt::Display for BreakerConfig {
    /// Formats as `FAILURES/COOLDOWN_MS`, which [`FromStr`] reads back (sub-millisecond parts
    /// are dropped).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.failures, self.cooldown.as_millis())
    }
}

impl FromStr for BreakerConfig {
    type Err = ConfigError;

    /// Parses `FAILURES/COOLDOWN_MS`, both whole numbers of at least 1.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || {
            ConfigError::Invalid(format!(
                "circuit breaker {:?} is not FAILURES/COOLDOWN_MS, e.g. 3/1000 (3 failures in a \
                 row open it for 1000 ms); both must be at least 1",
                s.chars().take(64).collect::<String>()
            ))
        };
        let (failures, cooldown) = s.trim().split_once('/').ok_or_else(bad)?;
        let failures: u32 = failures.trim().parse().map_err(|_| bad())?;
        let millis: u64 = cooldown.trim().parse().map_err(|_| bad())?;
        Self::new(failures, Duration::from_millis(millis)).map_err(|_| bad())
    }
}

/// A [`Store`] wrapper that fails fast while its store keeps failing; see the
/// [module docs](self).
///
/// Clones share one breaker state (and clone the inner store). Settings belong to the value
/// they are set on: configure before cloning.
pub struct CircuitBreaker<S, C = MonotonicClock> {
    store: S,
    enabled: bool,
    failures: u32,
    /// Microseconds, at least 1.
    cooldown: u64,
    shared: Arc<Shared<C>>,
}

struct Shared<C> {
    clock: C,
    state: AtomicU64,
    consecutive: AtomicU32,
    opened: AtomicU64,
    rejected: AtomicU64,
    probes: AtomicU64,
    /// The wrapped store's name, for metrics labels (learnt on the first check).
    store_name: std::sync::OnceLock<&'static str>,
}

impl<S> CircuitBreaker<S> {
    /// Wraps `store`: opens after 3 consecutive failures, for 1 s, on the monotonic clock.
    ///
    /// ```
    /// use tollgate::{BreakerState, CircuitBreaker, MemoryStore};
    ///
    /// let store = CircuitBreaker::new(MemoryStore::new());
    /// assert_eq!(store.state(), BreakerState::Closed);
    /// ```
    pub fn new(store: S) -> Self {
        Self {
            store,
            enabled: true,
            failures: DEFAULT_FAILURES,
            cooldown: micros(DEFAULT_COOLDOWN),
            shared: Arc::new(Shared::new(MonotonicClock::new())),
        }
    }
}

impl<S, C: Clock> CircuitBreaker<S, C> {
    /// Opens after `failures` consecutive failures (default 3; 0 counts as 1).
    #[must_use]
    pub fn failures(mut self, failures: u32) -> Self {
        self.failures = failures.max(1);
        self
    }

    /// Stays open for `cooldown` before letting one probe through (default 1 s; a zero
    /// cool-down counts as 1 µs: the next check probes, still one at a time).
    #[must_use]
    pub fn cooldown(mut self, cooldown: Duration) -> Self {
        self.cooldown = micros(cooldown).max(1);
        self
    }

    /// Turns the breaker off (`false`: every check goes straight to the store, nothing is
    /// counted, the state stays closed) or on again (the default). Lets a program keep one
    /// store type whether or not its configuration asks for a breaker.
    ///
    /// ```
    /// use tollgate::{CircuitBreaker, MemoryStore};
    ///
    /// let breaker_spec = "off";
    /// let store = CircuitBreaker::new(MemoryStore::new()).enabled(breaker_spec != "off");
    /// assert!(!store.is_enabled());
    /// ```
    #[must_use]
    pub fn enabled(mut self, enabled: bool) -> Self {
        self.enabled = enabled;
        self
    }

    /// Whether the breaker is on.
    pub fn is_enabled(&self) -> bool {
        self.enabled
    }

    /// Both settings at once, e.g. parsed from `"3/1000"`.
    #[must_use]
    pub fn config(self, config: BreakerConfig) -> Self {
        self.failures(config.failures).cooldown(config.cooldown)
    }

    /// Uses `clock` instead of the monotonic system clock (e.g. a
    /// [`ManualClock`](crate::ManualClock) in tests). Starts closed; call it before cloning.
    ///
    /// ```
    /// use tollgate::{CircuitBreaker, ManualClock, MemoryStore};
    ///
    /// let store = CircuitBreaker::new(MemoryStore::new()).clock(ManualClock::new());
    /// # let _ = store;
    /// ```
    pub fn clock<C2: Clock>(self, clock: C2) -> CircuitBreaker<S, C2> {
        CircuitBreaker {
            store: self.store,
            enabled: self.enabled,
            failures: self.failures,
            cooldown: self.cooldown,
            shared: Arc::new(Shared::new(clock)),
        }
    }

    /// The wrapped store.
    pub fn get_ref(&self) -> &S {
        &self.store
    }

    /// Consecutive failures that open the breaker.
    pub fn failure_threshold(&self) -> u32 {
        self.failures
    }

    /// How long the breaker stays open before a probe.
    pub fn cooldown_duration(&self) -> Duration {
        Duration::from_micros(self.cooldown)
    }

    /// Where the breaker stands now: for health checks.
    ///
    /// ```
    /// use tollgate::{BreakerState, CircuitBreaker, MemoryStore};
    ///
    /// let store = CircuitBreaker::new(MemoryStore::new());
    /// let healthy = store.state() == BreakerState::Closed;
    /// assert!(healthy);
    /// ```
    pub fn state(&self) -> BreakerState {
        let word = self.shared.state.load(Ordering::Acquire);
        if word == CLOSED {
            BreakerState::Closed
        } else if word & PROBE != 0 || self.shared.clock.now_micros() >= word {
            BreakerState::HalfOpen
        } else {
            BreakerState::Open
        }
    }

    /// The state and counters.
    ///
    /// ```
    /// use tollgate::{BreakerState, CircuitBreaker, MemoryStore};
    ///
    /// let stats = CircuitBreaker::new(MemoryStore::new()).stats();
    /// assert_eq!(stats.state, BreakerState::Closed);
    /// assert_eq!((stats.opened, stats.rejected, stats.probes), (0, 0, 0));
    /// ```
    pub fn stats(&self) -> BreakerStats {
        let s = &*self.shared;
        BreakerStats {
            state: self.state(),
            consecutive_failures: s.consecutive.load(Ordering::Relaxed),
            opened: s.opened.load(Ordering::Relaxed),
            rejected: s.rejected.load(Ordering::Relaxed),
            probes: s.probes.load(Ordering::Relaxed),
        }
    }

    /// Claims the probe when the cool-down is over (or the last probe is older than one
    /// cool-down, presumed lost). Returns the state word this probe owns.
    fn try_probe(&self, word: u64) -> Option<u64> {
        let s = &*self.shared;
        let now = s.clock.now_micros();
        if !self.probe_due(word, now) {
            return None;
        }
        let token = PROBE | (now & TIME_MASK);
        s.state
            .compare_exchange(word, token, Ordering::AcqRel, Ordering::Acquire)
            .ok()?;
        s.probes.fetch_add(1, Ordering::Relaxed);
        s.moved(BreakerState::HalfOpen);
        Some(token)
    }

    /// With the breaker in state `word` (not closed), whether a probe may go at `now`: the
    /// cool-down is over, or the last probe is older than a cool-down (presumed lost).
    fn probe_due(&self, word: u64, now: u64) -> bool {
        if word & PROBE != 0 {
            now >= (word & TIME_MASK).saturating_add(self.cooldown)
        } else {
            now >= word
        }
    }

    fn open_error(&self) -> StoreError {
        StoreError::new(
            StoreErrorKind::CircuitOpen,
            "the circuit breaker is open after repeated store failures; the store is not called \
             until a probe after the cool-down succeeds",
        )
    }
}

impl<C: Clock> Shared<C> {
    fn new(clock: C) -> Self {
        Self {
            clock,
            state: AtomicU64::new(CLOSED),
            consecutive: AtomicU32::new(0),
            opened: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
            probes: AtomicU64::new(0),
            store_name: std::sync::OnceLock::new(),
        }
    }

    /// Reports a change of state to metrics: `tollgate_breaker_state` (0 closed, 1 half-open,
    /// 2 open) and `tollgate_breaker_transitions_total{to}`.
    fn moved(&self, to: BreakerState) {
        let store = self.store_name.get().copied().unwrap_or("custom");
        let (value, label) = match to {
            BreakerState::Closed => (0.0, "closed"),
            BreakerState::HalfOpen => (1.0, "half_open"),
            BreakerState::Open => (2.0, "open"),
        };
        crate::telemetry::gauge("tollgate_breaker_state", store, value);
        crate::telemetry::count(
            "tollgate_breaker_transitions_total",
            &[("store", store), ("to", label)],
        );
    }

    /// Accounts for one store call's outcome.
    fn report(&self, ok: bool, role: Role, threshold: u32, cooldown: u64) {
        if ok {
            if self.consecutive.load(Ordering::Relaxed) != 0 {
                self.consecutive.store(0, Ordering::Relaxed);
            }
            if let Role::Probe(token) = role
                && self
                    .state
                    .compare_exchange(token, CLOSED, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
            {
                self.moved(BreakerState::Closed);
                tracing::info!(
                    target: "tollgate::store",
                    "circuit breaker closed: the store answered the probe"
                );
            }
            return;
        }
        let failures = self
            .consecutive
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                Some(n.saturating_add(1))
            })
            .unwrap_or(u32::MAX)
            .saturating_add(1);
        match role {
            Role::Probe(token) => self.open(token, cooldown, failures),
            Role::Normal if failures >= threshold => self.open(CLOSED, cooldown, failures),
            Role::Normal => {}
        }
    }

    /// The open-until word for a cool-down starting now (never `CLOSED`, never with `PROBE`).
    fn until(&self, cooldown: u64) -> u64 {
        self.clock
            .now_micros()
            .saturating_add(cooldown)
            .clamp(1, TIME_MASK)
    }

    /// Opens (from `from`, which is `CLOSED` or a probe's word) unless another thread moved the
    /// state first.
    fn open(&self, from: u64, cooldown: u64, failures: u32) {
        if self
            .state
            .compare_exchange(
                from,
                self.until(cooldown),
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .is_ok()
        {
            self.opened.fetch_add(1, Ordering::Relaxed);
            self.moved(BreakerState::Open);
            tracing::warn!(
                target: "tollgate::store",
                consecutive_failures = failures,
                cooldown_ms = cooldown / 1_000,
                probe = from != CLOSED,
                "circuit breaker opened: the store is not called until the cool-down ends"
            );
        }
    }
}

impl<S: Clone, C> Clone for CircuitBreaker<S, C> {
    fn clone(&self) -> Self {
        Self {
            store: self.store.clone(),
            enabled: self.enabled,
            failures: self.failures,
            cooldown: self.cooldown,
            shared: Arc::clone(&self.shared),
        }
    }
}

impl<S: fmt::Debug, C: Clock> fmt::Debug for CircuitBreaker<S, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CircuitBreaker")
            .field("store", &self.store)
            .field("enabled", &self.enabled)
            .field("failures", &self.failures)
            .field("cooldown", &self.cooldown_duration())
            .field("state", &self.state())
            .finish()
    }
}

impl<S: Store, C: Clock> Store for CircuitBreaker<S, C> {
    type Future = BreakerFuture<S::Future, C>;

    fn check(&self, policy: &Policy, key: &Key, cost: u32) -> Self::Future {
        if self.shared.store_name.get().is_none() {
            let _ = self.shared.store_name.set(self.store.name());
        }
        if !self.enabled {
            return BreakerFuture {
                state: BState::Running {
                    fut: self.store.check(policy, key, cost),
                },
                tracker: None,
            };
        }
        let word = self.shared.state.load(Ordering::Acquire);
        let role = if word == CLOSED {
            Role::Normal
        } else if let Some(token) = self.try_probe(word) {
            Role::Probe(token)
        } else {
            self.shared.rejected.fetch_add(1, Ordering::Relaxed);
            return BreakerFuture {
                state: BState::Open {
                    error: Some(self.open_error()),
                },
                tracker: None,
            };
        };
        BreakerFuture {
            state: BState::Running {
                fut: self.store.check(policy, key, cost),
            },
            tracker: Some(Tracker {
                shared: Arc::clone(&self.shared),
                failures: self.failures,
                cooldown: self.cooldown,
                role,
                done: false,
            }),
        }
    }

    /// While open, fails at once with [`StoreErrorKind::CircuitOpen`]; while closed, asks the
    /// inner store's `check_ready` and accounts for its answer. When a probe is due it returns
    /// `None`, so that the probe goes through [`Store::check`].
    fn check_ready(
        &self,
        policy: &Policy,
        key: &Key,
        cost: u32,
    ) -> Option<Result<Decision, StoreError>> {
        if !self.enabled {
            return self.store.check_ready(policy, key, cost);
        }
        let s = &*self.shared;
        let word = s.state.load(Ordering::Acquire);
        if word == CLOSED {
            let result = self.store.check_ready(policy, key, cost)?;
            s.report(result.is_ok(), Role::Normal, self.failures, self.cooldown);
            return Some(result);
        }
        if self.probe_due(word, s.clock.now_micros()) {
            return None;
        }
        s.rejected.fetch_add(1, Ordering::Relaxed);
        Some(Err(self.open_error()))
    }

    /// While closed, the inner store's adjustment, whose outcome counts towards the breaker
    /// like a check's; while open (or half-open, when only a check may probe), fails at once
    /// with [`StoreErrorKind::CircuitOpen`]: an adjustment is never sent to a store the
    /// breaker holds to be down, and never retried when it is back (the layer keeps the charge
    /// as it was made, and counts it).
    fn adjust(&self, policy: &Policy, key: &Key, delta: i64) -> Option<Self::Future> {
        if !self.enabled {
            let fut = self.store.adjust(policy, key, delta)?;
            return Some(BreakerFuture {
                state: BState::Running { fut },
                tracker: None,
            });
        }
        if self.shared.state.load(Ordering::Acquire) != CLOSED {
            self.shared.rejected.fetch_add(1, Ordering::Relaxed);
            return Some(BreakerFuture {
                state: BState::Open {
                    error: Some(self.open_error()),
                },
                tracker: None,
            });
        }
        let fut = self.store.adjust(policy, key, delta)?;
        Some(BreakerFuture {
            state: BState::Running { fut },
            tracker: Some(Tracker {
                shared: Arc::clone(&self.shared),
                failures: self.failures,
                cooldown: self.cooldown,
                role: Role::Normal,
                done: false,
            }),
        })
    }

    /// Resets through to the store, whatever the breaker's state (an operator's reset is rare
    /// and should be tried), without counting towards the breaker.
    fn reset(
        &self,
        policy: &Policy,
        key: &Key,
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        self.store.reset(policy, key)
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
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Normal,
    /// The probe owning this state word.
    Probe(u64),
}

/// Reports a store call's outcome to the breaker; a probe dropped before completing hands the
/// probe on.
struct Tracker<C> {
    shared: Arc<Shared<C>>,
    failures: u32,
    cooldown: u64,
    role: Role,
    done: bool,
}

impl<C: Clock> Tracker<C> {
    fn finish(&mut self, ok: bool) {
        self.done = true;
        self.shared
            .report(ok, self.role, self.failures, self.cooldown);
    }
}

impl<C> Drop for Tracker<C> {
    fn drop(&mut self) {
        if let (false, Role::Probe(token)) = (self.done, self.role) {
            // The probe never finished: let the next check probe at once.
            let _ =
                self.shared
                    .state
                    .compare_exchange(token, 1, Ordering::AcqRel, Ordering::Acquire);
        }
    }
}

pin_project! {
    /// The future of [`CircuitBreaker`]'s [`Store::check`]: an immediate
    /// [`StoreErrorKind::CircuitOpen`] while open, otherwise the inner store's future, whose
    /// outcome is reported to the breaker.
    pub struct BreakerFuture<F, C> {
        #[pin]
        state: BState<F>,
        tracker: Option<Tracker<C>>,
    }
}

pin_project! {
    #[project = BStateProj]
    enum BState<F> {
        Open { error: Option<StoreError> },
        Running {
            #[pin]
            fut: F,
        },
        Done,
    }
}

impl<F, C> fmt::Debug for BreakerFuture<F, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.state {
            BState::Open { .. } => "open",
            BState::Running { .. } => "running",
            BState::Done => "done",
        };
        f.debug_struct("BreakerFuture")
            .field("state", &state)
            .finish()
    }
}

impl<F, C> Future for BreakerFuture<F, C>
where
    F: Future<Output = Result<Decision, StoreError>>,
    C: Clock,
{
    type Output = Result<Decision, StoreError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let mut state = this.state;
        match state.as_mut().project() {
            BStateProj::Open { error } => {
                let error = error.take();
                state.set(BState::Done);
                match error {
                    Some(e) => Poll::Ready(Err(e)),
                    None => Poll::Pending,
                }
            }
            BStateProj::Running { fut } => {
                let result = ready!(fut.poll(cx));
                if let Some(tracker) = this.tracker {
                    tracker.finish(result.is_ok());
                }
                state.set(BState::Done);
                Poll::Ready(result)
            }
            // Polled after completion: never panic, never complete twice.
            BStateProj::Done => Poll::Pending,
        }
    }
}

/// `d` in whole microseconds, saturating below the state word's time range.
fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros())
        .unwrap_or(u64::MAX)
        .min(TIME_MASK)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ManualClock, MemoryStore, Quota};
    use std::sync::atomic::{AtomicBool, AtomicUsize};
    use std::task::Waker;

    type Boxed = Pin<Box<dyn Future<Output = Result<Decision, StoreError>> + Send>>;

    /// A store that fails, or never answers, on purpose; counts the checks reaching it.
    #[derive(Clone)]
    struct Flaky {
        inner: MemoryStore<ManualClock>,
        calls: Arc<AtomicUsize>,
        fail: Arc<AtomicBool>,
        hang: Arc<AtomicBool>,
        sync: Arc<AtomicBool>,
    }

    impl Flaky {
        fn new(clock: &ManualClock) -> Self {
            Self {
                inner: MemoryStore::builder().clock(clock.clone()).build().unwrap(),
                calls: Arc::default(),
                fail: Arc::default(),
                hang: Arc::default(),
                sync: Arc::default(),
            }
        }

        fn calls(&self) -> usize {
            self.calls.load(Ordering::SeqCst)
        }
    }

    impl Store for Flaky {
        type Future = Boxed;

        fn check(&self, policy: &Policy, key: &Key, cost: u32) -> Self::Future {
            self.calls.fetch_add(1, Ordering::SeqCst);
            if self.hang.load(Ordering::SeqCst) {
                return Box::pin(std::future::pending());
            }
            let result = if self.fail.load(Ordering::SeqCst) {
                Err(StoreError::new(StoreErrorKind::Timeout, "on purpose"))
            } else {
                Ok(self.inner.check_now(policy, key, cost))
            };
            Box::pin(std::future::ready(result))
        }

        /// Only when `sync` is on: a store that can answer at once.
        fn check_ready(
            &self,
            policy: &Policy,
            key: &Key,
            cost: u32,
        ) -> Option<Result<Decision, StoreError>> {
            if !self.sync.load(Ordering::SeqCst) {
                return None;
            }
            self.calls.fetch_add(1, Ordering::SeqCst);
            Some(if self.fail.load(Ordering::SeqCst) {
                Err(StoreError::new(StoreErrorKind::Timeout, "on purpose"))
            } else {
                Ok(self.inner.check_now(policy, key, cost))
            })
        }

        fn reset(
            &self,
            policy: &Policy,
            key: &Key,
        ) -> impl Future<Output = Result<(), StoreError>> + Send {
            self.inner.reset(policy, key)
        }
    }

    fn poll<F: Future + Unpin>(f: &mut F) -> Poll<F::Output> {
        Pin::new(f).poll(&mut Context::from_waker(Waker::noop()))
    }

    fn run<F: Future + Unpin>(mut f: F) -> F::Output {
        match poll(&mut f) {
            Poll::Ready(out) => out,
            Poll::Pending => panic!("pending"),
        }
    }

    struct Fixture {
        breaker: CircuitBreaker<Flaky, ManualClock>,
        store: Flaky,
        clock: ManualClock,
        policy: Policy,
        key: Key,
    }

    impl Fixture {
        fn new() -> Self {
            let clock = ManualClock::new();
            let store = Flaky::new(&clock);
            let breaker = CircuitBreaker::new(store.clone())
                .failures(3)
                .cooldown(Duration::from_secs(1))
                .clock(clock.clone());
            Self {
                breaker,
                store,
                clock,
                policy: Policy::new("p", Quota::per_second(1_000).unwrap()).unwrap(),
                key: Key::from("k"),
            }
        }

        fn check(&self) -> BreakerFuture<Boxed, ManualClock> {
            self.breaker.check(&self.policy, &self.key, 1)
        }

        fn fail(&self, on: bool) {
            self.store.fail.store(on, Ordering::SeqCst);
        }
    }

    #[test]
    fn opens_after_consecutive_failures_then_fails_fast_without_calling_the_store() {
        let f = Fixture::new();
        f.fail(true);
        for i in 1..=3 {
            assert_eq!(f.breaker.state(), BreakerState::Closed);
            let e = run(f.check()).unwrap_err();
            assert_eq!(e.kind(), StoreErrorKind::Timeout);
            assert_eq!(f.store.calls(), i);
        }
        assert_eq!(f.breaker.state(), BreakerState::Open);
        for _ in 0..100 {
            let e = run(f.check()).unwrap_err();
            assert_eq!(e.kind(), StoreErrorKind::CircuitOpen);
        }
        assert_eq!(f.store.calls(), 3);
        let stats = f.breaker.stats();
        assert_eq!((stats.opened, stats.rejected, stats.probes), (1, 100, 0));
        assert_eq!(stats.consecutive_failures, 3);
    }

    #[test]
    fn a_success_resets_the_count() {
        let f = Fixture::new();
        for _ in 0..10 {
            f.fail(true);
            run(f.check()).unwrap_err();
            run(f.check()).unwrap_err();
            f.fail(false);
            run(f.check()).unwrap();
        }
        assert_eq!(f.breaker.state(), BreakerState::Closed);
        assert_eq!(f.store.calls(), 30);
    }

    #[test]
    fn exactly_one_probe_after_the_cooldown_and_success_closes() {
        let f = Fixture::new();
        f.fail(true);
        for _ in 0..3 {
            run(f.check()).unwrap_err();
        }
        f.clock.advance(Duration::from_millis(999));
        assert_eq!(f.breaker.state(), BreakerState::Open);
        run(f.check()).unwrap_err();
        assert_eq!(f.store.calls(), 3);
        f.clock.advance(Duration::from_millis(1));
        assert_eq!(f.breaker.state(), BreakerState::HalfOpen);
        f.fail(false);
        // The probe is claimed when the check starts; others fail fast meanwhile.
        let probe = f.check();
        for _ in 0..10 {
            let e = run(f.check()).unwrap_err();
            assert_eq!(e.kind(), StoreErrorKind::CircuitOpen);
        }
        assert_eq!(f.store.calls(), 4);
        assert_eq!(f.breaker.state(), BreakerState::HalfOpen);
        assert!(run(probe).unwrap().is_allowed());
        assert_eq!(f.breaker.state(), BreakerState::Closed);
        assert_eq!(f.breaker.stats().consecutive_failures, 0);
        for _ in 0..5 {
            run(f.check()).unwrap();
        }
        assert_eq!(f.store.calls(), 9);
    }

    #[test]
    fn a_failed_probe_reopens_for_another_cooldown() {
        let f = Fixture::new();
        f.fail(true);
        for _ in 0..3 {
            run(f.check()).unwrap_err();
        }
        for round in 1..=5 {
            f.clock.advance(Duration::from_secs(1));
            let e = run(f.check()).unwrap_err();
            assert_eq!(
                e.kind(),
                StoreErrorKind::Timeout,
                "round {round}: the probe"
            );
            assert_eq!(f.breaker.state(), BreakerState::Open);
            f.clock.advance(Duration::from_millis(500));
            run(f.check()).unwrap_err();
            assert_eq!(f.store.calls(), 3 + round);
            f.clock.rewind(Duration::from_millis(500));
        }
        assert_eq!(f.breaker.stats().opened, 6);
        assert_eq!(f.breaker.stats().probes, 5);
    }

    #[test]
    fn a_dropped_probe_hands_the_probe_to_the_next_check() {
        let f = Fixture::new();
        f.fail(true);
        for _ in 0..3 {
            run(f.check()).unwrap_err();
        }
        f.clock.advance(Duration::from_secs(1));
        f.store.hang.store(true, Ordering::SeqCst);
        let mut probe = f.check();
        assert!(poll(&mut probe).is_pending());
        run(f.check()).unwrap_err();
        assert_eq!(f.store.calls(), 4);
        drop(probe);
        f.store.hang.store(false, Ordering::SeqCst);
        f.fail(false);
        run(f.check()).unwrap();
        assert_eq!(f.breaker.state(), BreakerState::Closed);
        assert_eq!(f.store.calls(), 5);
    }

    #[test]
    fn a_probe_that_never_answers_is_replaced_after_a_cooldown() {
        let f = Fixture::new();
        f.fail(true);
        for _ in 0..3 {
            run(f.check()).unwrap_err();
        }
        f.clock.advance(Duration::from_secs(1));
        f.store.hang.store(true, Ordering::SeqCst);
        let mut stuck = f.check();
        assert!(poll(&mut stuck).is_pending());
        f.clock.advance(Duration::from_millis(999));
        run(f.check()).unwrap_err();
        assert_eq!(f.store.calls(), 4);
        f.clock.advance(Duration::from_millis(1));
        f.store.hang.store(false, Ordering::SeqCst);
        f.fail(false);
        run(f.check()).unwrap();
        assert_eq!(f.breaker.state(), BreakerState::Closed);
        // The stale probe finishing later changes nothing.
        drop(stuck);
        assert_eq!(f.breaker.state(), BreakerState::Closed);
    }

    #[test]
    fn concurrent_checks_after_the_cooldown_send_one_probe() {
        let f = Fixture::new();
        f.fail(true);
        for _ in 0..3 {
            run(f.check()).unwrap_err();
        }
        f.clock.advance(Duration::from_secs(1));
        f.store.hang.store(true, Ordering::SeqCst);
        let barrier = std::sync::Barrier::new(4);
        let pending = AtomicUsize::new(0);
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    barrier.wait();
                    for _ in 0..1_000 {
                        let mut fut = f.check();
                        if poll(&mut fut).is_pending() {
                            pending.fetch_add(1, Ordering::SeqCst);
                            // Keep the probe alive: dropping it would hand the probe on.
                            std::mem::forget(fut);
                        }
                    }
                });
            }
        });
        assert_eq!(pending.load(Ordering::SeqCst), 1);
        assert_eq!(f.store.calls(), 4);
    }

    /// The synchronous path (what the layer tries first): open answers at once, closed asks
    /// the store's own `check_ready` and counts, a due probe defers to `check`.
    #[test]
    fn check_ready_follows_the_same_states() {
        let f = Fixture::new();
        let ready = || f.breaker.check_ready(&f.policy, &f.key, 1);
        // An asynchronous store: nothing to say at once while closed.
        assert!(ready().is_none());
        f.store.sync.store(true, Ordering::SeqCst);
        assert!(ready().unwrap().unwrap().is_allowed());
        f.fail(true);
        for _ in 0..3 {
            assert_eq!(
                ready().unwrap().unwrap_err().kind(),
                StoreErrorKind::Timeout
            );
        }
        assert_eq!(f.breaker.state(), BreakerState::Open);
        for _ in 0..10 {
            assert_eq!(
                ready().unwrap().unwrap_err().kind(),
                StoreErrorKind::CircuitOpen
            );
        }
        assert_eq!(f.store.calls(), 4);
        f.clock.advance(Duration::from_secs(1));
        assert!(ready().is_none(), "a due probe goes through check()");
        f.fail(false);
        assert!(run(f.check()).unwrap().is_allowed());
        assert_eq!(f.breaker.state(), BreakerState::Closed);
        assert!(ready().unwrap().unwrap().is_allowed());
        assert_eq!(f.store.calls(), 6);
    }

    #[test]
    fn a_disabled_breaker_never_opens() {
        let f = Fixture::new();
        let off = f.breaker.clone().enabled(false);
        f.fail(true);
        for _ in 0..10 {
            let e = run(off.check(&f.policy, &f.key, 1)).unwrap_err();
            assert_eq!(e.kind(), StoreErrorKind::Timeout);
        }
        assert_eq!(f.store.calls(), 10);
        assert_eq!(off.state(), BreakerState::Closed);
        assert_eq!(off.stats().consecutive_failures, 0);
    }

    #[test]
    fn config_parses_failures_slash_millis() {
        let c: BreakerConfig = "3/1000".parse().unwrap();
        assert_eq!(c, BreakerConfig::default());
        assert_eq!(c.to_string(), "3/1000");
        let c: BreakerConfig = " 10 / 50 ".parse().unwrap();
        assert_eq!(
            (c.failures(), c.cooldown()),
            (10, Duration::from_millis(50))
        );
        for bad in [
            "",
            "off",
            "3",
            "/",
            "3/",
            "/1000",
            "0/1000",
            "3/0",
            "-1/5",
            "3/1.5",
            "3/1000/2",
            "99999999999/1",
        ] {
            let e = bad.parse::<BreakerConfig>().unwrap_err();
            assert!(
                e.to_string().contains("FAILURES/COOLDOWN_MS"),
                "{bad:?}: {e}"
            );
        }
        let b = CircuitBreaker::new(()).config("7/20".parse().unwrap());
        assert_eq!(b.failure_threshold(), 7);
        assert_eq!(b.cooldown_duration(), Duration::from_millis(20));
        let b = CircuitBreaker::new(()).failures(0).cooldown(Duration::ZERO);
        assert_eq!(b.failure_threshold(), 1);
        assert_eq!(b.cooldown_duration(), Duration::from_micros(1));
        let huge = CircuitBreaker::new(()).cooldown(Duration::MAX);
        assert!(huge.cooldown_duration() > Duration::from_secs(100 * 365 * 86_400));
    }
}

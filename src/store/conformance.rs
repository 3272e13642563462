//! A conformance kit for [`Store`]s (feature `test-util`): the checks every tollgate store
//! passes, to run against a store of your own.
//!
//! The kit replays the GCRA test vectors at chosen instants and checks every number of every
//! [`Decision`] against one table, the same one the built-in stores are tested with:
//!
//! | case | what it checks |
//! |---|---|
//! | [`gcra_vectors`] | vectors V1-V4: one quota, costs 0 to 11, denials, refills, impossible requests |
//! | [`multi_quota_vector`] | vector M1: a policy of two quotas admits only if both do, a denial charges neither |
//! | [`peek`] | cost 0 and [`Store::peek`] report without charging, and are never denied |
//! | [`atomicity`] | 200 concurrent checks on one key (`T` = 1 h, capacity 5) admit exactly 5, each remaining 4..0 once |
//! | [`reset`] | after [`Store::reset`] the key is fresh; other keys and other policies keep their state |
//!
//! [`run_all`] runs them all and returns the first difference as a [`Failure`] naming the case,
//! the vector, the row, what was expected and what the store answered.
//!
//! The vectors need a store whose clock the test controls: that is the [`Harness`] you
//! implement (or take ready-made: [`ManualClockHarness`] for any store on a
//! [`ManualClock`], `RedisHarness` with feature `redis`). The other cases use the store's own
//! clock through [`Store::check`], [`Store::peek`] and [`Store::reset`], with quotas of one
//! hour, so real time passing during the run changes nothing. Every vector and case runs on keys
//! of its own (a random per-process part and a counter), so the kit can run any number of times
//! on one store, also one that outlives the process (Redis).
//!
//! ```
//! use tollgate::{ManualClock, MemoryStore};
//! use tollgate::store::conformance::{self, ManualClockHarness};
//!
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
//! let clock = ManualClock::new();
//! let store = MemoryStore::builder().clock(clock.clone()).build()?;
//! let mut harness = ManualClockHarness::new(store, clock);
//! conformance::run_all(&mut harness).await?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! # }).unwrap();
//! ```

use std::fmt;
use std::future::Future;
use std::hash::BuildHasher;
use std::pin::Pin;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::Poll;
use std::time::Duration;

use crate::clock::{Clock, ManualClock};
use crate::decision::{Decision, Outcome};
use crate::error::StoreError;
use crate::key::Key;
use crate::quota::Quota;
use crate::store::{Policy, Store};

/// Drives a store at instants the kit chooses.
///
/// `now_micros` is microseconds on the store's clock. The kit's instants never decrease within
/// one process: they start at [`FIRST_INSTANT`] (a realistic Unix time, so Redis Lua
/// numbers are as large as in production) and each vector starts 1,000 s after the previous
/// one. A harness may pass them on as they are (a script argument, a manual clock set to them)
/// or shift them onto its own clock, as long as it keeps the differences exact.
pub trait Harness: Send {
    /// The store under test.
    type Store: Store;

    /// The store, for the cases that run on its own clock ([`Store::check`], [`Store::peek`],
    /// [`Store::reset`]).
    fn store(&self) -> &Self::Store;

    /// Decides as [`Store::check`] does, for `cost` units of `key` under `policy`, with the
    /// store's clock reading `now_micros`.
    fn check_at(
        &mut self,
        policy: &Policy,
        key: &Key,
        cost: u32,
        now_micros: u64,
    ) -> impl Future<Output = Result<Decision, StoreError>> + Send;
}

/// The first instant the kit passes to [`Harness::check_at`] in a process (2026-09-21 in Unix
/// microseconds); later ones are larger.
pub const FIRST_INSTANT: u64 = 1_790_000_000_000_000;

/// Time between the starts of two vectors: far longer than any vector, well below 2^53 µs
/// after millions of vectors.
const VECTOR_STRIDE: u64 = 1_000_000_000;

/// A [`Harness`] for any store whose clock is a [`ManualClock`]: it moves the clock to each
/// instant, then calls [`Store::check`].
///
/// Give it the same clock the store (and every wrapper, such as a
/// [`DenyCache`](crate::DenyCache) or [`CircuitBreaker`](crate::CircuitBreaker)) was built with.
#[derive(Debug, Clone)]
pub struct ManualClockHarness<S> {
    store: S,
    clock: ManualClock,
}

impl<S: Store> ManualClockHarness<S> {
    /// A harness for `store`, which reads `clock`.
    pub fn new(store: S, clock: ManualClock) -> Self {
        Self { store, clock }
    }

    /// The clock.
    pub fn clock(&self) -> &ManualClock {
        &self.clock
    }

    /// The store, given back.
    pub fn into_inner(self) -> S {
        self.store
    }
}

impl<S: Store> Harness for ManualClockHarness<S> {
    type Store = S;

    fn store(&self) -> &S {
        &self.store
    }

    fn check_at(
        &mut self,
        policy: &Policy,
        key: &Key,
        cost: u32,
        now_micros: u64,
    ) -> impl Future<Output = Result<Decision, StoreError>> + Send {
        let current = self.clock.now_micros();
        if now_micros > current {
            self.clock
                .advance(Duration::from_micros(now_micros - current));
        } else if now_micros < current {
            self.clock
                .rewind(Duration::from_micros(current - now_micros));
        }
        self.store.check(policy, key, cost)
    }
}

/// A [`Harness`] for [`RedisStore`](crate::RedisStore), through its test-only
/// [`check_at`](crate::RedisStore::check_at) (the instant is sent to the script in place of the
/// Redis server's `TIME`).
#[cfg(feature = "redis")]
#[derive(Debug, Clone)]
pub struct RedisHarness {
    store: crate::RedisStore,
}

#[cfg(feature = "redis")]
impl RedisHarness {
    /// A harness for `store`.
    pub fn new(store: crate::RedisStore) -> Self {
        Self { store }
    }
}

#[cfg(feature = "redis")]
impl Harness for RedisHarness {
    type Store = crate::RedisStore;

    fn store(&self) -> &crate::RedisStore {
        &self.store
    }

    fn check_at(
        &mut self,
        policy: &Policy,
        key: &Key,
        cost: u32,
        now_micros: u64,
    ) -> impl Future<Output = Result<Decision, StoreError>> + Send {
        self.store.check_at(policy, key, cost, now_micros)
    }
}

/// A store that answered differently from the GCRA, or failed: which case, vector and row,
/// what was expected and what the store answered.
#[derive(Debug, Clone, thiserror::Error)]
#[error(transparent)]
pub struct Failure(Box<Details>);

#[derive(Debug, Clone, thiserror::Error)]
#[error(
    "conformance case `{case}`, {vector} row {row} ({request}): {what}: expected {expected}, got \
     {got}{detail}"
)]
struct Details {
    case: &'static str,
    vector: &'static str,
    row: usize,
    request: String,
    what: &'static str,
    expected: String,
    got: String,
    /// `; decision: ...` when there is one.
    detail: String,
    #[source]
    source: Option<StoreError>,
}

impl Failure {
    /// The case: `vectors`, `multi-quota`, `peek`, `atomicity` or `reset`.
    pub fn case(&self) -> &'static str {
        self.0.case
    }

    /// The vector (`V1`..`V4`, `M1`) or the part of the case that failed.
    pub fn vector(&self) -> &'static str {
        self.0.vector
    }

    /// The row (request) of the vector, from 0.
    pub fn row(&self) -> usize {
        self.0.row
    }

    /// What differed: `outcome`, `remaining`, `retry_after`, ... or `the store's answer` when
    /// the store failed (the [`StoreError`] is then the [`source`](std::error::Error::source)).
    pub fn what(&self) -> &'static str {
        self.0.what
    }

    /// The expected value.
    pub fn expected(&self) -> &str {
        &self.0.expected
    }

    /// What the store answered.
    pub fn got(&self) -> &str {
        &self.0.got
    }
}

/// Where in the kit a check is made.
struct At {
    case: &'static str,
    vector: &'static str,
    row: usize,
    request: String,
}

impl At {
    fn new(case: &'static str, vector: &'static str, row: usize, request: String) -> Self {
        Self {
            case,
            vector,
            row,
            request,
        }
    }

    fn details(&self, what: &'static str, expected: String, got: String) -> Details {
        Details {
            case: self.case,
            vector: self.vector,
            row: self.row,
            request: self.request.clone(),
            what,
            expected,
            got,
            detail: String::new(),
            source: None,
        }
    }

    fn failure(&self, what: &'static str, expected: String, got: String) -> Failure {
        Failure(Box::new(self.details(what, expected, got)))
    }

    fn store_error(&self, e: StoreError) -> Failure {
        Failure(Box::new(Details {
            got: format!("the error \"{e}\""),
            source: Some(e),
            ..self.details("the store's answer", "a decision".into(), String::new())
        }))
    }

    fn eq<T: PartialEq + fmt::Debug>(
        &self,
        what: &'static str,
        expected: T,
        got: T,
        decision: &Decision,
    ) -> Result<(), Failure> {
        if expected == got {
            return Ok(());
        }
        Err(Failure(Box::new(Details {
            detail: format!("; decision: {decision:?}"),
            ..self.details(what, format!("{expected:?}"), format!("{got:?}"))
        })))
    }

    fn answer<T>(&self, answer: Result<T, StoreError>) -> Result<T, Failure> {
        answer.map_err(|e| self.store_error(e))
    }
}

/// A key no earlier run used: a random per-process part, a counter and the case.
fn fresh_key(case: &str) -> Key {
    static RUN: OnceLock<u64> = OnceLock::new();
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let run = *RUN.get_or_init(|| std::collections::hash_map::RandomState::new().hash_one(0u8));
    let seq = SEQ.fetch_add(1, Ordering::Relaxed);
    Key::from(format!("tollgate-conformance:{run:016x}:{seq}:{case}"))
}

/// The start of the next vector, later than every instant the kit used before.
fn next_origin() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(FIRST_INSTANT);
    NEXT.fetch_add(VECTOR_STRIDE, Ordering::Relaxed)
}

fn quota(s: &str) -> Quota {
    s.parse()
        .expect("the conformance kit's quotas are valid (tested)")
}

fn policy(name: &str, quotas: &[&str]) -> Policy {
    Policy::multi(name, quotas.iter().map(|q| quota(q)))
        .expect("the conformance kit's policies are valid (tested)")
}

const A: Outcome = Outcome::Allowed;
const D: Outcome = Outcome::Denied;
const I: Outcome = Outcome::Impossible;

/// One request of a vector and what the store must answer.
#[derive(Debug, Clone, Copy)]
struct Row {
    /// Milliseconds since the vector's start.
    t_ms: u64,
    cost: u32,
    outcome: Outcome,
    remaining: u32,
    /// `None`: not checked by this row.
    reset_ms: Option<u64>,
    /// For denials: the retry_after in ms; `None` (checked) for allowed and impossible requests.
    retry_ms: Option<u64>,
    /// Time until one more unit is available (the `t` of the RateLimit field), when given.
    next_ms: Option<u64>,
}

const fn row(t_ms: u64, cost: u32, outcome: Outcome, remaining: u32) -> Row {
    Row {
        t_ms,
        cost,
        outcome,
        remaining,
        reset_ms: None,
        retry_ms: None,
        next_ms: None,
    }
}

impl Row {
    const fn reset(mut self, ms: u64) -> Self {
        self.reset_ms = Some(ms);
        self
    }
    const fn retry(mut self, ms: u64) -> Self {
        self.retry_ms = Some(ms);
        self
    }
    const fn next(mut self, ms: u64) -> Self {
        self.next_ms = Some(ms);
        self
    }
}

struct Vector {
    name: &'static str,
    quota: &'static str,
    rows: &'static [Row],
}

/// The GCRA test vectors V1-V4.
const VECTORS: [Vector; 4] = [
    Vector {
        name: "V1",
        quota: "5/5s",
        rows: &[
            row(0, 6, I, 5).reset(0).next(0),
            row(0, 1, A, 4).reset(1000).next(1000),
            row(0, 1, A, 3).reset(2000).next(1000),
            row(0, 1, A, 2).reset(3000).next(1000),
            row(0, 1, A, 1).reset(4000).next(1000),
            row(0, 1, A, 0).reset(5000).next(1000),
            row(0, 1, D, 0).reset(5000).retry(1000).next(1000),
            row(3000, 1, A, 2).reset(3000).next(1000),
            row(3100, 1, A, 1).reset(3900).next(900),
            row(4000, 1, A, 1).reset(4000).next(1000),
            row(8000, 1, A, 4).reset(1000).next(1000),
            row(9500, 1, A, 4).reset(1000).next(1000),
            row(9500, 0, A, 4).reset(1000).next(1000),
            row(9500, 2, A, 2).reset(3000).next(1000),
            row(9500, 5, D, 2).reset(3000).retry(3000).next(1000),
            row(20000, 1, A, 4).reset(1000),
        ],
    },
    Vector {
        name: "V2",
        quota: "5/s",
        rows: &[
            row(0, 1, A, 4),
            row(0, 1, A, 3),
            row(0, 1, A, 2),
            row(0, 1, A, 1),
            row(0, 1, A, 0),
            row(0, 1, D, 0).retry(200),
            row(150, 1, D, 0).retry(50),
            row(200, 1, A, 0),
            row(201, 1, D, 0).retry(199),
            row(1000, 1, A, 3),
            row(2000, 1, A, 4),
        ],
    },
    Vector {
        name: "V3",
        quota: "1/s",
        rows: &[
            row(0, 1, A, 0),
            row(0, 1, D, 0).retry(1000),
            row(500, 1, D, 0).retry(500),
            row(999, 1, D, 0).retry(1),
            row(1000, 1, A, 0),
            row(1500, 1, D, 0).retry(500),
            row(2500, 1, A, 0),
        ],
    },
    Vector {
        name: "V4",
        quota: "10/s",
        rows: &[
            row(0, 3, A, 7).reset(300),
            row(0, 7, A, 0).reset(1000),
            row(0, 1, D, 0).retry(100),
            row(50, 1, D, 0).retry(50),
            row(100, 1, A, 0),
            row(100, 2, D, 0).retry(200),
            row(100, 11, I, 0),
            row(5000, 11, I, 10),
        ],
    },
];

/// One request of the multi-quota vector M1 and what the store must answer.
#[derive(Debug, Clone, Copy)]
struct MultiRow {
    t_ms: u64,
    cost: u32,
    outcome: Outcome,
    /// Each quota's remaining, in the policy's order.
    remaining: [u32; 2],
    retry_ms: Option<u64>,
}

const fn mrow(
    t_ms: u64,
    cost: u32,
    outcome: Outcome,
    remaining: [u32; 2],
    retry_ms: Option<u64>,
) -> MultiRow {
    MultiRow {
        t_ms,
        cost,
        outcome,
        remaining,
        retry_ms,
    }
}

/// M1: `2/s` (T = 500 ms, B = 2) AND `5/h` (T = 720 s, B = 5). A request passes only if both
/// admit it; a denial charges neither (the admitting quota reports its state unchanged);
/// Retry-After is the binding quota's wait.
const M1_QUOTAS: [&str; 2] = ["2/s", "5/h"];
const M1: [MultiRow; 9] = [
    mrow(0, 1, A, [1, 4], None),
    mrow(0, 1, A, [0, 3], None),
    mrow(0, 1, D, [0, 3], Some(500)),
    mrow(500, 1, A, [0, 2], None),
    mrow(1000, 1, A, [0, 1], None),
    mrow(2000, 1, A, [1, 0], None),
    mrow(3000, 1, D, [2, 0], Some(717_000)),
    mrow(3000, 3, I, [2, 0], None),
    mrow(3000, 0, A, [2, 0], None),
];

/// Runs every case: [`gcra_vectors`], [`multi_quota_vector`], [`peek`], [`atomicity`],
/// [`reset`], [`tiers`], [`adjust`], in that order.
///
/// # Errors
/// The first [`Failure`]: the first answer that differs from the GCRA, or a store error.
pub async fn run_all<H: Harness>(h: &mut H) -> Result<(), Failure> {
    gcra_vectors(h).await?;
    multi_quota_vector(h).await?;
    peek(h).await?;
    atomicity(h).await?;
    reset(h).await?;
    tiers(h).await?;
    adjust(h).await
}

/// The GCRA test vectors V1-V4 through [`Harness::check_at`], each on a fresh key at instants
/// of its own: outcome, remaining, capacity, retry_after, and where the vector gives them
/// reset_after and the time to the next unit, exactly.
///
/// # Errors
/// A [`Failure`] of case `vectors` at the first difference or store error.
pub async fn gcra_vectors<H: Harness>(h: &mut H) -> Result<(), Failure> {
    for vector in &VECTORS {
        let q = quota(vector.quota);
        let policy = policy("conformance", &[vector.quota]);
        let key = fresh_key(vector.name);
        let origin = next_origin();
        for (i, row) in vector.rows.iter().enumerate() {
            let at = At::new(
                "vectors",
                vector.name,
                i,
                format!("{}, t = {} ms, cost {}", vector.quota, row.t_ms, row.cost),
            );
            let now = origin + row.t_ms * 1_000;
            let d = at.answer(h.check_at(&policy, &key, row.cost, now).await)?;
            at.eq("outcome", row.outcome, d.outcome(), &d)?;
            at.eq("remaining", row.remaining, d.remaining(), &d)?;
            at.eq("capacity", q.capacity(), d.capacity(), &d)?;
            if let Some(ms) = row.reset_ms {
                at.eq(
                    "reset_after",
                    Duration::from_millis(ms),
                    d.reset_after(),
                    &d,
                )?;
            }
            let retry = row.retry_ms.map(Duration::from_millis);
            at.eq("retry_after", retry, d.retry_after(), &d)?;
            if let Some(ms) = row.next_ms {
                let next = Duration::from_millis(ms);
                at.eq("next_available", next, d.next_available(), &d)?;
            }
            at.eq("per_quota length", 1, d.per_quota().len(), &d)?;
        }
    }
    Ok(())
}

/// Vector M1 (a policy of `2/s` and `5/h`) through [`Harness::check_at`] on a fresh key: each
/// quota's remaining, the policy's (the binding quota's), the outcome and retry_after.
///
/// # Errors
/// A [`Failure`] of case `multi-quota` at the first difference or store error.
pub async fn multi_quota_vector<H: Harness>(h: &mut H) -> Result<(), Failure> {
    let policy = policy("conformance-multi", &M1_QUOTAS);
    let key = fresh_key("M1");
    let origin = next_origin();
    for (i, row) in M1.iter().enumerate() {
        let request = format!("2/s and 5/h, t = {} ms, cost {}", row.t_ms, row.cost);
        let at = At::new("multi-quota", "M1", i, request);
        let now = origin + row.t_ms * 1_000;
        let d = at.answer(h.check_at(&policy, &key, row.cost, now).await)?;
        at.eq("outcome", row.outcome, d.outcome(), &d)?;
        let remaining: Vec<u32> = d.per_quota().iter().map(Decision::remaining).collect();
        at.eq("remaining per quota", row.remaining.to_vec(), remaining, &d)?;
        if row.outcome != Outcome::Impossible {
            // The binding quota speaks for the policy: the fewest remaining.
            let fewest = row.remaining.iter().copied().min().unwrap_or(0);
            at.eq("remaining", fewest, d.remaining(), &d)?;
        }
        let retry = row.retry_ms.map(Duration::from_millis);
        at.eq("retry_after", retry, d.retry_after(), &d)?;
    }
    Ok(())
}

/// One step of a real-clock case: the call to make and what it must answer.
#[derive(Debug, Clone, Copy)]
enum Call {
    /// `Store::check` with this cost.
    Check(u32),
    /// `Store::peek`.
    Peek,
    /// `Store::adjust` by this many units.
    Adjust(i64),
}

/// Calls to make in a row, each with the outcome and every quota's remaining it must give.
type Calls = &'static [(Call, Outcome, &'static [u32])];

/// Makes `call` on the store's own clock and checks the outcome and every quota's remaining.
async fn expect<S: Store>(
    store: &S,
    at: At,
    (policy, key): (&Policy, &Key),
    call: Call,
    outcome: Outcome,
    remaining: &[u32],
) -> Result<Decision, Failure> {
    let answer = match call {
        Call::Check(cost) => store.check(policy, key, cost).await,
        Call::Peek => store.peek(policy, key).await,
        Call::Adjust(delta) => match store.adjust(policy, key, delta) {
            Some(fut) => fut.await,
            None => {
                return Err(at.failure(
                    "Store::adjust",
                    "a future (refunds and reconciliation need it)".into(),
                    "None: the store does not implement it".into(),
                ));
            }
        },
    };
    let d = at.answer(answer)?;
    at.eq("outcome", outcome, d.outcome(), &d)?;
    let got: Vec<u32> = d.per_quota().iter().map(Decision::remaining).collect();
    at.eq("remaining per quota", remaining.to_vec(), got, &d)?;
    Ok(d)
}

/// Peeks on the store's own clock (`T` = 1 h): a peek or a check of cost 0 on a fresh key, on a
/// charged one and on an exhausted one reports its state, is never denied and never charges
/// (the full capacity can still be spent after any number of peeks); for one quota and for two.
///
/// # Errors
/// A [`Failure`] of case `peek` at the first difference or store error.
pub async fn peek<H: Harness>(h: &mut H) -> Result<(), Failure> {
    use Call::{Check, Peek};
    let store = h.store();
    let steps: [(&str, &[&str], Calls); 2] = [
        (
            "one quota (5/5h)",
            &["5/5h"],
            &[
                (Peek, A, &[5]),
                (Check(0), A, &[5]),
                (Peek, A, &[5]),
                (Check(1), A, &[4]),
                (Peek, A, &[4]),
                (Peek, A, &[4]),
                (Check(0), A, &[4]),
                (Check(4), A, &[0]),
                (Peek, A, &[0]),
                (Check(0), A, &[0]),
                (Check(1), D, &[0]),
                (Peek, A, &[0]),
                (Check(0), A, &[0]),
            ],
        ),
        (
            "two quotas (5/5h and 2/2h)",
            &["5/5h", "2/2h"],
            &[
                (Peek, A, &[5, 2]),
                (Check(0), A, &[5, 2]),
                (Check(1), A, &[4, 1]),
                (Peek, A, &[4, 1]),
                (Check(0), A, &[4, 1]),
                (Check(1), A, &[3, 0]),
                (Peek, A, &[3, 0]),
                (Check(1), D, &[3, 0]),
                (Peek, A, &[3, 0]),
            ],
        ),
    ];
    for (part, quotas, calls) in steps {
        let policy = policy("conformance-peek", quotas);
        let key = fresh_key("peek");
        for (i, &(call, outcome, remaining)) in calls.iter().enumerate() {
            let at = At::new("peek", part, i, format!("{call:?}"));
            let d = expect(store, at, (&policy, &key), call, outcome, remaining).await?;
            if i == 0 {
                let at = At::new("peek", part, i, "a fresh key".into());
                at.eq("reset_after", Duration::ZERO, d.reset_after(), &d)?;
            }
        }
    }
    Ok(())
}

/// How many concurrent checks [`atomicity`] sends.
const CONCURRENT: usize = 200;

/// How many threads start them.
const THREADS: usize = 4;

/// 200 concurrent checks of cost 1 on one fresh key under `5/5h` (`T` = 1 h, capacity 5), on
/// the store's own clock: exactly 5 are admitted, with remaining 4, 3, 2, 1 and 0 each seen
/// once, and the other 195 are denied.
///
/// The checks are started from 4 threads released together (each call of [`Store::check`] runs
/// on its thread, inside the caller's Tokio runtime context if there is one), and their futures
/// are then awaited together, so both a store that decides inside `check` and one that
/// decides when polled see them at once.
///
/// # Errors
/// A [`Failure`] of case `atomicity`.
pub async fn atomicity<H: Harness>(h: &mut H) -> Result<(), Failure> {
    let store = h.store();
    let policy = policy("conformance-atomic", &["5/5h"]);
    let key = fresh_key("atomic");
    let runtime = tokio::runtime::Handle::try_current().ok();
    let barrier = std::sync::Barrier::new(THREADS);
    let futures: Vec<_> = std::thread::scope(|scope| {
        let threads: Vec<_> = (0..THREADS)
            .map(|_| {
                let (policy, key, barrier, runtime) = (&policy, &key, &barrier, &runtime);
                scope.spawn(move || {
                    let _context = runtime.as_ref().map(tokio::runtime::Handle::enter);
                    barrier.wait();
                    (0..CONCURRENT / THREADS)
                        .map(|_| store.check(policy, key, 1))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        threads
            .into_iter()
            .flat_map(|t| match t.join() {
                Ok(futures) => futures,
                Err(panic) => std::panic::resume_unwind(panic),
            })
            .collect()
    });
    let answers = join_all(futures).await;
    let mut remaining = Vec::new();
    for (i, answer) in answers.into_iter().enumerate() {
        let at = At::new(
            "atomicity",
            "5/5h",
            i,
            "one of 200 concurrent checks".into(),
        );
        let d = at.answer(answer)?;
        match d.outcome() {
            Outcome::Allowed => remaining.push(d.remaining()),
            Outcome::Denied => {}
            other => at.eq("outcome", Outcome::Denied, other, &d)?,
        }
    }
    remaining.sort_unstable();
    if remaining != [0, 1, 2, 3, 4] {
        let at = At::new("atomicity", "5/5h", 0, "200 concurrent checks".into());
        let shown = &remaining[..remaining.len().min(10)];
        let more = if remaining.len() > 10 { ", ..." } else { "" };
        return Err(at.failure(
            "admitted checks and their remaining, sorted",
            "5 admitted: [0, 1, 2, 3, 4]".into(),
            format!("{} admitted: {shown:?}{more}", remaining.len()),
        ));
    }
    Ok(())
}

/// Awaits every future at once, in order.
async fn join_all<F: Future>(futures: Vec<F>) -> Vec<F::Output> {
    let mut futures: Vec<Pin<Box<F>>> = futures.into_iter().map(Box::pin).collect();
    let mut outputs: Vec<Option<F::Output>> = futures.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (future, output) in futures.iter_mut().zip(outputs.iter_mut()) {
            if output.is_none() {
                match future.as_mut().poll(cx) {
                    Poll::Ready(v) => *output = Some(v),
                    Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    })
    .await;
    outputs.into_iter().flatten().collect()
}

/// Resets on the store's own clock (`T` = 1 h): after [`Store::reset`] of one key under one
/// policy, that key is a fresh client again (also after it was denied, so a store that
/// remembers denials must forget them), while the same key under another policy and another key
/// under the same policy keep their state; for one quota and for two; resetting a key with no
/// state succeeds.
///
/// # Errors
/// A [`Failure`] of case `reset`.
pub async fn reset<H: Harness>(h: &mut H) -> Result<(), Failure> {
    use Call::{Check, Peek};
    let store = h.store();
    let one = policy("conformance-reset-a", &["5/5h"]);
    let other = policy("conformance-reset-b", &["5/5h"]);
    let multi = policy("conformance-reset-m", &["5/5h", "2/2h"]);
    let (k1, k2) = (fresh_key("reset-1"), fresh_key("reset-2"));
    let mut row = 0;
    let mut step = |request: &str| {
        row += 1;
        At::new(
            "reset",
            "policies a, b (5/5h) and m (5/5h and 2/2h)",
            row - 1,
            request.to_owned(),
        )
    };
    let setup: [(&Policy, &Key, Call, Outcome, &[u32]); 8] = [
        (&one, &k1, Check(3), A, &[2]),
        (&one, &k2, Check(1), A, &[4]),
        (&other, &k1, Check(2), A, &[3]),
        (&multi, &k1, Check(1), A, &[4, 1]),
        (&one, &k1, Check(2), A, &[0]),
        (&one, &k1, Check(1), D, &[0]),
        (&one, &k1, Check(1), D, &[0]),
        (&multi, &k1, Check(2), D, &[4, 1]),
    ];
    for (p, k, call, outcome, remaining) in setup {
        let at = step(&format!("{} {call:?} before the reset", p.name()));
        expect(store, at, (p, k), call, outcome, remaining).await?;
    }
    let at = step("reset of conformance-reset-a, key 1");
    at.answer(store.reset(&one, &k1).await)?;
    let after: [(&Policy, &Key, Call, Outcome, &[u32]); 5] = [
        (&one, &k1, Peek, A, &[5]),
        (&one, &k2, Peek, A, &[4]),
        (&other, &k1, Peek, A, &[3]),
        (&multi, &k1, Peek, A, &[4, 1]),
        (&one, &k1, Check(1), A, &[4]),
    ];
    for (p, k, call, outcome, remaining) in after {
        let at = step(&format!("{} {call:?} after the reset", p.name()));
        let d = expect(store, at, (p, k), call, outcome, remaining).await?;
        if remaining == [5] {
            let at = step("the reset key is fresh");
            at.eq("reset_after", Duration::ZERO, d.reset_after(), &d)?;
        }
    }
    let at = step("reset of conformance-reset-m, key 1");
    at.answer(store.reset(&multi, &k1).await)?;
    let at = step("reset of a key with no state");
    let unknown = fresh_key("reset-none");
    at.answer(store.reset(&one, &unknown).await)?;
    let last: [(&Policy, &Key, Call, Outcome, &[u32]); 4] = [
        (&multi, &k1, Peek, A, &[5, 2]),
        (&multi, &k1, Check(2), A, &[3, 0]),
        (&one, &k1, Peek, A, &[4]),
        (&one, &unknown, Peek, A, &[5]),
    ];
    for (p, k, call, outcome, remaining) in last {
        let at = step(&format!("{} {call:?} after the second reset", p.name()));
        expect(store, at, (p, k), call, outcome, remaining).await?;
    }
    Ok(())
}

/// Tiers: one client under the tiers of one layer (policies `free` 2/2h and `pro` of two quotas,
/// 5/5h and 3/3h), as a layer moves it between them. Each tier keeps its own state: an upgrade is
/// decided by the new tier alone (a store that remembers denials must not deny it from the old
/// tier's entry), a downgrade finds the old tier's state as it was and admits no more than that
/// tier allows, and a reset of one tier leaves the other.
///
/// # Errors
/// A [`Failure`] of case `tiers`.
pub async fn tiers<H: Harness>(h: &mut H) -> Result<(), Failure> {
    use Call::{Check, Peek};
    let store = h.store();
    let free = policy("conformance-tier-free", &["2/2h"]);
    let pro = policy("conformance-tier-pro", &["5/5h", "3/3h"]);
    let k = fresh_key("tiers");
    let mut row = 0;
    let steps: [(&Policy, Call, Outcome, &[u32], &str); 11] = [
        (&free, Check(1), A, &[1], "free"),
        (&free, Check(1), A, &[0], "free, exhausted"),
        (&free, Check(1), D, &[0], "free, denied"),
        (
            &free,
            Check(1),
            D,
            &[0],
            "free, denied again (a deny cache answers)",
        ),
        (&pro, Check(1), A, &[4, 2], "upgraded: pro decides, fresh"),
        (&pro, Check(2), A, &[2, 0], "pro"),
        (
            &pro,
            Check(1),
            D,
            &[2, 0],
            "pro, its second quota exhausted",
        ),
        (&free, Check(1), D, &[0], "downgraded: free as it was left"),
        (&free, Peek, A, &[0], "free peek"),
        (&pro, Peek, A, &[2, 0], "pro kept its state"),
        (&pro, Check(3), D, &[2, 0], "pro, denied"),
    ];
    for (p, call, outcome, remaining, what) in steps {
        let at = At::new(
            "tiers",
            "tiers free (2/2h) and pro (5/5h and 3/3h)",
            row,
            format!("{what}: {} {call:?}", p.name()),
        );
        row += 1;
        expect(store, at, (p, &k), call, outcome, remaining).await?;
    }
    let at = At::new(
        "tiers",
        "tiers free and pro",
        row,
        "reset of free".to_owned(),
    );
    row += 1;
    at.answer(store.reset(&free, &k).await)?;
    let after: [(&Policy, Call, Outcome, &[u32], &str); 2] = [
        (&free, Check(1), A, &[1], "free after its reset"),
        (&pro, Peek, A, &[2, 0], "pro untouched by free's reset"),
    ];
    for (p, call, outcome, remaining, what) in after {
        let at = At::new(
            "tiers",
            "tiers free (2/2h) and pro (5/5h and 3/3h)",
            row,
            format!("{what}: {} {call:?}", p.name()),
        );
        row += 1;
        expect(store, at, (p, &k), call, outcome, remaining).await?;
    }
    Ok(())
}

/// Adjustments ([`Store::adjust`]) on the store's own clock (`T` = 1 h), exactly as
/// [`gcra::adjust`](crate::gcra::adjust): a refund gives units back but never leaves a client
/// better off than a fresh one (the capacity, not more, can be spent after refunding more than
/// was charged, and refunding a fresh or unknown key changes nothing); a refund lifts a denial it
/// made obsolete at once (a store that remembers denials must forget them); a positive
/// adjustment charges unconditionally, beyond the capacity, so the next request is denied with a
/// `retry_after` that counts the whole debt; 50 concurrent refunds of one unit on a key with 3
/// used leave it exactly fresh; a policy of two quotas is adjusted on both.
///
/// # Errors
/// A [`Failure`] of case `adjust`, also when the store does not implement [`Store::adjust`].
pub async fn adjust<H: Harness>(h: &mut H) -> Result<(), Failure> {
    use Call::{Adjust, Check, Peek};
    let store = h.store();
    let steps: [(&str, &[&str], Calls); 3] = [
        (
            "refunds (5/5h)",
            &["5/5h"],
            &[
                (Adjust(-1), A, &[5]),
                (Peek, A, &[5]),
                (Check(3), A, &[2]),
                (Adjust(-1), A, &[3]),
                (Check(3), A, &[0]),
                (Check(1), D, &[0]),
                (Check(1), D, &[0]),
                (Adjust(-2), A, &[2]),
                (Check(1), A, &[1]),
                (Adjust(-100), A, &[5]),
                (Adjust(-1), A, &[5]),
                (Check(5), A, &[0]),
                (Check(1), D, &[0]),
                (Adjust(0), A, &[0]),
                (Check(1), D, &[0]),
            ],
        ),
        (
            "debt (5/5h)",
            &["5/5h"],
            &[
                (Check(2), A, &[3]),
                (Adjust(6), A, &[0]),
                (Peek, A, &[0]),
                (Check(1), D, &[0]),
                (Adjust(-3), A, &[0]),
                (Adjust(-1), A, &[1]),
                (Check(1), A, &[0]),
                (Check(1), D, &[0]),
            ],
        ),
        (
            "two quotas (5/5h and 2/2h)",
            &["5/5h", "2/2h"],
            &[
                (Adjust(-1), A, &[5, 2]),
                (Check(2), A, &[3, 0]),
                (Check(1), D, &[3, 0]),
                (Adjust(-1), A, &[4, 1]),
                (Check(1), A, &[3, 0]),
                (Adjust(3), A, &[0, 0]),
                (Adjust(-5), A, &[5, 2]),
                (Adjust(1), A, &[4, 1]),
            ],
        ),
    ];
    for (part, quotas, calls) in steps {
        let policy = policy("conformance-adjust", quotas);
        let key = fresh_key("adjust");
        for (i, &(call, outcome, remaining)) in calls.iter().enumerate() {
            let at = At::new("adjust", part, i, format!("{call:?}"));
            let d = expect(store, at, (&policy, &key), call, outcome, remaining).await?;
            if part.starts_with("debt") && matches!(call, Check(1)) && i == 3 {
                // 8 units used of 5: the next unit waits for 4 of them, less the moments the
                // case has run (well under a minute).
                let at = At::new("adjust", part, i, "the denial after the debt".into());
                let retry = d.retry_after().unwrap_or_default();
                let four = Duration::from_secs(4 * 3600);
                let ok = retry <= four && retry > four - Duration::from_secs(60);
                if !ok {
                    return Err(at.failure(
                        "retry_after",
                        "just under 4 h (the debt)".into(),
                        format!("{retry:?}"),
                    ));
                }
            }
        }
    }
    // 50 concurrent refunds of one unit on a key with 3 used: exactly fresh afterwards, the
    // capacity (and no more) can be spent.
    let policy = policy("conformance-adjust-concurrent", &["5/5h"]);
    let key = fresh_key("adjust-concurrent");
    let at = At::new("adjust", "concurrent (5/5h)", 0, "Check(3)".into());
    expect(store, at, (&policy, &key), Check(3), A, &[2]).await?;
    let mut futures = Vec::new();
    for i in 0..50 {
        match store.adjust(&policy, &key, -1) {
            Some(fut) => futures.push(fut),
            None => {
                let at = At::new("adjust", "concurrent (5/5h)", i, "Adjust(-1)".into());
                return Err(at.failure(
                    "Store::adjust",
                    "a future".into(),
                    "None: the store does not implement it".into(),
                ));
            }
        }
    }
    for (i, answer) in join_all(futures).await.into_iter().enumerate() {
        let at = At::new("adjust", "concurrent (5/5h)", i + 1, "Adjust(-1)".into());
        at.answer(answer)?;
    }
    let after: [(Call, Outcome, &[u32]); 3] =
        [(Peek, A, &[5]), (Check(5), A, &[0]), (Check(1), D, &[0])];
    for (i, (call, outcome, remaining)) in after.into_iter().enumerate() {
        let at = At::new("adjust", "concurrent (5/5h)", 51 + i, format!("{call:?}"));
        expect(store, at, (&policy, &key), call, outcome, remaining).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tables_hold_valid_quotas() {
        for v in &VECTORS {
            let _ = quota(v.quota);
        }
        let _ = policy("conformance-multi", &M1_QUOTAS);
    }

    #[test]
    fn keys_are_fresh_and_instants_increase() {
        assert_ne!(fresh_key("x"), fresh_key("x"));
        let (a, b) = (next_origin(), next_origin());
        assert!(b >= a + VECTOR_STRIDE);
    }
}

//! The conformance kit (`tollgate::store::conformance`) on the in-memory stores, each driven by
//! a manual clock, and on deliberately broken stores, which it must reject naming the case.
#![cfg(feature = "test-util")]

use std::collections::HashMap;
use std::future::{Ready, ready};
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use tollgate::gcra;
use tollgate::store::conformance::{self, ManualClockHarness};
use tollgate::{
    BoxStore, CircuitBreaker, Clock, Decision, DenyCache, Key, ManualClock, MemoryStore, Policy,
    Store, StoreError,
};

fn memory(clock: &ManualClock) -> MemoryStore<ManualClock> {
    MemoryStore::builder().clock(clock.clone()).build().unwrap()
}

/// Runs the whole kit twice on one store: every vector on keys and instants of its own.
async fn passes_twice<S: Store>(store: S, clock: ManualClock) {
    let mut harness = ManualClockHarness::new(store, clock);
    for run in 1..=2 {
        if let Err(failure) = conformance::run_all(&mut harness).await {
            panic!("run {run}: {failure}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_store_passes_the_kit() {
    let clock = ManualClock::new();
    passes_twice(memory(&clock), clock).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deny_cache_over_a_memory_store_passes_the_kit() {
    let clock = ManualClock::new();
    let store = DenyCache::new(memory(&clock)).clock(clock.clone());
    passes_twice(store, clock).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn circuit_breaker_over_a_memory_store_passes_the_kit() {
    let clock = ManualClock::new();
    let store = CircuitBreaker::new(memory(&clock)).clock(clock.clone());
    passes_twice(store, clock).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_boxed_store_passes_the_kit() {
    let clock = ManualClock::new();
    let inner = DenyCache::new(CircuitBreaker::new(memory(&clock)).clock(clock.clone()));
    passes_twice(BoxStore::new(inner.clock(clock.clone())), clock).await;
}

#[tokio::test]
async fn the_kit_runs_on_a_current_thread_runtime_too() {
    let clock = ManualClock::new();
    let store = DenyCache::new(memory(&clock)).clock(clock.clone());
    passes_twice(store, clock).await;
}

/// What the broken stores get wrong.
#[derive(Clone, Copy, PartialEq)]
enum Flaw {
    /// Forgets every state right after deciding: as if it never wrote.
    ForgetsWrites,
    /// Answers `reset` with `Ok` but keeps the state.
    IgnoresReset,
    /// Applies every refund twice (giving back what other requests were charged).
    RefundsTwice,
    /// Has no `adjust` (the trait's default).
    CannotAdjust,
}

struct Broken {
    inner: MemoryStore<ManualClock>,
    flaw: Flaw,
}

impl Store for Broken {
    type Future = Ready<Result<Decision, StoreError>>;

    fn check(&self, policy: &Policy, key: &Key, cost: u32) -> Self::Future {
        let decision = self.inner.check_now(policy, key, cost);
        if self.flaw == Flaw::ForgetsWrites {
            self.inner.remove(policy, key);
        }
        ready(Ok(decision))
    }

    async fn reset(&self, policy: &Policy, key: &Key) -> Result<(), StoreError> {
        if self.flaw != Flaw::IgnoresReset {
            self.inner.remove(policy, key);
        }
        Ok(())
    }

    fn adjust(&self, policy: &Policy, key: &Key, delta: i64) -> Option<Self::Future> {
        match self.flaw {
            Flaw::CannotAdjust => None,
            Flaw::RefundsTwice if delta < 0 => {
                self.inner.adjust_now(policy, key, delta);
                Some(ready(Ok(self.inner.adjust_now(policy, key, delta))))
            }
            _ => Some(ready(Ok(self.inner.adjust_now(policy, key, delta)))),
        }
    }
}

async fn failure_of(flaw: Flaw) -> conformance::Failure {
    let clock = ManualClock::new();
    let store = Broken {
        inner: memory(&clock),
        flaw,
    };
    let mut harness = ManualClockHarness::new(store, clock);
    conformance::run_all(&mut harness)
        .await
        .expect_err("the kit accepted a broken store")
}

#[tokio::test]
async fn the_kit_rejects_a_store_that_forgets_to_write() {
    let failure = failure_of(Flaw::ForgetsWrites).await;
    assert_eq!(failure.case(), "vectors");
    assert_eq!(failure.vector(), "V1");
    // The second admitted request still sees a full bucket.
    assert_eq!(failure.row(), 2);
    assert_eq!(failure.what(), "remaining");
    assert_eq!((failure.expected(), failure.got()), ("3", "4"));
    let message = failure.to_string();
    assert!(
        message.starts_with(
            "conformance case `vectors`, V1 row 2 (5/5s, t = 0 ms, cost 1): remaining: \
             expected 3, got 4; decision: "
        ),
        "{message}"
    );
}

#[tokio::test]
async fn the_kit_rejects_a_store_whose_reset_keeps_the_state() {
    let failure = failure_of(Flaw::IgnoresReset).await;
    assert_eq!(failure.case(), "reset", "{failure}");
    assert_eq!(failure.what(), "remaining per quota", "{failure}");
    assert_eq!((failure.expected(), failure.got()), ("[5]", "[0]"));
    assert!(failure.to_string().contains("after the reset"), "{failure}");
}

#[tokio::test]
async fn the_kit_rejects_a_store_that_refunds_twice() {
    let failure = failure_of(Flaw::RefundsTwice).await;
    assert_eq!(failure.case(), "adjust", "{failure}");
    assert_eq!(failure.vector(), "refunds (5/5h)", "{failure}");
    assert_eq!(failure.row(), 3, "{failure}");
    assert_eq!((failure.expected(), failure.got()), ("[3]", "[4]"));
}

#[tokio::test]
async fn the_kit_rejects_a_store_without_adjustments() {
    let failure = failure_of(Flaw::CannotAdjust).await;
    assert_eq!(failure.case(), "adjust", "{failure}");
    assert_eq!(failure.what(), "Store::adjust", "{failure}");
    assert!(failure.got().contains("does not implement"), "{failure}");
}

/// (policy name, client key) -> one TAT per quota.
type Tats = HashMap<(String, Vec<u8>), Vec<u64>>;

/// Not atomic: reads the state when `check` is called and writes when its future is polled
/// (a GET, then a SET), so checks in flight together all decide on the same state.
struct Racy {
    tats: Arc<Mutex<Tats>>,
    clock: ManualClock,
}

impl Store for Racy {
    type Future = Pin<Box<dyn Future<Output = Result<Decision, StoreError>> + Send>>;

    fn check(&self, policy: &Policy, key: &Key, cost: u32) -> Self::Future {
        let id = (policy.name().to_owned(), key.as_bytes().to_vec());
        let stored = self
            .tats
            .lock()
            .unwrap()
            .get(&id)
            .cloned()
            .unwrap_or_default();
        let step = gcra::step_all(&stored, self.clock.now_micros(), policy.quotas(), cost);
        let tats = Arc::clone(&self.tats);
        Box::pin(async move {
            if let Some(writes) = step.writes {
                tats.lock().unwrap().insert(id, writes);
            }
            Ok(step.decision)
        })
    }

    async fn reset(&self, policy: &Policy, key: &Key) -> Result<(), StoreError> {
        let id = (policy.name().to_owned(), key.as_bytes().to_vec());
        self.tats.lock().unwrap().remove(&id);
        Ok(())
    }
}

#[tokio::test]
async fn the_kit_rejects_a_store_that_is_not_atomic() {
    let clock = ManualClock::new();
    let store = Racy {
        tats: Arc::default(),
        clock: clock.clone(),
    };
    let mut harness = ManualClockHarness::new(store, clock);
    let failure = conformance::run_all(&mut harness)
        .await
        .expect_err("the kit accepted a store that is not atomic");
    assert_eq!(failure.case(), "atomicity", "{failure}");
    assert_eq!(failure.expected(), "5 admitted: [0, 1, 2, 3, 4]");
    assert_eq!(
        failure.got(),
        "200 admitted: [4, 4, 4, 4, 4, 4, 4, 4, 4, 4], ..."
    );
}

#[tokio::test]
async fn each_case_runs_on_its_own() {
    let clock = ManualClock::new();
    let mut h = ManualClockHarness::new(memory(&clock), clock);
    conformance::gcra_vectors(&mut h).await.unwrap();
    conformance::multi_quota_vector(&mut h).await.unwrap();
    conformance::peek(&mut h).await.unwrap();
    conformance::atomicity(&mut h).await.unwrap();
    conformance::reset(&mut h).await.unwrap();
    conformance::adjust(&mut h).await.unwrap();
}

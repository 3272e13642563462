//! A store written the way a user would write one, with the public API only: a mutex around a
//! hash map of TATs, deciding through `tollgate::gcra::step_all`. It passes the whole
//! conformance kit, which shows that the public API is enough to build a correct store.
#![cfg(feature = "test-util")]

use std::collections::HashMap;
use std::future::{Ready, ready};
use std::sync::Mutex;

use tollgate::store::conformance::{self, Harness, ManualClockHarness};
use tollgate::{Clock, Decision, Key, ManualClock, Policy, Store, StoreError, gcra};

/// (policy name, client key) -> one TAT per quota of the policy, in its order.
type Tats = HashMap<(String, Vec<u8>), Vec<u64>>;

/// The state of every client under every policy, on `clock`.
struct MutexStore<C> {
    tats: Mutex<Tats>,
    clock: C,
}

impl<C: Clock> MutexStore<C> {
    fn new(clock: C) -> Self {
        Self {
            tats: Mutex::new(HashMap::new()),
            clock,
        }
    }

    /// Drops the states that are fresh again (every TAT passed): they decide nothing.
    fn sweep(&self) {
        let now = self.clock.now_micros();
        let mut tats = self.tats.lock().unwrap_or_else(|e| e.into_inner());
        tats.retain(|_, quota_tats| quota_tats.iter().any(|&tat| tat > now));
    }
}

fn id(policy: &Policy, key: &Key) -> (String, Vec<u8>) {
    (policy.name().to_owned(), key.as_bytes().to_vec())
}

impl<C: Clock> Store for MutexStore<C> {
    type Future = Ready<Result<Decision, StoreError>>;

    fn check(&self, policy: &Policy, key: &Key, cost: u32) -> Self::Future {
        let id = id(policy, key);
        // Read, decide and write under one lock: atomic per key.
        let mut tats = self.tats.lock().unwrap_or_else(|e| e.into_inner());
        let now = self.clock.now_micros();
        let stored = tats.get(&id).map(Vec::as_slice).unwrap_or(&[]);
        let step = gcra::step_all(stored, now, policy.quotas(), cost);
        if let Some(writes) = step.writes {
            tats.insert(id, writes);
        }
        ready(Ok(step.decision))
    }

    fn adjust(&self, policy: &Policy, key: &Key, delta: i64) -> Option<Self::Future> {
        let id = id(policy, key);
        // The same lock as checks: a refund and a check of one key never interleave.
        let mut tats = self.tats.lock().unwrap_or_else(|e| e.into_inner());
        let now = self.clock.now_micros();
        let stored = tats.get(&id).map(Vec::as_slice).unwrap_or(&[]);
        let step = gcra::adjust_all(stored, now, policy.quotas(), delta);
        if let Some(writes) = step.writes {
            tats.insert(id, writes);
        }
        Some(ready(Ok(step.decision)))
    }

    async fn reset(&self, policy: &Policy, key: &Key) -> Result<(), StoreError> {
        let mut tats = self.tats.lock().unwrap_or_else(|e| e.into_inner());
        tats.remove(&id(policy, key));
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_built_on_the_public_gcra_passes_the_kit() {
    let clock = ManualClock::new();
    let mut harness = ManualClockHarness::new(MutexStore::new(clock.clone()), clock);
    for run in 1..=2 {
        if let Err(failure) = conformance::run_all(&mut harness).await {
            panic!("run {run}: {failure}");
        }
    }
    // Every state the kit left is at most a few hours old on the manual clock: still there
    // until the clock passes it, gone after.
    assert!(!harness.store().tats.lock().unwrap().is_empty());
    harness
        .clock()
        .advance(std::time::Duration::from_secs(24 * 3600));
    harness.store().sweep();
    assert!(harness.store().tats.lock().unwrap().is_empty());
}

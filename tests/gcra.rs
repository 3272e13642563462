//! DESIGN §3 vectors V1-V4 on the MemoryStore, driven by a manual clock.

mod common;

use std::time::Duration;

use common::vectors::{Target, run_all, run_multi};
use tollgate::{Decision, Key, ManualClock, MemoryStore, Policy};

struct Memory {
    store: MemoryStore<ManualClock>,
    clock: ManualClock,
    base_ms: u64,
    last_key: Option<Key>,
}

impl Target for Memory {
    async fn check(&mut self, policy: &Policy, key: &Key, t_ms: u64, cost: u32) -> Decision {
        if self.last_key.as_ref() != Some(key) {
            // Each vector starts at a fresh instant, far after the previous one.
            self.base_ms += 1_000_000;
            self.last_key = Some(key.clone());
        }
        self.clock.set(Duration::from_millis(self.base_ms + t_ms));
        self.store.check_now(policy, key, cost)
    }
}

fn memory() -> Memory {
    let clock = ManualClock::new();
    let store = MemoryStore::builder().clock(clock.clone()).build().unwrap();
    Memory {
        store,
        clock,
        base_ms: 0,
        last_key: None,
    }
}

#[tokio::test]
async fn memory_store_reproduces_vectors_v1_to_v4() {
    run_all(&mut memory(), "mem").await;
}

#[tokio::test]
async fn memory_store_reproduces_the_multi_quota_vector() {
    run_multi(&mut memory(), "mem").await;
}

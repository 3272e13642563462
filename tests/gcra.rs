//! DESIGN §3 vectors V1-V4 and the multi-quota vector M1 on the MemoryStore, driven by a manual
//! clock: the conformance kit's table (`tollgate::store::conformance`), the one every store
//! is checked against.
#![cfg(feature = "test-util")]

use tollgate::store::conformance::{self, ManualClockHarness};
use tollgate::{ManualClock, MemoryStore};

fn memory() -> ManualClockHarness<MemoryStore<ManualClock>> {
    let clock = ManualClock::new();
    let store = MemoryStore::builder().clock(clock.clone()).build().unwrap();
    ManualClockHarness::new(store, clock)
}

#[tokio::test]
async fn memory_store_reproduces_vectors_v1_to_v4() {
    if let Err(failure) = conformance::gcra_vectors(&mut memory()).await {
        panic!("{failure}");
    }
}

#[tokio::test]
async fn memory_store_reproduces_the_multi_quota_vector() {
    if let Err(failure) = conformance::multi_quota_vector(&mut memory()).await {
        panic!("{failure}");
    }
}

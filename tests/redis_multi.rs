//! Policies of several quotas on RedisStore: the shared multi-quota vector (M1) bit for bit,
//! atomicity under concurrency, TTLs, reset, and a real 3-primary cluster (no CROSSSLOT).
#![cfg(feature = "redis")]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::redis::RedisServer;
use tollgate::store::redis::RedisStore;
use tollgate::{Decision, Key, Policy, Quota, Store};

async fn store(url: &str) -> RedisStore {
    RedisStore::builder(url)
        .command_timeout(Duration::from_secs(2))
        .build()
        .await
        .expect("store builds")
}

fn multi(quotas: &[&str]) -> Policy {
    Policy::multi("multi", quotas.iter().map(|q| q.parse::<Quota>().unwrap())).unwrap()
}

/// M1 from the conformance kit, at injected instants: the same table as the MemoryStore's.
#[cfg(feature = "test-util")]
async fn reproduces_m1(store: RedisStore) {
    use tollgate::store::conformance::{self, RedisHarness};
    if let Err(failure) = conformance::multi_quota_vector(&mut RedisHarness::new(store)).await {
        panic!("{failure}");
    }
}

#[cfg(feature = "test-util")]
#[tokio::test]
async fn multi_quota_vector_matches_the_memory_store() {
    let server = RedisServer::start();
    reproduces_m1(store(&server.url()).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_quota_decisions_are_atomic_across_stores() {
    let server = RedisServer::start();
    let stores = [store(&server.url()).await, store(&server.url()).await];
    let policy = Arc::new(multi(&["3/h", "10/h"]));
    let mut tasks = Vec::new();
    for i in 0..200 {
        let (store, policy) = (stores[i % 2].clone(), policy.clone());
        tasks.push(tokio::spawn(async move {
            store
                .check(&policy, &Key::from_static("k"), 1)
                .await
                .unwrap()
        }));
    }
    let mut admitted = 0;
    for t in tasks {
        admitted += usize::from(t.await.unwrap().is_allowed());
    }
    assert_eq!(admitted, 3);
    let peek = stores[0]
        .inspect(&policy, &Key::from_static("k"))
        .await
        .unwrap();
    let remaining: Vec<u32> = peek.per_quota().iter().map(Decision::remaining).collect();
    assert_eq!(
        remaining,
        vec![0, 7],
        "the 10/h quota was charged for the 3 admitted only"
    );
    // Every quota's key carries a TTL of ceil(reset_after).
    let keys = server.cli(&["--scan", "--pattern", "tollgate:*"]);
    let keys: Vec<&str> = keys.lines().collect();
    assert_eq!(keys.len(), 2, "{keys:?}");
    for key in keys {
        let pttl: i64 = server.cli(&["PTTL", key]).trim().parse().unwrap();
        assert!(pttl > 0, "{key} has a TTL");
    }
    stores[1]
        .reset(&policy, &Key::from_static("k"))
        .await
        .unwrap();
    let fresh = stores[0]
        .inspect(&policy, &Key::from_static("k"))
        .await
        .unwrap();
    assert_eq!(fresh.remaining(), 3);
    assert_eq!(
        server.cli(&["DBSIZE"]).trim(),
        "0",
        "reset deletes every quota's key"
    );
}

#[cfg(feature = "redis-cluster")]
#[tokio::test]
async fn multi_quota_works_on_a_cluster() {
    let cluster = common::redis::RedisCluster::start();
    let store = RedisStore::cluster_builder(cluster.urls())
        .command_timeout(Duration::from_secs(2))
        .build()
        .await
        .expect("cluster store");
    #[cfg(feature = "test-util")]
    reproduces_m1(store.clone()).await;
    // Hostile identities still land each policy's keys in one slot: no CROSSSLOT.
    let policy = multi(&["2/s", "5/h", "100/d"]);
    for raw in [&b"{"[..], b"}", b"{}", b"a\r\nb", b"\0", &[b'x'; 65_536]] {
        let d = store.check(&policy, &Key::from(raw), 1).await.unwrap();
        assert!(
            d.is_allowed(),
            "{:?}",
            String::from_utf8_lossy(&raw[..raw.len().min(8)])
        );
    }
}

//! RedisStore against a real three-primary Redis Cluster started from redis-server binaries.
#![cfg(feature = "redis-cluster")]

mod common;

use std::time::Duration;

use common::redis::RedisCluster;
use tollgate::store::redis::RedisStore;
use tollgate::{Key, Policy, Quota, Store};

async fn store(cluster: &RedisCluster) -> RedisStore {
    RedisStore::cluster_builder(cluster.urls())
        .command_timeout(Duration::from_secs(2))
        .require_connection(true)
        .build()
        .await
        .expect("cluster store builds")
}

fn policy(name: &str, quota: &str) -> Policy {
    Policy::new(name, quota.parse::<Quota>().unwrap()).unwrap()
}

/// One cluster for all checks (starting one costs a few seconds): the conformance kit,
/// atomicity from two stores, hostile identities spread over the primaries without CROSSSLOT,
/// and SCRIPT FLUSH on every node.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cluster_vectors_atomicity_hostile_keys_and_script_flush() {
    let cluster = RedisCluster::start();
    let s = store(&cluster).await;

    // The conformance kit (DESIGN §3 vectors, peek, atomicity, reset), twice: every vector's
    // key lands on whichever primary owns its slot.
    #[cfg(feature = "test-util")]
    {
        use tollgate::store::conformance::{self, RedisHarness};
        let mut harness = RedisHarness::new(s.clone());
        for run in 1..=2 {
            if let Err(failure) = conformance::run_all(&mut harness).await {
                panic!("run {run}: {failure}");
            }
        }
    }

    // Atomicity: 200 concurrent requests on one key from two cluster stores.
    let other = store(&cluster).await;
    let p = policy("atomic", "5/5h");
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(200));
    let mut tasks = Vec::new();
    for i in 0..200u32 {
        let st = if i.is_multiple_of(2) {
            s.clone()
        } else {
            other.clone()
        };
        let (p, barrier) = (p.clone(), barrier.clone());
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            st.check(&p, &Key::from("one-key"), 1).await
        }));
    }
    let mut remaining = Vec::new();
    for t in tasks {
        let d = tokio::time::timeout(Duration::from_secs(20), t)
            .await
            .expect("bounded")
            .unwrap()
            .expect("no store error");
        if d.is_allowed() {
            remaining.push(d.remaining());
        }
    }
    remaining.sort_unstable();
    assert_eq!(remaining, vec![0, 1, 2, 3, 4]);

    // Hostile identities: every one decides (no CROSSSLOT), keys are distinct.
    let hostile = policy("hostile", "5/h");
    let ids: Vec<Vec<u8>> = vec![
        b"{".to_vec(),
        b"}".to_vec(),
        b"{}".to_vec(),
        b"{a}".to_vec(),
        b"\r\n".to_vec(),
        vec![0],
        vec![b'{'; 65_536],
    ];
    for id in &ids {
        let d = s.check(&hostile, &Key::from(id.clone()), 1).await.unwrap();
        assert_eq!(d.remaining(), 4);
    }
    // Many clients spread over the primaries: braces cannot steer them onto one slot.
    for i in 0..60 {
        s.check(&hostile, &Key::from(format!("{{same}}{i}")), 1)
            .await
            .unwrap();
    }
    let sizes: Vec<u64> = cluster
        .nodes
        .iter()
        .map(|n| n.cli(&["DBSIZE"]).trim().parse().unwrap())
        .collect();
    assert!(sizes.iter().all(|n| *n > 0), "keys per primary: {sizes:?}");

    // SCRIPT FLUSH on every primary: the next decisions reload transparently, counted once.
    let flush = policy("flush", "5/5h");
    let key = Key::from("flushed");
    assert_eq!(s.check(&flush, &key, 1).await.unwrap().remaining(), 4);
    for node in &cluster.nodes {
        assert_eq!(node.cli(&["SCRIPT", "FLUSH"]).trim(), "OK");
    }
    assert_eq!(s.check(&flush, &key, 1).await.unwrap().remaining(), 3);
    assert_eq!(other.check(&flush, &key, 1).await.unwrap().remaining(), 2);
    s.reset(&flush, &key).await.unwrap();
    assert_eq!(s.inspect(&flush, &key).await.unwrap().remaining(), 5);

    // A standalone store pointed at one cluster node: keys of the other primaries' slots are
    // answered MOVED, recognised by its code, and the message says to use cluster_builder.
    let single = RedisStore::builder(&cluster.urls()[0])
        .command_timeout(Duration::from_secs(2))
        .require_connection(true)
        .build()
        .await
        .unwrap();
    let mut moved = 0;
    for i in 0..30 {
        match single
            .check(&flush, &Key::from(format!("moved-{i}")), 1)
            .await
        {
            Ok(_) => {}
            Err(e) => {
                assert_eq!(e.kind(), tollgate::StoreErrorKind::Connection, "{e}");
                assert!(e.to_string().contains("cluster_builder"), "{e}");
                assert!(format!("{e:?}").contains("Moved"), "{e:?}");
                moved += 1;
            }
        }
    }
    assert!(moved > 0, "30 keys all hashed to node 0's slots");
}

//! RedisStore's group commit against real redis-server processes (one per test, on a free
//! loopback port): decisions that arrive while two are in flight go together in one script call,
//! and each request gets exactly the decision one call of its own would have given it, whatever
//! its identity, policy, cost or position in the batch.
#![cfg(feature = "redis")]

mod common;

use std::time::{Duration, Instant};

use common::redis::RedisServer;
use tollgate::store::redis::{RedisConfigError, RedisStore};
use tollgate::{Decision, Key, Outcome, Policy, Quota, Store, StoreError, StoreErrorKind};

/// Slack on top of the command timeout for a noisy 2-core machine running debug builds.
const SLACK: Duration = Duration::from_millis(150);

async fn store(server: &RedisServer, prefix: &str, max_batch: usize) -> RedisStore {
    RedisStore::builder(&server.url())
        .prefix(prefix)
        .command_timeout(Duration::from_secs(5))
        .max_batch(max_batch)
        .build()
        .await
        .expect("store builds")
}

/// A store whose batches hold up to 1,024 decisions and 1 MiB, so that a test's requests that
/// wait together go in one batch, where their order is kept.
async fn one_batch_store(server: &RedisServer, prefix: &str) -> RedisStore {
    RedisStore::builder(&server.url())
        .prefix(prefix)
        .command_timeout(Duration::from_secs(5))
        .max_batch(1024)
        .max_batch_bytes(1 << 20)
        .build()
        .await
        .expect("store builds")
}

fn policy(name: &str, quotas: &[&str]) -> Policy {
    let quotas: Vec<Quota> = quotas.iter().map(|q| q.parse().unwrap()).collect();
    if let [one] = quotas[..] {
        Policy::new(name, one).unwrap()
    } else {
        Policy::multi(name, quotas).unwrap()
    }
}

/// `calls` of one command in `INFO commandstats`.
fn calls(server: &RedisServer, cmd: &str) -> u64 {
    let stats = server.cli(&["INFO", "commandstats"]);
    stats
        .lines()
        .find(|l| l.starts_with(&format!("cmdstat_{cmd}:")))
        .and_then(|l| l.split("calls=").nth(1))
        .and_then(|v| v.split(',').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Asks for every decision at once, in order (each queued when `check` is called, so a batch
/// keeps their order), and collects the answers in that order.
async fn all_at_once(
    s: &RedisStore,
    requests: &[(Policy, Key, u32)],
) -> Vec<Result<Decision, StoreError>> {
    let futures: Vec<_> = requests
        .iter()
        .map(|(p, k, cost)| s.check(p, k, *cost))
        .collect();
    let handles: Vec<_> = futures.into_iter().map(tokio::spawn).collect();
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        let answer = tokio::time::timeout(Duration::from_secs(20), h)
            .await
            .expect("bounded")
            .expect("task");
        out.push(answer);
    }
    out
}

/// Identities a client controls, meant to break a batch's framing if any client text reached
/// it: Lua and RESP syntax, braces (cluster hash tags), NUL, CRLF, 64 KiB, and look-alikes.
fn hostile_identities() -> Vec<Key> {
    let mut ids: Vec<Vec<u8>> = vec![
        b"{".to_vec(),
        b"}".to_vec(),
        b"{}".to_vec(),
        b"a}b{c".to_vec(),
        b"\r\n".to_vec(),
        b"*3\r\n$3\r\nSET\r\n$1\r\nx\r\n$1\r\ny\r\n".to_vec(),
        b"$-1\r\n".to_vec(),
        b"]]..redis.call('FLUSHALL')..[[".to_vec(),
        b"\"); redis.call('FLUSHALL') --".to_vec(),
        b"KEYS[1]".to_vec(),
        b"ARGV[2]".to_vec(),
        b"1".to_vec(),
        b"-1".to_vec(),
        b"nan".to_vec(),
        vec![0],
        vec![0, 0],
        vec![0xff, 0xfe, 0x80],
        "clé-ü-键".as_bytes().to_vec(),
        b"".to_vec(),
        b" ".to_vec(),
        vec![b'{'; 65_536],
    ];
    let mut tail = vec![b'{'; 65_536];
    tail[65_535] = b'}';
    ids.push(tail);
    ids.into_iter().map(Key::from).collect()
}

/// A deterministic mix of requests over hostile identities: policies of one quota and of two,
/// costs 0 (peek), 1, 2 and above capacity (impossible), many repeats of each identity.
fn mixed_requests(count: usize) -> Vec<(Policy, Key, u32)> {
    let policies = [
        policy("one", &["5/h"]),
        policy("tight", &["2/h"]),
        policy("two", &["3/h", "4/d"]),
    ];
    let ids = hostile_identities();
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        seed = seed
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (seed >> 33) as usize
    };
    (0..count)
        .map(|_| {
            let p = policies[next() % policies.len()].clone();
            let k = ids[next() % ids.len()].clone();
            let cost = [1, 1, 1, 2, 0, 9][next() % 6];
            (p, k, cost)
        })
        .collect()
}

/// What a comparison looks at: every number that does not move with the second or so between
/// two runs on quotas of hours (retry_after is compared within the runs' length).
fn summary(d: &Decision) -> (Outcome, u32, Vec<u32>) {
    let per_quota = d.per_quota().iter().map(Decision::remaining).collect();
    (d.outcome(), d.remaining(), per_quota)
}

/// 600 requests at once over hostile identities, repeated identities, peeks, impossible costs
/// and a two-quota policy go in one script call, and each gets exactly what the same requests,
/// one script call each, in the same order, give on a second set of keys.
///
/// Order is kept inside a batch; two calls in flight (the store keeps two) may reach Redis in
/// either order, as separate calls of concurrent requests may. So the batch here holds all 600:
/// two requests for a client of their own go first, alone, and the 600 wait for one batch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_request_gets_its_own_decision_exactly_as_one_call_each() {
    let server = RedisServer::start();
    let batched = one_batch_store(&server, "batched").await;
    let single = store(&server, "single", 1).await;
    let requests = mixed_requests(600);
    let lone = policy("lone", &["100/h"]);
    let mut all = vec![
        (lone.clone(), Key::from("lone"), 1),
        (lone, Key::from("lone"), 1),
    ];
    all.extend(requests.iter().cloned());

    assert_eq!(server.cli(&["CONFIG", "RESETSTAT"]).trim(), "OK");
    let got = all_at_once(&batched, &all).await;
    let batch_calls = calls(&server, "evalsha");
    assert_eq!(batch_calls, 3, "two lone calls, then the 600 in one batch");
    let got = &got[2..];

    assert_eq!(server.cli(&["CONFIG", "RESETSTAT"]).trim(), "OK");
    let mut want = Vec::with_capacity(requests.len());
    let started = Instant::now();
    for (p, k, cost) in &requests {
        want.push(single.check(p, k, *cost).await);
    }
    // The sequential run's states age while it runs: retry times drift by up to its length.
    let drift = started.elapsed() + Duration::from_secs(1);
    assert_eq!(calls(&server, "evalsha"), requests.len() as u64);

    let mut outcomes = std::collections::HashMap::new();
    for (i, (got, want)) in got.iter().zip(&want).enumerate() {
        let (got, want) = (got.as_ref().unwrap(), want.as_ref().unwrap());
        let (policy, key, cost) = &requests[i];
        assert_eq!(
            summary(got),
            summary(want),
            "request {i} ({} cost {cost}, key {:?})",
            policy.name(),
            key.fingerprint()
        );
        let (a, b) = (got.retry_after(), want.retry_after());
        assert_eq!(a.is_some(), b.is_some(), "request {i}");
        if let (Some(a), Some(b)) = (a, b) {
            assert!(a.abs_diff(b) <= drift, "request {i}: {a:?} vs {b:?}");
        }
        *outcomes.entry(got.outcome()).or_insert(0) += 1;
    }
    // The mix really exercised every branch.
    for outcome in [Outcome::Allowed, Outcome::Denied, Outcome::Impossible] {
        assert!(
            outcomes.get(&outcome).copied().unwrap_or(0) > 10,
            "{outcomes:?}"
        );
    }
    // Both key sets hold the same states: same keys, same TATs to within the run's length.
    let mut con = redis::Client::open(server.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    for (p, k, _) in &requests {
        let a = batched.redis_key(p, k);
        let b = single.redis_key(p, k);
        let keys = if p.quotas().len() == 1 {
            vec![(a, b)]
        } else {
            (0..p.quotas().len())
                .map(|i| {
                    let suffix = format!("#{i}");
                    let mut a = a.clone();
                    a.extend_from_slice(suffix.as_bytes());
                    let mut b = b.clone();
                    b.extend_from_slice(suffix.as_bytes());
                    (a, b)
                })
                .collect()
        };
        for (a, b) in keys {
            let (ta, tb): (Option<u64>, Option<u64>) = redis::pipe()
                .get(&a)
                .get(&b)
                .query_async(&mut con)
                .await
                .unwrap();
            assert_eq!(ta.is_some(), tb.is_some(), "{}", p.name());
            if let (Some(ta), Some(tb)) = (ta, tb) {
                assert!(
                    ta.abs_diff(tb) < 30_000_000,
                    "{}: TATs {ta} and {tb}",
                    p.name()
                );
            }
        }
    }
}

/// 300 requests for one client at once, capacity 50: the first two go alone (the store keeps two
/// calls in flight), the other 298 wait and go in one batch, where they are decided one after
/// the other in request order, as separate calls would be: the batch's admitted requests are
/// its first ones, with remaining counting down by one. Exactly 50 are admitted in all (the
/// remaining values 49, 48, .., 0 once each) and the other 250 denied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeats_of_one_key_in_a_batch_are_decided_one_after_the_other() {
    let server = RedisServer::start();
    // Room for all 298 in one batch, also with two quotas' keys.
    let s = one_batch_store(&server, "dup").await;
    for (name, quotas) in [("one", &["50/h"][..]), ("two", &["50/h", "60/d"][..])] {
        let p = policy(name, quotas);
        let key = Key::from("]]..redis.call('DEL', KEYS[1])..[[\r\n{x}");
        let requests: Vec<_> = (0..300).map(|_| (p.clone(), key.clone(), 1)).collect();
        assert_eq!(server.cli(&["CONFIG", "RESETSTAT"]).trim(), "OK");
        let got = all_at_once(&s, &requests).await;
        assert_eq!(
            calls(&server, "evalsha"),
            3,
            "{name}: two lone calls and one batch"
        );
        let got: Vec<Decision> = got.into_iter().map(Result::unwrap).collect();
        let mut admitted: Vec<u32> = got
            .iter()
            .filter(|d| d.is_allowed())
            .map(Decision::remaining)
            .collect();
        admitted.sort_unstable();
        assert_eq!(admitted, (0..50).collect::<Vec<u32>>(), "{name}");
        for d in got.iter().filter(|d| !d.is_allowed()) {
            assert_eq!(d.outcome(), Outcome::Denied, "{name}");
            assert_eq!(d.remaining(), 0);
        }
        // The batch (requests 2..): its admitted requests come first, counting down.
        let batch = &got[2..];
        let first_denied = batch.iter().position(|d| !d.is_allowed()).unwrap();
        assert!(
            batch[first_denied..].iter().all(|d| !d.is_allowed()),
            "{name}: an admission after a denial in one batch"
        );
        for pair in batch[..first_denied].windows(2) {
            assert_eq!(pair[1].remaining() + 1, pair[0].remaining(), "{name}");
        }
        // Nothing more was charged than the 50 admitted.
        let after = s.inspect(&p, &key).await.unwrap();
        assert_eq!(after.remaining(), 0);
        let wait = after.next_available();
        assert!(
            wait > Duration::from_secs(60) && wait <= Duration::from_secs(72),
            "{name}: next unit in {wait:?}"
        );
    }
}

/// Requests one after the other never wait for each other: one script call each.
#[tokio::test]
async fn nothing_waits_when_nothing_is_in_flight() {
    let server = RedisServer::start();
    let s = store(&server, "alone", 128).await;
    let p = policy("seq", &["100/h"]);
    assert_eq!(server.cli(&["CONFIG", "RESETSTAT"]).trim(), "OK");
    for i in 0..20u32 {
        let d = s.check(&p, &Key::from("k"), 1).await.unwrap();
        assert_eq!(d.remaining(), 99 - i);
    }
    assert_eq!(calls(&server, "evalsha"), 20);
}

/// A batch bounded in decisions and in bytes: 100 requests at once with `max_batch(10)` take
/// at least 10 calls; with `max_batch_bytes(1)` every call carries one decision.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_stay_within_their_bounds() {
    let server = RedisServer::start();
    let p = policy("bounds", &["1000/h"]);
    let requests: Vec<_> = (0..100)
        .map(|i| (p.clone(), Key::from(format!("client-{i}")), 1))
        .collect();
    let ten = store(&server, "ten", 10).await;
    assert_eq!(server.cli(&["CONFIG", "RESETSTAT"]).trim(), "OK");
    for d in all_at_once(&ten, &requests).await {
        assert_eq!(d.unwrap().remaining(), 999);
    }
    let n = calls(&server, "evalsha");
    assert!((10..=12).contains(&n), "max_batch(10): {n} calls for 100");

    let tiny = RedisStore::builder(&server.url())
        .prefix("tiny")
        .command_timeout(Duration::from_secs(5))
        .max_batch_bytes(1)
        .build()
        .await
        .unwrap();
    assert_eq!(server.cli(&["CONFIG", "RESETSTAT"]).trim(), "OK");
    for d in all_at_once(&tiny, &requests).await {
        assert_eq!(d.unwrap().remaining(), 999);
    }
    assert_eq!(calls(&server, "evalsha"), 100);
}

/// A batch that times out (DEBUG SLEEP) fails every one of its requests with `Timeout` within
/// the command timeout, and the store decides again afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timed_out_batch_fails_each_request_with_a_timeout() {
    let server = RedisServer::start();
    let timeout = Duration::from_millis(100);
    let s = RedisStore::builder(&server.url())
        .command_timeout(timeout)
        .build()
        .await
        .unwrap();
    let p = policy("sleep", &["1000/s"]);
    assert!(
        s.check(&p, &Key::from("warm"), 1)
            .await
            .unwrap()
            .is_allowed()
    );
    let port = server.port;
    let sleeper = std::thread::spawn(move || common::redis::cli(port, &["DEBUG", "SLEEP", "0.6"]));
    tokio::time::sleep(Duration::from_millis(100)).await;
    let requests: Vec<_> = (0..64)
        .map(|i| (p.clone(), Key::from(format!("c{i}")), 1))
        .collect();
    let start = Instant::now();
    let got = all_at_once(&s, &requests).await;
    let took = start.elapsed();
    for d in got {
        let e = d.unwrap_err();
        assert_eq!(e.kind(), StoreErrorKind::Timeout, "{e}");
    }
    assert!(took <= timeout + SLACK, "took {took:?}");
    assert_eq!(sleeper.join().unwrap().trim(), "OK");
    let deadline = Instant::now() + Duration::from_secs(2);
    while all_at_once(&s, &requests[..8])
        .await
        .iter()
        .any(Result::is_err)
    {
        assert!(Instant::now() < deadline, "no recovery after DEBUG SLEEP");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// OOM (maxmemory with noeviction) refuses a batch's first write: every request of it fails
/// with `OutOfMemory` and none is charged; a killed server fails them with `Connection` or
/// `Timeout`, as one call each would.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_batch_fails_each_request_with_todays_kinds() {
    let mut server = RedisServer::start();
    let s = RedisStore::builder(&server.url())
        .command_timeout(Duration::from_millis(500))
        .build()
        .await
        .unwrap();
    let p = policy("oom", &["5/h"]);
    let requests: Vec<_> = (0..50)
        .map(|i| (p.clone(), Key::from(format!("c{i}")), 1))
        .collect();
    assert_eq!(
        server.cli(&["CONFIG", "SET", "maxmemory", "1"]).trim(),
        "OK"
    );
    assert_eq!(server.cli(&["CONFIG", "RESETSTAT"]).trim(), "OK");
    for d in all_at_once(&s, &requests).await {
        let e = d.unwrap_err();
        assert_eq!(e.kind(), StoreErrorKind::OutOfMemory, "{e}");
        assert!(std::error::Error::source(&e).is_some());
    }
    assert!(calls(&server, "evalsha") < 50, "not batched");
    assert_eq!(
        server.cli(&["CONFIG", "SET", "maxmemory", "0"]).trim(),
        "OK"
    );
    for d in all_at_once(&s, &requests).await {
        assert_eq!(d.unwrap().remaining(), 4, "charged while out of memory");
    }

    // After a SCRIPT FLUSH, a batch reloads its script and runs once.
    assert_eq!(server.cli(&["SCRIPT", "FLUSH"]).trim(), "OK");
    for d in all_at_once(&s, &requests).await {
        assert_eq!(d.unwrap().remaining(), 3, "counted twice or not at all");
    }

    // A key of another type (someone else wrote there) fails its batch with a server error, as
    // it fails a decision alone, and is never overwritten.
    let victim = Key::from("victim");
    let victim_key = s.redis_key(&p, &victim);
    let mut con = redis::Client::open(server.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let _: () = redis::cmd("HSET")
        .arg(&victim_key)
        .arg("f")
        .arg("v")
        .query_async(&mut con)
        .await
        .unwrap();
    let mut mixed = requests[..20].to_vec();
    mixed.insert(10, (p.clone(), victim.clone(), 1));
    let got = all_at_once(&s, &mixed).await;
    assert!(got[0].is_ok(), "the first request goes alone");
    let e = got[10].as_ref().unwrap_err();
    assert_eq!(e.kind(), StoreErrorKind::Server, "{e}");
    let kind: String = redis::cmd("TYPE")
        .arg(&victim_key)
        .query_async(&mut con)
        .await
        .unwrap();
    assert_eq!(kind, "hash");

    server.kill();
    for d in all_at_once(&s, &requests).await {
        let e = d.unwrap_err();
        assert!(
            matches!(
                e.kind(),
                StoreErrorKind::Connection | StoreErrorKind::Timeout
            ),
            "{e}"
        );
    }
}

/// Bounds out of range are configuration errors that say what to write.
#[tokio::test]
async fn batch_bounds_out_of_range_are_rejected() {
    for (which, builder) in [
        (
            "max_batch",
            RedisStore::builder("redis://127.0.0.1:1").max_batch(0),
        ),
        (
            "max_batch",
            RedisStore::builder("redis://127.0.0.1:1").max_batch(4097),
        ),
        (
            "max_batch_bytes",
            RedisStore::builder("redis://127.0.0.1:1").max_batch_bytes(0),
        ),
    ] {
        let e = builder.build().await.unwrap_err();
        assert!(matches!(e, RedisConfigError::BatchBound { .. }), "{e:?}");
        let text = e.to_string();
        assert!(
            text.contains(which) && text.contains("max_batch(1)"),
            "{text}"
        );
    }
    // Both ends of the range build.
    for n in [1, 4096] {
        let built = RedisStore::builder("redis://127.0.0.1:1")
            .connect_timeout(Duration::from_millis(10))
            .max_batch(n)
            .build()
            .await;
        assert!(built.is_ok(), "max_batch({n})");
    }
}

//! The demo binary on Redis Sentinel (`--redis-sentinel ADDRS --redis-master NAME`), black-box
//! over HTTP with real processes: a primary, a replica and three sentinels. Two demo servers
//! share one limit through the primary the sentinels name, and keep deciding on the promoted
//! replica after the primary is SIGKILLed.
#![cfg(feature = "redis")]

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::demo::{Demo, demo_binary};
use common::redis::SentinelSetup;

fn client() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap()
}

/// GET /api/hello as API key `key`; the status.
fn hello(c: &reqwest::blocking::Client, demo: &Demo, key: &str) -> u16 {
    c.get(demo.url("/api/hello"))
        .header("x-api-key", key)
        .send()
        .unwrap()
        .status()
        .as_u16()
}

#[test]
fn demo_servers_share_a_limit_through_sentinel_and_survive_a_failover() {
    let mut setup = SentinelSetup::start(500, 2_000);
    let sentinels = setup.sentinel_addrs().join(",");
    let args = [
        "--redis-sentinel",
        sentinels.as_str(),
        "--redis-master",
        SentinelSetup::MASTER,
        "--rate",
        "6/m",
        "--fail-mode",
        "closed",
        "--breaker",
        "off",
        "--deny-cache",
        "off",
        "--store-timeout-ms",
        "200",
    ];
    let (a, b) = (Demo::start(&args), Demo::start(&args));
    assert!(a.banner.contains("store: redis"), "{}", a.banner);
    let c = client();
    let statuses: Vec<u16> = (0..5)
        .flat_map(|_| [&a, &b])
        .map(|d| hello(&c, d, "shared-key"))
        .collect();
    assert_eq!(
        statuses.iter().filter(|s| **s == 200).count(),
        6,
        "both servers together admit the capacity once: {statuses:?}"
    );
    assert!(
        statuses.iter().all(|s| *s == 200 || *s == 429),
        "{statuses:?}"
    );
    assert_eq!(
        setup.primary.cli(&["DBSIZE"]).trim(),
        "1",
        "the state is on the primary"
    );

    // SIGKILL the primary. With --fail-mode closed the demo answers 503 while no primary
    // is known, then decides on the promoted replica again: the key replicated before the
    // kill is still exhausted there.
    setup.primary.kill();
    let killed = Instant::now();
    let deadline = killed + Duration::from_secs(20);
    let mut seen = Vec::new();
    let recovered = loop {
        let status = hello(&c, &a, "shared-key");
        seen.push(status);
        if status == 429 && seen.contains(&503) {
            break killed.elapsed();
        }
        assert!(
            Instant::now() < deadline,
            "no decision on the new primary within 20 s: {seen:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    // A fresh identity is admitted by both demo servers, sharing the new primary. `b` sent
    // nothing during the failover: its first decision fails on the dead primary (503 with
    // --fail-mode closed) and sends it to the sentinels; the next ones decide again.
    assert_eq!(hello(&c, &a, "new-key"), 200);
    let moved = Instant::now();
    let mut statuses = Vec::new();
    while statuses.last() != Some(&200) {
        statuses.push(hello(&c, &b, "new-key"));
        assert!(
            moved.elapsed() < Duration::from_secs(2),
            "the idle demo did not move to the new primary: {statuses:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        statuses.iter().all(|s| *s == 503 || *s == 200),
        "{statuses:?}"
    );
    assert_eq!(setup.replica.cli(&["DBSIZE"]).trim(), "2");
    eprintln!("demo over sentinel: deciding again {recovered:?} after the kill");
    for demo in [a, b] {
        assert!(demo.terminate().success());
    }
}

#[test]
fn redis_url_and_redis_sentinel_together_are_refused() {
    let out = Command::new(demo_binary())
        .args([
            "--redis-url",
            "redis://127.0.0.1:6379",
            "--redis-sentinel",
            "127.0.0.1:26379",
        ])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--redis-url") && stderr.contains("--redis-sentinel"),
        "{stderr}"
    );
    assert!(stderr.contains("cannot be used with"), "{stderr}");
    // An empty sentinel list is a configuration error naming the flag and the format.
    let out = Command::new(demo_binary())
        .args(["--listen", "127.0.0.1:0", "--redis-sentinel", ","])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--redis-sentinel") && stderr.contains("host:port"),
        "{stderr}"
    );
}

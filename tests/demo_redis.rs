//! The demo binary on the Redis store, black-box over HTTP, as the README's "distributed in 30
//! seconds" walkthrough runs it: two demo processes behind one real redis-server share one
//! limit, and a Redis outage is handled by the fail mode.
#![cfg(feature = "redis")]

mod common;

use std::time::{Duration, Instant};

use common::demo::Demo;
use common::redis::RedisServer;

fn client() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap()
}

#[test]
fn two_demo_servers_share_one_limit() {
    let redis = RedisServer::start();
    let url = redis.url();
    let args = ["--redis-url", url.as_str(), "--rate", "10/m"];
    let (a, b) = (Demo::start(&args), Demo::start(&args));
    assert!(a.banner.contains("store: redis"), "{}", a.banner);
    let c = client();
    let mut admitted = 0;
    for _ in 0..15 {
        for demo in [&a, &b] {
            let res = c.get(demo.url("/api/hello")).send().unwrap();
            match res.status().as_u16() {
                200 => admitted += 1,
                429 => assert!(res.headers().contains_key("retry-after")),
                other => panic!("unexpected status {other}"),
            }
        }
    }
    assert_eq!(
        admitted, 10,
        "both servers together admit the capacity, once"
    );
    // Several quotas, one atomic decision, shared too.
    let multi = ["--redis-url", url.as_str(), "--multi-quotas", "3/m,100/h"];
    let (m1, m2) = (Demo::start(&multi), Demo::start(&multi));
    let statuses: Vec<u16> = (0..3)
        .flat_map(|_| [&m1, &m2])
        .map(|d| c.get(d.url("/api/multi")).send().unwrap().status().as_u16())
        .collect();
    assert_eq!(
        statuses.iter().filter(|s| **s == 200).count(),
        3,
        "{statuses:?}"
    );
}

/// `/healthz` never fails the process: it reports Redis healthy, then down (200 both times).
#[test]
fn healthz_reports_a_redis_outage() {
    let mut redis = RedisServer::start();
    let url = redis.url();
    let demo = Demo::start(&["--redis-url", url.as_str()]);
    let c = client();
    let health = |c: &reqwest::blocking::Client| -> serde_json::Value {
        let res = c.get(demo.url("/healthz")).send().unwrap();
        assert_eq!(res.status(), 200);
        res.json().unwrap()
    };
    let up = health(&c);
    assert_eq!(
        (up["store"].as_str(), up["store_healthy"].as_bool()),
        (Some("redis"), Some(true)),
        "{up}"
    );
    redis.kill();
    let down = health(&c);
    assert_eq!(down["store_healthy"], false, "{down}");
    assert!(
        down["store_error"].as_str().is_some_and(|e| !e.is_empty()),
        "{down}"
    );
}

/// Tiers on Redis: two demo instances share each tier's limit exactly.
#[test]
fn two_demo_servers_share_a_tiers_limit() {
    let redis = RedisServer::start();
    let url = redis.url();
    let args = [
        "--redis-url",
        url.as_str(),
        "--tiers",
        "free=2/m,pro=6/m",
        "--tier-of",
        "alice=pro",
    ];
    let (a, b) = (Demo::start(&args), Demo::start(&args));
    let c = client();
    for (key, tier, limit) in [("alice", "pro", 6), ("bob", "free", 2)] {
        let mut admitted = 0;
        for _ in 0..5 {
            for demo in [&a, &b] {
                let res = c
                    .get(demo.url("/api/hello"))
                    .header("x-api-key", key)
                    .send()
                    .unwrap();
                let member = res.headers()["ratelimit-policy"]
                    .to_str()
                    .unwrap()
                    .to_owned();
                assert!(member.starts_with(&format!("\"{tier}\";")), "{member}");
                admitted += usize::from(res.status() == 200);
            }
        }
        assert_eq!(admitted, limit, "{key} on {tier}");
    }
}

#[test]
fn redis_outage_follows_the_fail_mode() {
    let mut redis = RedisServer::start();
    let url = redis.url();
    let closed = Demo::start(&["--redis-url", &url, "--fail-mode", "closed"]);
    let fallback = Demo::start(&[
        "--redis-url",
        &url,
        "--fail-mode",
        "fallback",
        "--fallback-divisor",
        "2",
        "--rate",
        "4/m",
    ]);
    let open = Demo::start(&["--redis-url", &url]);
    let c = client();
    assert_eq!(
        c.get(closed.url("/api/hello")).send().unwrap().status(),
        200
    );
    redis.kill();
    // Closed: 503 with Retry-After: 1, never slower than the 50 ms timeout plus slack.
    for _ in 0..5 {
        let started = Instant::now();
        let res = c.get(closed.url("/api/hello")).send().unwrap();
        assert_eq!(res.status(), 503);
        assert_eq!(res.headers()["retry-after"], "1");
        assert!(started.elapsed() < Duration::from_millis(1000));
    }
    // Open: everything is served.
    for _ in 0..5 {
        assert_eq!(c.get(open.url("/api/hello")).send().unwrap().status(), 200);
    }
    // Fallback: each server enforces 4/2 = 2 per minute locally.
    let statuses: Vec<u16> = (0..4)
        .map(|_| {
            c.get(fallback.url("/api/hello"))
                .send()
                .unwrap()
                .status()
                .as_u16()
        })
        .collect();
    assert_eq!(statuses, vec![200, 200, 429, 429]);
    // Redis comes back: limiting resumes through Redis within a few seconds (breaker
    // cool-down 1 s, reconnect with backoff), with no restart of the app.
    redis.restart();
    let restarted = Instant::now();
    let deadline = restarted + Duration::from_secs(10);
    loop {
        let res = c.get(closed.url("/api/hello")).send().unwrap();
        if res.status() == 200 {
            assert!(res.headers().contains_key("ratelimit"));
            eprintln!(
                "limiting resumed {:?} after the restart",
                restarted.elapsed()
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "limiting did not resume within 10 s"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A demo whose Redis cannot be reached says so on stderr without being asked (no `RUST_LOG`):
/// at startup, and when it lets a request through under the default fail mode (open), with
/// the client's key as a fingerprint only.
#[test]
fn an_unreachable_redis_is_reported_on_stderr_by_default() {
    // A port nothing listens on (the throwaway server is stopped first).
    let url = {
        let redis = RedisServer::start();
        redis.url()
    };
    let demo = Demo::start(&["--redis-url", url.as_str(), "--store-timeout-ms", "200"]);
    let res = client()
        .get(demo.url("/api/hello"))
        .header("x-api-key", "key-that-must-not-leak")
        .send()
        .unwrap();
    assert_eq!(res.status(), 200, "fail mode open lets the request through");
    let deadline = Instant::now() + Duration::from_secs(10);
    let stderr = loop {
        let text = demo.stderr_text();
        if (text.contains("not reachable at startup") && text.contains("fp:"))
            || Instant::now() > deadline
        {
            break text;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(stderr.contains("not reachable at startup"), "{stderr}");
    assert!(stderr.contains("WARN"), "{stderr}");
    assert!(
        stderr.contains("fp:"),
        "the failed request's warning: {stderr}"
    );
    assert!(!stderr.contains("key-that-must-not-leak"), "{stderr}");
}

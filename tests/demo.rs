//! The demo binary, black-box over HTTP, as a user runs it (DESIGN §7).

mod common;

use common::demo::{Demo, demo_binary};

fn get(url: &str) -> reqwest::blocking::Response {
    reqwest::blocking::Client::new().get(url).send().unwrap()
}

#[test]
fn demo_limits_after_capacity_and_serves_every_route() {
    let demo = Demo::start(&["--rate", "3/m", "--admin-token", "s3cret"]);
    assert!(demo.banner.contains("store: memory"), "{}", demo.banner);
    // /api/quota peeks: it never consumes.
    for _ in 0..5 {
        let res = get(&demo.url("/api/quota"));
        assert_eq!(res.status(), 200);
        assert_eq!(res.headers()["ratelimit"], "\"default\";r=3;t=0");
    }
    for left in [2, 1, 0] {
        let res = get(&demo.url("/api/hello"));
        assert_eq!(res.status(), 200);
        assert_eq!(
            res.headers()["ratelimit"],
            format!("\"default\";r={left};t=20").as_str()
        );
    }
    let res = get(&demo.url("/api/hello"));
    assert_eq!(res.status(), 429);
    assert_eq!(res.headers()["retry-after"], "20");
    assert_eq!(res.headers()["ratelimit-policy"], "\"default\";q=3;w=60");
    // Other clients (another API key) are not affected; /healthz is never limited.
    let res = reqwest::blocking::Client::new()
        .get(demo.url("/api/hello"))
        .header("x-api-key", "someone-else")
        .send()
        .unwrap();
    assert_eq!(res.status(), 200);
    for _ in 0..5 {
        let res = get(&demo.url("/healthz"));
        assert_eq!(res.status(), 200);
        assert!(res.headers().get("ratelimit").is_none());
    }
    // Admin needs the token; with it, stats and reset work.
    assert_eq!(get(&demo.url("/admin/stats")).status(), 401);
    let admin = reqwest::blocking::Client::new();
    let stats: serde_json::Value = admin
        .get(demo.url("/admin/stats"))
        .bearer_auth("s3cret")
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(stats["store"], "memory");
    assert_eq!(stats["policies"]["default"]["denied"], 1);
    // A reset names the client as it is known, its IP address, never an internal store key.
    let res = admin
        .post(demo.url("/admin/reset/127.0.0.1"))
        .bearer_auth("s3cret")
        .send()
        .unwrap();
    assert_eq!(res.status(), 200);
    let reply: serde_json::Value = res.json().unwrap();
    assert_eq!(reply["reset"], "127.0.0.1");
    // As an API key and as an IP, under each of the three policies.
    for policy in ["default", "expensive", "multi"] {
        assert_eq!(reply["cleared"][policy], 2, "{reply}");
    }
    assert_eq!(get(&demo.url("/api/hello")).status(), 200);
    // /api/expensive: both policies, both reported.
    let res = reqwest::blocking::Client::new()
        .get(demo.url("/api/expensive"))
        .header("x-api-key", "k")
        .send()
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(
        res.headers()["ratelimit-policy"],
        "\"default\";q=3;w=60, \"expensive\";q=5;w=60"
    );
    let status = demo.terminate();
    assert!(status.success(), "clean exit on SIGTERM, got {status}");
}

/// The admin reset reaches what an API key maps to under the demo's own key extractor: the
/// client sending `x-api-key: k1` is admitted again right after `POST /admin/reset/k1`.
#[test]
fn admin_reset_of_an_api_key_admits_that_client_again() {
    let demo = Demo::start(&["--rate", "2/h", "--admin-token", "s3cret"]);
    let client = reqwest::blocking::Client::new();
    let hello = |key: &str| {
        client
            .get(demo.url("/api/hello"))
            .header("x-api-key", key)
            .send()
            .unwrap()
            .status()
    };
    for _ in 0..2 {
        assert_eq!(hello("k1"), 200);
        assert_eq!(hello("k2"), 200);
    }
    assert_eq!(hello("k1"), 429);
    assert_eq!(hello("k2"), 429);
    let wrong = client
        .post(demo.url("/admin/reset/k1"))
        .bearer_auth("s3cre")
        .send()
        .unwrap();
    assert_eq!(wrong.status(), 401);
    assert_eq!(hello("k1"), 429, "a rejected reset reset nothing");
    let res = client
        .post(demo.url("/admin/reset/k1"))
        .bearer_auth("s3cret")
        .send()
        .unwrap();
    assert_eq!(res.status(), 200);
    let reply: serde_json::Value = res.json().unwrap();
    assert_eq!(reply["reset"], "k1");
    assert_eq!(reply["cleared"]["default"], 1, "{reply}");
    assert_eq!(hello("k1"), 200, "the reset client is fresh");
    assert_eq!(hello("k2"), 429, "other clients keep their state");
    // With --key ip an identity that is not an address maps to no client: 404, not a fake 200.
    let ip_demo = Demo::start(&["--key", "ip", "--admin-token", "t"]);
    let res = client
        .post(ip_demo.url("/admin/reset/k1"))
        .bearer_auth("t")
        .send()
        .unwrap();
    assert_eq!(res.status(), 404);
}

/// The `Bearer` scheme is matched without regard to case (RFC 9110 §11.1); the token exactly.
#[test]
fn admin_auth_scheme_is_case_insensitive_and_the_token_exact() {
    let demo = Demo::start(&["--admin-token", "s3cret"]);
    let c = reqwest::blocking::Client::new();
    let stats = |auth: &str| {
        c.get(demo.url("/admin/stats"))
            .header("authorization", auth)
            .send()
            .unwrap()
            .status()
    };
    for good in ["Bearer s3cret", "bearer s3cret", "BEARER s3cret"] {
        assert_eq!(stats(good), 200, "{good}");
    }
    for bad in [
        "Bearer S3CRET",
        "Bearer s3cre",
        "Bearer",
        "Basic s3cret",
        "s3cret",
    ] {
        assert_eq!(stats(bad), 401, "{bad}");
    }
}

#[test]
fn admin_routes_are_404_without_a_token() {
    let demo = Demo::start(&["--key", "ip", "--headers", "legacy"]);
    assert_eq!(get(&demo.url("/admin/stats")).status(), 404);
    let res = get(&demo.url("/api/hello"));
    assert_eq!(res.headers()["x-ratelimit-limit"], "60");
    assert!(res.headers().get("ratelimit").is_none());
}

#[test]
fn bad_flags_exit_2_with_a_message() {
    for args in [
        &["--rate", "0/s"][..],
        &["--key", "fingerprint"],
        &["--fail-mode", "sometimes"],
        &["--trusted-proxy", "10.0.0.0/99"],
        &["--no-such-flag"],
        &["--rate"],
        // An admin token no client could send.
        &["--admin-token", ""],
        &["--admin-token", "two words"],
    ] {
        let out = std::process::Command::new(demo_binary())
            .args(args)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.starts_with("error: "), "{args:?}: {stderr}");
    }
}

#[test]
fn multi_quota_route_checks_every_quota_atomically() {
    let demo = Demo::start(&["--multi-quotas", "2/m,3/h"]);
    let c = reqwest::blocking::Client::new();
    let get_multi = || c.get(demo.url("/api/multi")).send().unwrap();
    let res = get_multi();
    assert_eq!(res.status(), 200);
    assert_eq!(
        res.headers()["ratelimit-policy"],
        "\"multi-2/m\";q=2;w=60, \"multi-3/h\";q=3;w=3600"
    );
    assert_eq!(
        res.headers()["ratelimit"],
        "\"multi-2/m\";r=1;t=30, \"multi-3/h\";r=2;t=1200"
    );
    assert_eq!(get_multi().status(), 200);
    let res = get_multi();
    assert_eq!(res.status(), 429);
    assert_eq!(res.headers()["retry-after"], "30");
    // The denial charged neither quota: the hourly one still has 1 left.
    assert_eq!(
        res.headers()["ratelimit"],
        "\"multi-2/m\";r=0;t=30, \"multi-3/h\";r=1;t=1200"
    );
    // /api/multi is not under the global policy.
    assert!(
        !res.headers()["ratelimit-policy"]
            .to_str()
            .unwrap()
            .contains("default")
    );
}

/// `--tiers`: each identity is limited by its tier's own quota, reported under the tier's name;
/// `--tier-of` and `POST /admin/tier/{identity}/{tier}` place clients, 404 for unknown tiers.
#[test]
fn tiers_give_each_client_its_own_quota_and_move_at_runtime() {
    let demo = Demo::start(&[
        "--tiers",
        "free=3/m,pro=10/m;capacity=20",
        "--tier-of",
        "alice=pro",
        "--admin-token",
        "t",
    ]);
    assert!(
        demo.banner.contains("tiers: free=3/m,pro=10/m;capacity=20"),
        "{}",
        demo.banner
    );
    let c = reqwest::blocking::Client::new();
    let hello = |key: &str| {
        c.get(demo.url("/api/hello"))
            .header("x-api-key", key)
            .send()
            .unwrap()
    };
    let res = hello("alice");
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["ratelimit-policy"], "\"pro\";q=10;w=60");
    assert_eq!(res.headers()["ratelimit"], "\"pro\";r=19;t=6");
    for left in [2, 1, 0] {
        let res = hello("bob");
        assert_eq!(res.status(), 200);
        assert_eq!(res.headers()["ratelimit-policy"], "\"free\";q=3;w=60");
        assert_eq!(
            res.headers()["ratelimit"],
            format!("\"free\";r={left};t=20").as_str()
        );
    }
    assert_eq!(hello("bob").status(), 429);
    let admin = |path: &str| c.post(demo.url(path)).bearer_auth("t").send().unwrap();
    assert_eq!(admin("/admin/tier/bob/gold").status(), 404);
    assert_eq!(
        hello("bob").status(),
        429,
        "an unknown tier changes nothing"
    );
    let res = admin("/admin/tier/bob/pro");
    assert_eq!(res.status(), 200);
    let res = hello("bob");
    assert_eq!(res.status(), 200, "upgraded on the next request");
    assert_eq!(res.headers()["ratelimit"], "\"pro\";r=19;t=6");
    // The quota peek reports the tier too.
    let quota: serde_json::Value = c
        .get(demo.url("/api/quota"))
        .header("x-api-key", "bob")
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(quota["policy"], "pro");
    // Bad flags: an unknown tier in --tier-of, --tier-of without --tiers.
    for args in [
        &["--tiers", "free=3/m", "--tier-of", "alice=pro"][..],
        &["--tier-of", "alice=pro"],
        &["--tiers", "free=3/x"],
    ] {
        let out = std::process::Command::new(demo_binary())
            .args(args)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(!out.stderr.is_empty(), "{args:?}");
    }
}

/// `--metrics-listen`: `GET /metrics` in the Prometheus text format, parsed with a real
/// exposition parser: exact counts per policy and result, and no client identity anywhere.
#[cfg(feature = "metrics")]
#[test]
fn metrics_are_scraped_in_prometheus_format() {
    let demo = Demo::start(&["--rate", "2/m", "--metrics-listen", "127.0.0.1:0"]);
    let metrics_url = demo
        .banner
        .split("metrics: ")
        .nth(1)
        .and_then(|rest| rest.split(')').next())
        .map(|addr| format!("http://{addr}"))
        .unwrap_or_else(|| panic!("no metrics address in {:?}", demo.banner));
    let c = reqwest::blocking::Client::new();
    for _ in 0..3 {
        c.get(demo.url("/api/hello"))
            .header("x-api-key", "sk_live_SECRET")
            .send()
            .unwrap();
    }
    c.get(demo.url("/healthz")).send().unwrap();
    let res = c.get(&metrics_url).send().unwrap();
    assert_eq!(res.status(), 200);
    let text = res.text().unwrap();
    assert!(!text.contains("sk_live_SECRET"), "{text}");
    let lines = text.lines().map(|l| Ok(l.to_owned()));
    let scrape = prometheus_parse::Scrape::parse(lines).expect("valid exposition format");
    let count = |result: &str| {
        scrape
            .samples
            .iter()
            .find(|s| {
                s.metric == "tollgate_requests_total"
                    && s.labels.get("policy") == Some("default")
                    && s.labels.get("result") == Some(result)
            })
            .map(|s| match s.value {
                prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Untyped(v) => v,
                ref other => panic!("{other:?}"),
            })
            .unwrap_or(0.0)
    };
    assert_eq!(count("allowed"), 2.0, "{text}");
    assert_eq!(count("denied"), 1.0, "{text}");
    assert_eq!(count("unlimited"), 1.0, "/healthz is never limited: {text}");
}

/// `/healthz` answers 200 with the store's health as JSON.
#[test]
fn healthz_reports_the_store() {
    let demo = Demo::start(&[]);
    let health: serde_json::Value = get(&demo.url("/healthz")).json().unwrap();
    assert_eq!(health["status"], "ok");
    assert_eq!(health["store"], "memory");
    assert_eq!(health["store_healthy"], true);
}

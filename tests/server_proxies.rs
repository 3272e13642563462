//! tollgate-server behind real proxies: Debian's nginx (`auth_request`) and Caddy
//! (`forward_auth`), each a throwaway process on free loopback ports in front of an upstream
//! of its own, with the snippets the README shows (docs/nginx-tollgate.conf,
//! docs/Caddyfile.tollgate).
#![cfg(feature = "server")]

mod common;

use common::redis::RedisServer;
use common::server::{TollgateServer, get, start_caddy, start_nginx};

fn memory_config(status: u16, quota: &str) -> String {
    format!(
        "[response]\nstatus = {status}\n\n[clients]\ntrusted_proxies = [\"127.0.0.1/32\"]\n\n\
         [[policy]]\nname = \"default\"\nquota = \"{quota}\"\nkey = \"ip\"\n"
    )
}

fn proxy_addr(port: u16) -> std::net::SocketAddr {
    ([127, 0, 0, 1], port).into()
}

#[test]
fn nginx_auth_request_gives_200s_then_429_with_retry_after_and_ratelimit() {
    let tollgate = TollgateServer::start(&memory_config(403, "3/h"));
    let nginx = start_nginx(tollgate.addr);
    let addr = proxy_addr(nginx.port);
    for want in [2, 1, 0] {
        let reply = get(addr, "/app/page?x=1", &[]);
        assert_eq!(reply.status, 200, "{reply:?}");
        assert_eq!(reply.body, "upstream ok\n", "{reply:?}");
        assert_eq!(reply.remaining(), Some(want), "{reply:?}");
        assert_eq!(
            reply.header("ratelimit-policy"),
            Some("\"default\";q=3;w=3600"),
            "{reply:?}"
        );
        assert!(reply.header("retry-after").is_none(), "{reply:?}");
    }
    let denied = get(addr, "/app/page", &[]);
    assert_eq!(denied.status, 429, "{denied:?}");
    assert_eq!(denied.body, "Too Many Requests\n", "{denied:?}");
    let retry: u64 = denied
        .header("retry-after")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("Retry-After: {denied:?}"));
    assert!((1..=1200).contains(&retry), "{denied:?}");
    assert_eq!(denied.remaining(), Some(0), "{denied:?}");
    assert_eq!(
        denied.header("ratelimit-policy"),
        Some("\"default\";q=3;w=3600"),
        "{denied:?}"
    );
}

#[test]
fn nginx_reports_the_original_request_so_policies_match_it() {
    // Only POST /api/ is limited: nginx's X-Original-Method and X-Original-URI decide.
    let config = "[response]\nstatus = 403\n[clients]\ntrusted_proxies = [\"127.0.0.1/32\"]\n\
                  [[policy]]\nname = \"api-writes\"\nquota = \"1/h\"\nmethods = [\"POST\"]\n\
                  path_prefixes = [\"/api/\"]\n";
    let tollgate = TollgateServer::start(config);
    let nginx = start_nginx(tollgate.addr);
    let addr = proxy_addr(nginx.port);
    let post = |path: &str| {
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        );
        common::server::request_raw(addr, head.as_bytes()).expect("POST through nginx")
    };
    assert_eq!(post("/api/items").status, 200);
    assert_eq!(post("/api/items").status, 429);
    // Not limited: another method, another path.
    for _ in 0..3 {
        let reply = get(addr, "/api/items", &[]);
        assert_eq!(reply.status, 200, "{reply:?}");
        assert!(
            reply.header("ratelimit").is_none(),
            "not limited: {reply:?}"
        );
        assert_eq!(post("/other").status, 200);
    }
}

#[test]
fn two_nginx_and_two_tollgate_servers_on_one_redis_share_one_limit_exactly() {
    let redis = RedisServer::start();
    let config = format!(
        "[response]\nstatus = 403\n[store]\nkind = \"redis\"\nurl = \"{}\"\ndeny_cache = false\n\
         [clients]\ntrusted_proxies = [\"127.0.0.1/32\"]\n\
         [[policy]]\nname = \"shared\"\nquota = \"10/h\"\n",
        redis.url()
    );
    let (a, b) = (
        TollgateServer::start(&config),
        TollgateServer::start(&config),
    );
    let (nginx_a, nginx_b) = (start_nginx(a.addr), start_nginx(b.addr));
    let mut admitted = Vec::new();
    let mut denied = 0;
    for i in 0..24 {
        let port = if i % 2 == 0 {
            nginx_a.port
        } else {
            nginx_b.port
        };
        let reply = get(proxy_addr(port), "/", &[]);
        match reply.status {
            200 => admitted.push(reply.remaining().expect("RateLimit on 200")),
            429 => denied += 1,
            other => panic!("unexpected {other}: {reply:?}"),
        }
    }
    admitted.sort_unstable();
    assert_eq!(
        admitted,
        (0..10).collect::<Vec<u64>>(),
        "each remaining value once"
    );
    assert_eq!(denied, 14);
}

#[test]
fn caddy_forward_auth_gives_200s_then_the_429_with_its_fields_as_is() {
    let tollgate = TollgateServer::start(&memory_config(429, "3/h"));
    let caddy = start_caddy(tollgate.addr);
    let addr = proxy_addr(caddy.port);
    for want in [2, 1, 0] {
        let reply = get(addr, "/app", &[]);
        assert_eq!(reply.status, 200, "{reply:?}");
        // Caddy copies the fields onto the upstream request (which echoes them), not onto the
        // client's response.
        let passed = format!("upstream ok, RateLimit: \"default\";r={want};t=");
        assert!(reply.body.starts_with(&passed), "{reply:?}");
    }
    let denied = get(addr, "/app", &[]);
    assert_eq!(denied.status, 429, "{denied:?}");
    let retry: u64 = denied
        .header("retry-after")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("Retry-After: {denied:?}"));
    assert!((1..=1200).contains(&retry), "{denied:?}");
    assert_eq!(denied.remaining(), Some(0), "{denied:?}");
    assert_eq!(
        denied.header("ratelimit-policy"),
        Some("\"default\";q=3;w=3600"),
        "{denied:?}"
    );
    assert!(denied.body.contains("Too Many Requests"), "{denied:?}");
}

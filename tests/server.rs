//! tollgate-server on its own, over real sockets: the sample config as is, config errors,
//! hostile input, reload under load, the header-read and idle timeouts, the connection cap,
//! graceful shutdown and metrics. Every server is a child process on a free loopback port.
#![cfg(feature = "server")]

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::server::{Reply, TollgateServer, get, read_reply, refuse, request_raw, temp_dir};

const LOOPBACK_TRUSTED: &str = "[clients]\ntrusted_proxies = [\"127.0.0.1/32\"]\n";

#[test]
fn the_sample_config_works_as_is() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/tollgate.toml");
    let server = TollgateServer::start_file(&path, temp_dir("sample"));
    let reply = get(server.addr, "/check", &[("X-Real-IP", "192.0.2.1")]);
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(
        reply.header("ratelimit-policy"),
        Some("\"default\";q=60;w=60")
    );
    assert_eq!(reply.remaining(), Some(59), "{reply:?}");
    // Keyed by X-Real-IP (loopback is trusted there): another client has its own count.
    let other = get(server.addr, "/check", &[("X-Real-IP", "192.0.2.2")]);
    assert_eq!(other.remaining(), Some(59), "{other:?}");
    let again = get(server.addr, "/check", &[("X-Real-IP", "192.0.2.1")]);
    assert_eq!(again.remaining(), Some(58), "{again:?}");
    let health = get(server.addr, "/healthz", &[]);
    assert!(health.body.contains("\"store\":\"memory\""), "{health:?}");
    assert!(
        server
            .stdout
            .text()
            .starts_with("tollgate-server listening on http://127.0.0.1:")
    );
}

#[test]
fn a_denial_is_429_with_retry_after_and_the_fields() {
    let config = format!("{LOOPBACK_TRUSTED}[[policy]]\nname = \"p\"\nquota = \"2/m\"\n");
    let server = TollgateServer::start(&config);
    let ip = [("X-Real-IP", "192.0.2.7")];
    assert_eq!(get(server.addr, "/check", &ip).status, 200);
    assert_eq!(get(server.addr, "/check", &ip).status, 200);
    let denied = get(server.addr, "/check", &ip);
    assert_eq!(denied.status, 429, "{denied:?}");
    assert_eq!(denied.header("retry-after"), Some("30"), "{denied:?}");
    assert_eq!(
        denied.header("ratelimit"),
        Some("\"p\";r=0;t=30"),
        "{denied:?}"
    );
    assert_eq!(denied.header("ratelimit-policy"), Some("\"p\";q=2;w=60"));
}

/// Each broken file: the server exits 2, naming file, line, column and setting, and what to
/// write instead.
#[test]
fn config_errors_name_file_line_field_and_the_fix() {
    let policy = "[[policy]]\nname = \"p\"\nquota = \"1/s\"\n";
    let cases: Vec<(String, &str, &str)> = vec![
        (
            "[[policy]]\nname = \"api\"\nquota = \"60/x\"\n".into(),
            ":3:9: policy[0].quota: \"60/x\" is not a quota",
            "write LIMIT/PERIOD such as \"60/m\"",
        ),
        (
            format!("[store]\nkind = \"memcached\"\n{policy}"),
            ":2:8: store.kind: \"memcached\" is not a store kind",
            "\"redis\" (with url = ...)",
        ),
        (
            format!("{policy}quotaa = 3\n"),
            ":4:1: quotaa: unknown field `quotaa`",
            "expected one of",
        ),
        (
            format!("[response]\nstatus = 200\n{policy}"),
            ":2:10: response.status: 200 is not an error status",
            "write 429",
        ),
        (
            format!("[clients]\ntrusted_proxies = [\"10.0.0.0/8\", \"10.0.0.300/32\"]\n{policy}"),
            ":2:34: clients.trusted_proxies[1]: \"10.0.0.300/32\" is not an address range",
            "write e.g. \"10.0.0.0/8\"",
        ),
        (
            format!("[store]\nkind = \"redis\"\n{policy}"),
            ":2:8: store.url: kind = \"redis\" needs the server's address",
            "add url = \"redis://127.0.0.1:6379\"",
        ),
        (
            format!("[store]\nurl = \"redis://127.0.0.1:6379\"\n{policy}"),
            ":2:7: store.url: url is a setting of kind = \"redis\", not of kind = \"memory\"",
            "remove it or change the kind",
        ),
        (
            "listen = \"127.0.0.1:8080\"\n".into(),
            ":2:1: policy: no policy is declared",
            "quota = \"60/m\"",
        ),
        (
            format!("{policy}{policy}"),
            ":5:8: policy[1].name: another policy is already called \"p\"",
            "give each policy its own name",
        ),
        (
            "[[policy]]\nname = \"p\"\nquota = \"1/s\"\nkey = \"cookie\"\n".into(),
            ":4:7: policy[0].key: \"cookie\" is not a key kind",
            "\"header:x-api-key\"",
        ),
        (
            "[[policy]]\nname = \"p\"\nquota = \"1/s\"\nquotas = [\"2/s\"]\n".into(),
            ":4:10: policy[0].quotas: give exactly one of quota, quotas, tiers",
            "this policy has quota and quotas: remove one",
        ),
        (
            format!("[http]\nheader_read_timeout_ms = 0\n{policy}"),
            ":2:26: http.header_read_timeout_ms: 0 is not a timeout",
            "e.g. 5000",
        ),
        (
            format!("listen = \"localhost\"\n{policy}"),
            ":1:10: listen: \"localhost\" is not an address with a port",
            "\"127.0.0.1:8080\"",
        ),
        ("[[policy]\nname = \"p\"\n".into(), ":1:", ""),
        (
            format!("[store]\nkind = \"sentinel\"\n{policy}"),
            ":2:8: store.sentinels: kind = \"sentinel\" needs the sentinels' addresses",
            "add sentinels = [\"10.0.0.5:26379\"",
        ),
        (
            format!("[store]\nkind = \"sentinel\"\nsentinels = [\"10.0.0.5\"]\n{policy}"),
            ":3:13: store.sentinels: each sentinel is host:port",
            "\"10.0.0.5:26379\"",
        ),
        (
            format!(
                "[store]\nkind = \"sentinel\"\nsentinels = [\"10.0.0.5:26379\"]\nmaster = \" \"\n{policy}"
            ),
            ":4:10: store.master: the master name is empty",
            "\"mymaster\" (the default)",
        ),
        (
            format!(
                "[store]\nkind = \"redis\"\nurl = \"redis://127.0.0.1:6379\"\nmaster = \"m\"\n{policy}"
            ),
            ":4:10: store.master: master is a setting of kind = \"sentinel\"",
            "remove it or change the kind",
        ),
    ];
    for (config, located, fix) in cases {
        let (code, stderr, path) = refuse(&config);
        assert_eq!(code, Some(2), "exit code for\n{config}\nstderr: {stderr}");
        let want = format!("error: {}{located}", path.display());
        assert!(
            stderr.contains(&want),
            "for\n{config}\nwanted {want:?} in stderr:\n{stderr}"
        );
        assert!(
            stderr.contains(fix),
            "for\n{config}\nwanted {fix:?} in:\n{stderr}"
        );
        assert!(stderr.contains("did not start"), "{stderr}");
    }
    let (code, stderr, _) = {
        let mut child = std::process::Command::new(common::server::server_binary())
            .args(["--config", "/nonexistent/tollgate.toml"])
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("start");
        let status = child.wait().expect("exit");
        let mut err = String::new();
        child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut err)
            .unwrap();
        (status.code(), err, ())
    };
    assert_eq!(code, Some(2));
    assert!(
        stderr.contains("/nonexistent/tollgate.toml: cannot read the configuration file"),
        "{stderr}"
    );
}

#[test]
fn forwarded_headers_count_only_from_trusted_peers() {
    let policy = "[[policy]]\nname = \"api\"\nquota = \"1/h\"\npath_prefixes = [\"/api/\"]\n";
    // Loopback is not trusted: X-Real-IP and X-Original-URI are the client's own words.
    let untrusted = TollgateServer::start(&format!(
        "[clients]\ntrusted_proxies = [\"10.9.9.9/32\"]\n{policy}"
    ));
    let asked = |server: &TollgateServer, ip: &str| {
        get(
            server.addr,
            "/check/api/x",
            &[("X-Real-IP", ip), ("X-Original-URI", "/elsewhere")],
        )
    };
    assert_eq!(asked(&untrusted, "192.0.2.1").status, 200);
    // Another "client address" from the same peer is the same client.
    let second = asked(&untrusted, "192.0.2.2");
    assert_eq!(second.status, 429, "{second:?}");
    // And an X-Original-URI claiming /api/ from it does not bring a request under the policy.
    let claimed = get(untrusted.addr, "/check", &[("X-Original-URI", "/api/x")]);
    assert_eq!(claimed.status, 200, "{claimed:?}");
    assert!(
        claimed.header("ratelimit").is_none(),
        "not limited: {claimed:?}"
    );

    let trusted = TollgateServer::start(&format!("{LOOPBACK_TRUSTED}{policy}"));
    let by_proxy = |ip: &str, uri: &str| {
        get(
            trusted.addr,
            "/check",
            &[("X-Real-IP", ip), ("X-Original-URI", uri)],
        )
    };
    assert_eq!(by_proxy("192.0.2.1", "/api/x").status, 200);
    assert_eq!(by_proxy("192.0.2.2", "/api/x").status, 200);
    assert_eq!(by_proxy("192.0.2.1", "/api/y?q=1").status, 429);
    let unmatched = by_proxy("192.0.2.1", "/elsewhere");
    assert_eq!(unmatched.status, 200);
    assert!(unmatched.header("ratelimit").is_none(), "{unmatched:?}");
}

#[test]
fn hostile_headers_are_answered_cleanly() {
    let config = format!(
        "{LOOPBACK_TRUSTED}[http]\nmax_header_bytes = 4096\n\
         [[policy]]\nname = \"by-key\"\nquota = \"5/h\"\nkey = \"header-or-ip:x-api-key\"\n\
         [[policy]]\nname = \"api\"\nquota = \"5/h\"\npath_prefixes = [\"/api/\"]\n"
    );
    let server = TollgateServer::start(&config);
    let raw = |extra: &[u8]| {
        let mut head = b"GET /check HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n".to_vec();
        head.extend_from_slice(extra);
        head.extend_from_slice(b"\r\n");
        request_raw(server.addr, &head).expect("an answer")
    };
    // Not UTF-8: a client address that is no address, an API key, an original URI.
    for extra in [
        &b"X-Real-IP: \xff\xfe\r\n"[..],
        b"X-Api-Key: k\xffey\r\n",
        b"X-Original-URI: /api/caf\xc3\xa9\xff\r\n",
        b"X-Original-Method: G\xffT\r\nX-Forwarded-Host: h\xff\r\n",
    ] {
        let reply = raw(extra);
        assert!(matches!(reply.status, 200 | 429), "{reply:?}");
    }
    // The non-UTF-8 original URI is under /api/: matched as bytes.
    let reply = raw(b"X-Real-IP: 192.0.2.9\r\nX-Original-URI: /api/\xff\r\n");
    assert!(
        reply
            .header("ratelimit")
            .is_some_and(|v| v.contains("\"api\"")),
        "{reply:?}"
    );
    // Oversized head: 431, and the server goes on.
    let big = format!("X-Api-Key: {}\r\n", "k".repeat(8192));
    let reply = raw(big.as_bytes());
    assert_eq!(reply.status, 431, "{reply:?}");
    let reply = get(server.addr, "/healthz", &[]);
    assert_eq!(reply.status, 200);
    let reply = get(server.addr, "/nothing-here", &[]);
    assert_eq!(reply.status, 404);
}

/// When a request was answered, and its status or error.
type Answer = (Instant, Result<u16, String>);

fn config_with(load_quota: &str) -> String {
    format!(
        "{LOOPBACK_TRUSTED}\
         [[policy]]\nname = \"keep\"\nquota = \"2/h\"\npath_prefixes = [\"/keep\"]\n\
         [[policy]]\nname = \"load\"\nquota = \"{load_quota}\"\npath_prefixes = [\"/load\"]\n"
    )
}

#[test]
fn reload_under_load_applies_the_new_quota_within_a_second_without_errors() {
    let server = TollgateServer::start(&config_with("5/h"));
    let addr = server.addr;
    let keep = |ip: &str| {
        get(
            addr,
            "/check",
            &[("X-Real-IP", ip), ("X-Original-URI", "/keep/x")],
        )
    };
    assert_eq!(keep("192.0.2.1").status, 200);
    assert_eq!(keep("192.0.2.1").status, 200);
    assert_eq!(keep("192.0.2.1").status, 429);

    // Four clients on keep-alive connections, each its own address.
    let stop = Arc::new(AtomicBool::new(false));
    let log: Arc<Mutex<Vec<Answer>>> = Arc::default();
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let (stop, log) = (Arc::clone(&stop), Arc::clone(&log));
            std::thread::spawn(move || {
                let client = reqwest::blocking::Client::builder()
                    .timeout(Duration::from_secs(5))
                    .build()
                    .unwrap();
                let ip = format!("198.51.100.{t}");
                let url = format!("http://{addr}/check");
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) && n < 20_000 {
                    n += 1;
                    let result = client
                        .get(&url)
                        .header("X-Real-IP", &ip)
                        .header("X-Original-URI", "/load/item")
                        .send()
                        .map(|r| r.status().as_u16())
                        .map_err(|e| e.to_string());
                    log.lock().unwrap().push((Instant::now(), result));
                    std::thread::sleep(Duration::from_millis(2));
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(400));
    let reloaded_at = Instant::now();
    server.reload(&config_with("100000/s"));
    assert!(
        server
            .stderr
            .wait_for("configuration reloaded", Duration::from_secs(1)),
        "{}",
        server.stderr.text()
    );
    std::thread::sleep(Duration::from_millis(1500));
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().unwrap();
    }
    let log = log.lock().unwrap();
    let errors: Vec<_> = log
        .iter()
        .filter(|(_, r)| !matches!(r, Ok(200 | 429)))
        .collect();
    assert!(
        errors.is_empty(),
        "request errors during the reload: {errors:?}"
    );
    let before = log.iter().filter(|(at, _)| *at < reloaded_at).count();
    let denied_before = log
        .iter()
        .filter(|(at, r)| *at < reloaded_at && matches!(r, Ok(429)))
        .count();
    assert!(
        before > 20 && denied_before > 0,
        "{before} requests, {denied_before} denied before"
    );
    let late: Vec<_> = log
        .iter()
        .filter(|(at, _)| *at > reloaded_at + Duration::from_secs(1))
        .collect();
    assert!(
        late.len() > 20,
        "{} requests in the last half second",
        late.len()
    );
    assert!(
        late.iter().all(|(_, r)| matches!(r, Ok(200))),
        "a second after the reload every request is admitted: {:?}",
        late.iter()
            .filter(|(_, r)| !matches!(r, Ok(200)))
            .collect::<Vec<_>>()
    );
    drop(log);
    // The unchanged policy kept its state (its client is still out of requests)...
    let kept = keep("192.0.2.1");
    assert_eq!(kept.status, 429, "{kept:?}");
    assert!(
        server.stderr.text().contains("kept=[\"keep\"]"),
        "{}",
        server.stderr.text()
    );

    // ...and a broken file is rejected with its reason while the running config serves on.
    let broken = config_with("lots");
    server.reload(&broken);
    let reason = format!("{}:9:9: policy[1].quota", server.config.display());
    assert!(
        server.stderr.wait_for(&reason, Duration::from_secs(2)),
        "{}",
        server.stderr.text()
    );
    assert!(server.stderr.text().contains("reload rejected"));
    let load = get(
        addr,
        "/check",
        &[("X-Real-IP", "198.51.100.0"), ("X-Original-URI", "/load")],
    );
    assert_eq!(load.status, 200, "the new quota still serves: {load:?}");
    assert_eq!(keep("192.0.2.1").status, 429);
    assert_eq!(get(addr, "/healthz", &[]).status, 200);
}

/// Connects and sends `bytes`, returning the stream.
fn connect(addr: std::net::SocketAddr, bytes: &[u8]) -> TcpStream {
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream.write_all(bytes).expect("write");
    stream
}

/// How long until the server closes `stream` (reads EOF or a reset), at most `limit`.
fn closed_after(stream: &mut TcpStream, limit: Duration) -> Option<Duration> {
    let start = Instant::now();
    stream
        .set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    let mut buf = [0u8; 1024];
    while start.elapsed() < limit {
        match stream.read(&mut buf) {
            Ok(0) => return Some(start.elapsed()),
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return Some(start.elapsed()),
        }
    }
    None
}

#[test]
fn connections_that_never_finish_their_headers_are_closed_after_the_timeout() {
    let config = format!(
        "{LOOPBACK_TRUSTED}[http]\nheader_read_timeout_ms = 400\nidle_timeout_ms = 30000\n\
         [[policy]]\nname = \"p\"\nquota = \"100/s\"\n"
    );
    let server = TollgateServer::start(&config);
    let started = Instant::now();
    // Fifty that begin a head and never finish it, ten that never send a byte.
    let mut slow: Vec<TcpStream> = (0..50)
        .map(|_| connect(server.addr, b"GET /check HTTP/1.1\r\nHost: x\r\nX-Slow: "))
        .chain((0..10).map(|_| connect(server.addr, b"")))
        .collect();
    // A few dribble one byte every 100 ms, as slowloris does.
    for _ in 0..3 {
        std::thread::sleep(Duration::from_millis(100));
        for s in slow.iter_mut().take(10) {
            let _ = s.write_all(b"a");
        }
    }
    for (i, s) in slow.iter_mut().enumerate() {
        let left = Duration::from_secs(3).saturating_sub(started.elapsed());
        let closed = closed_after(s, left);
        assert!(closed.is_some(), "slow connection {i} still open after 3 s");
    }
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_millis(400),
        "closed before the timeout: {elapsed:?}"
    );
    // Meanwhile and afterwards, whole requests are served.
    assert_eq!(get(server.addr, "/check", &[]).status, 200);
}

#[test]
fn idle_connections_are_closed_after_the_idle_timeout() {
    let config = format!(
        "{LOOPBACK_TRUSTED}[http]\nheader_read_timeout_ms = 10000\nidle_timeout_ms = 500\n\
         [[policy]]\nname = \"p\"\nquota = \"100/s\"\n"
    );
    let server = TollgateServer::start(&config);
    // One that asked once and then idles on its keep-alive connection.
    let mut used = connect(server.addr, b"GET /check HTTP/1.1\r\nHost: x\r\n\r\n");
    used.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let reply: Reply = read_reply(&mut used).expect("first reply");
    assert_eq!(reply.status, 200);
    let closed = closed_after(&mut used, Duration::from_secs(4)).expect("closed when idle");
    assert!(
        closed >= Duration::from_millis(300) && closed < Duration::from_millis(2500),
        "the idle keep-alive connection closed after {closed:?}"
    );
    // And one that never sends anything.
    let mut silent = connect(server.addr, b"");
    let closed = closed_after(&mut silent, Duration::from_secs(4)).expect("closed when idle");
    assert!(
        closed >= Duration::from_millis(300) && closed < Duration::from_millis(2500),
        "the silent connection closed after {closed:?}"
    );
    // A connection that keeps talking stays open past the idle timeout.
    let mut busy = connect(server.addr, b"");
    busy.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    for _ in 0..6 {
        busy.write_all(b"GET /check HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        assert_eq!(read_reply(&mut busy).expect("busy reply").status, 200);
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn idle_keep_alive_connections_outlive_the_header_read_timeout() {
    // Proxies keep idle upstream connections open: only the idle timeout closes them.
    let config = format!(
        "{LOOPBACK_TRUSTED}[http]\nheader_read_timeout_ms = 300\nidle_timeout_ms = 5000\n\
         [[policy]]\nname = \"p\"\nquota = \"100/s\"\n"
    );
    let server = TollgateServer::start(&config);
    let mut conn = connect(server.addr, b"GET /check HTTP/1.1\r\nHost: x\r\n\r\n");
    conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert_eq!(read_reply(&mut conn).expect("first").status, 200);
    std::thread::sleep(Duration::from_millis(900));
    conn.write_all(b"GET /check HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let second = read_reply(&mut conn).expect("the same connection, 900 ms later");
    assert_eq!(second.status, 200);
    // Its next head, begun and never finished, is still timed.
    conn.write_all(b"GET /check HTTP/1.1\r\n").unwrap();
    let closed = closed_after(&mut conn, Duration::from_secs(3)).expect("closed mid-head");
    assert!(closed >= Duration::from_millis(200), "{closed:?}");
}

#[test]
fn connections_beyond_the_cap_wait_until_one_closes() {
    let config = format!(
        "{LOOPBACK_TRUSTED}[http]\nmax_connections = 2\nidle_timeout_ms = 30000\n\
         [[policy]]\nname = \"p\"\nquota = \"100/s\"\n"
    );
    let server = TollgateServer::start(&config);
    // start() asked /healthz on a closed connection: give the server a moment to count it out.
    std::thread::sleep(Duration::from_millis(100));
    let request = b"GET /check HTTP/1.1\r\nHost: x\r\n\r\n";
    let mut open: Vec<TcpStream> = (0..2)
        .map(|_| {
            let mut s = connect(server.addr, request);
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            assert_eq!(read_reply(&mut s).expect("within the cap").status, 200);
            s
        })
        .collect();
    let mut third = connect(server.addr, request);
    third
        .set_read_timeout(Some(Duration::from_millis(700)))
        .unwrap();
    let mut buf = [0u8; 64];
    match third.read(&mut buf) {
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) => {}
        other => panic!("the third connection was served beyond the cap: {other:?}"),
    }
    drop(open.remove(0));
    third
        .set_read_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    let reply = read_reply(&mut third).expect("served once a connection closed");
    assert_eq!(reply.status, 200);
}

#[test]
fn sigterm_stops_gracefully_and_metrics_count_decisions() {
    let config = format!("{LOOPBACK_TRUSTED}[[policy]]\nname = \"counted\"\nquota = \"1/h\"\n");
    let mut server = TollgateServer::start(&config);
    let ip = [("X-Real-IP", "192.0.2.3")];
    assert_eq!(get(server.addr, "/check", &ip).status, 200);
    assert_eq!(get(server.addr, "/check", &ip).status, 429);
    let metrics = get(server.addr, "/metrics", &[]);
    assert_eq!(metrics.status, 200);
    let line = |result: &str| {
        metrics
            .body
            .lines()
            .find(|l| {
                l.starts_with("tollgate_requests_total{")
                    && l.contains("policy=\"counted\"")
                    && l.contains(&format!("result=\"{result}\""))
            })
            .map(|l| l.rsplit(' ').next().unwrap_or_default().to_owned())
    };
    assert_eq!(line("allowed").as_deref(), Some("1"), "{}", metrics.body);
    assert_eq!(line("denied").as_deref(), Some("1"), "{}", metrics.body);
    assert!(
        !metrics.body.contains("192.0.2.3"),
        "no identity in metrics"
    );
    // An idle keep-alive connection does not hold the shutdown up.
    let mut idle = connect(server.addr, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n");
    idle.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert_eq!(read_reply(&mut idle).unwrap().status, 200);
    let asked = Instant::now();
    server.signal("TERM");
    let status = server
        .wait_exit(Duration::from_secs(5))
        .expect("stopped within 5 s");
    assert!(status.success(), "{status:?}");
    assert!(
        asked.elapsed() < Duration::from_secs(3),
        "{:?}",
        asked.elapsed()
    );
    assert!(
        server
            .stdout
            .wait_for("tollgate-server stopped", Duration::from_secs(1))
    );
    assert!(
        TcpStream::connect(server.addr).is_err(),
        "no longer listening"
    );
}

#[test]
fn the_readme_shows_the_sample_config_and_the_tested_snippets_as_they_are() {
    let readme = include_str!("../README.md");
    for (name, text) in [
        (
            "examples/tollgate.toml",
            include_str!("../examples/tollgate.toml"),
        ),
        (
            "docs/nginx-tollgate.conf",
            include_str!("../docs/nginx-tollgate.conf"),
        ),
        (
            "docs/Caddyfile.tollgate",
            include_str!("../docs/Caddyfile.tollgate"),
        ),
    ] {
        assert!(readme.contains(text), "README.md must show {name} as it is");
    }
    assert!(readme.contains(
        "cargo run --features server --bin tollgate-server -- --config examples/tollgate.toml"
    ));
}

#[test]
fn tiers_from_a_trusted_header_or_the_file() {
    let config = format!(
        "{LOOPBACK_TRUSTED}[[policy]]\nname = \"plans\"\ntiers = \"free=2/m,pro=10/m\"\n\
         tier_header = \"x-tier\"\nkey = \"header-or-ip:x-api-key\"\n\
         tier_of = {{ \"key-of-a-pro\" = \"pro\" }}\n"
    );
    let server = TollgateServer::start(&config);
    let policy = |reply: &Reply| reply.header("ratelimit-policy").map(str::to_owned);
    let free = get(server.addr, "/check", &[("X-Api-Key", "k1")]);
    assert_eq!(
        policy(&free).as_deref(),
        Some("\"free\";q=2;w=60"),
        "{free:?}"
    );
    let by_header = get(
        server.addr,
        "/check",
        &[("X-Api-Key", "k2"), ("X-Tier", "pro")],
    );
    assert_eq!(
        policy(&by_header).as_deref(),
        Some("\"pro\";q=10;w=60"),
        "{by_header:?}"
    );
    let by_file = get(server.addr, "/check", &[("X-Api-Key", "key-of-a-pro")]);
    assert_eq!(
        policy(&by_file).as_deref(),
        Some("\"pro\";q=10;w=60"),
        "{by_file:?}"
    );
    let unknown = get(
        server.addr,
        "/check",
        &[("X-Api-Key", "k3"), ("X-Tier", "platinum")],
    );
    assert_eq!(
        policy(&unknown).as_deref(),
        Some("\"free\";q=2;w=60"),
        "{unknown:?}"
    );
    // The key never shows in the logs.
    assert!(!server.stderr.text().contains("key-of-a-pro"));
}

#[test]
fn check_validates_the_file_and_exits() {
    let out = std::process::Command::new(common::server::server_binary())
        .args(["--check", "--config"])
        .arg(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/tollgate.toml"))
        .output()
        .expect("run --check");
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("tollgate.toml: ok (store: memory, policies: default)"),
        "{stdout}"
    );
}

/// `kind = "sentinel"`: two servers find the primary through three real sentinels and share
/// one limit on it.
#[cfg(feature = "redis")]
#[test]
fn a_sentinel_store_shares_one_limit_through_the_primary_the_sentinels_name() {
    let setup = common::redis::SentinelSetup::start(500, 2_000);
    let sentinels: Vec<String> = setup
        .sentinel_addrs()
        .iter()
        .map(|a| format!("\"{a}\""))
        .collect();
    let config = format!(
        "[store]\nkind = \"sentinel\"\nsentinels = [{}]\nmaster = \"{}\"\ndeny_cache = false\n\
         {LOOPBACK_TRUSTED}[[policy]]\nname = \"shared\"\nquota = \"4/h\"\n",
        sentinels.join(", "),
        common::redis::SentinelSetup::MASTER,
    );
    let (a, b) = (
        TollgateServer::start(&config),
        TollgateServer::start(&config),
    );
    let statuses: Vec<u16> = (0..4)
        .flat_map(|_| [a.addr, b.addr])
        .map(|addr| get(addr, "/check", &[("X-Real-IP", "192.0.2.7")]).status)
        .collect();
    assert_eq!(
        statuses,
        [200, 200, 200, 200, 429, 429, 429, 429],
        "one limit across both servers"
    );
    assert_eq!(
        setup.primary.cli(&["DBSIZE"]).trim(),
        "1",
        "the state is on the primary the sentinels name"
    );
}

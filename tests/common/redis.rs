//! Throwaway `redis-server` processes for the Redis store tests: one per test, on a free
//! loopback port (never 6379), killed by pid on drop, its log printed when the test fails.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

const INSTALL_HINT: &str = "redis-server is not on PATH: install it with \
    `apt-get install -y redis-server redis-tools` (or run scripts/test), then run the tests again";

static SEQ: AtomicU32 = AtomicU32::new(0);

fn which(bin: &str) -> bool {
    std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|p| p.join(bin).is_file()))
        .unwrap_or(false)
}

/// Panics with the install hint unless redis-server and redis-cli are installed.
pub fn require_binaries() {
    assert!(
        which("redis-server") && which("redis-cli"),
        "{INSTALL_HINT}"
    );
}

/// A port in 20000..50000 on 127.0.0.1 that is free now, and whose cluster bus port (+10000) is
/// free too.
pub fn free_port() -> u16 {
    let seed =
        std::process::id().wrapping_mul(7919) ^ (SEQ.fetch_add(1, Ordering::Relaxed) * 104_729);
    for i in 0..2_000u32 {
        let port = 20_000 + ((seed.wrapping_add(i.wrapping_mul(7_607))) % 30_000) as u16;
        let ok = TcpListener::bind(("127.0.0.1", port)).is_ok()
            && TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok();
        if ok {
            return port;
        }
    }
    panic!("no free loopback port found in 20000..50000");
}

/// One redis-server process.
pub struct RedisServer {
    pub port: u16,
    dir: PathBuf,
    extra: Vec<String>,
    child: Option<Child>,
}

impl RedisServer {
    /// Starts a standalone server on a free port and waits until it answers `PING`.
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// Starts a server with extra `--flag value` arguments.
    pub fn start_with(extra: &[&str]) -> Self {
        require_binaries();
        let port = free_port();
        let dir = std::env::temp_dir().join(format!(
            "tollgate-redis-{}-{}-{port}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("create a temp dir for redis-server");
        let mut server = Self {
            port,
            dir,
            extra: extra.iter().map(|s| (*s).to_owned()).collect(),
            child: None,
        };
        server.spawn();
        server
    }

    /// The server process's id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join("redis.log")
    }

    fn spawn(&mut self) {
        let port = self.port.to_string();
        let mut cmd = Command::new("redis-server");
        cmd.args([
            "--port",
            &port,
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .args(["--enable-debug-command", "yes", "--protected-mode", "no"])
        .arg("--dir")
        .arg(&self.dir)
        .arg("--logfile")
        .arg(self.log_path())
        .args(&self.extra)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("{INSTALL_HINT} ({e})"));
        self.child = Some(child);
        if !wait_for_ping(self.addr(), Duration::from_secs(10)) {
            self.print_log();
            panic!(
                "redis-server on port {} did not answer PING within 10 s",
                self.port
            );
        }
    }

    /// Kills the server (SIGKILL, by pid) and waits for it to exit.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sends `signal` (e.g. `"STOP"`, `"CONT"`) to the server's pid with `kill`.
    pub fn signal(&self, signal: &str) {
        let pid = self
            .child
            .as_ref()
            .expect("the server runs")
            .id()
            .to_string();
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &pid])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{signal} {pid}");
    }

    /// Starts the server again on the same port (after [`RedisServer::kill`]).
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// Runs `redis-cli -p PORT args...` and returns its stdout.
    pub fn cli(&self, args: &[&str]) -> String {
        cli(self.port, args)
    }

    pub fn print_log(&self) {
        if let Ok(log) = std::fs::read_to_string(self.log_path()) {
            let tail: Vec<&str> = log.lines().rev().take(60).collect();
            eprintln!("---- redis-server :{} log (last lines) ----", self.port);
            for line in tail.iter().rev() {
                eprintln!("{line}");
            }
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.print_log();
        }
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `redis-cli -p port args...`, stdout as text (bounded to 10 s).
pub fn cli(port: u16, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{INSTALL_HINT} ({e})"));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Sends inline `PING` until `+PONG` comes back or `within` passes.
fn wait_for_ping(addr: SocketAddr, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
            let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
            let mut buf = [0u8; 64];
            let answered = s.write_all(b"PING\r\n").is_ok()
                && s.read(&mut buf)
                    .is_ok_and(|n| buf[..n].starts_with(b"+PONG"));
            if answered {
                return true;
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// A real Redis Cluster of three primaries, no replicas.
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
}

impl RedisCluster {
    /// Starts three `--cluster-enabled yes` servers, joins them with
    /// `redis-cli --cluster create ... --cluster-replicas 0 --cluster-yes` and waits until every
    /// node reports `cluster_state:ok`.
    pub fn start() -> Self {
        let nodes: Vec<RedisServer> = (0..3)
            .map(|_| {
                RedisServer::start_with(&[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-node-timeout",
                    "2000",
                ])
            })
            .collect();
        let addrs: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let mut args: Vec<&str> = vec!["--cluster", "create"];
        args.extend(addrs.iter().map(String::as_str));
        args.extend(["--cluster-replicas", "0", "--cluster-yes"]);
        let out = Command::new("redis-cli")
            .args(&args)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("{INSTALL_HINT} ({e})"));
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success() && text.contains("All 16384 slots covered"),
            "redis-cli --cluster create failed: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let ok = nodes
                .iter()
                .all(|n| n.cli(&["CLUSTER", "INFO"]).contains("cluster_state:ok"));
            if ok {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the cluster did not reach cluster_state:ok in 20 s"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        Self { nodes }
    }

    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(RedisServer::url).collect()
    }
}

/// One `redis-server --sentinel` process monitoring `master` at 127.0.0.1:`master_port`, with
/// a config file of its own (sentinels rewrite it) in a temp dir; killed by pid on drop.
pub struct Sentinel {
    pub port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

impl Sentinel {
    /// Starts a sentinel with quorum 2, `down-after-milliseconds` `down_after_ms` and a
    /// failover timeout of `failover_timeout_ms`, and waits until it answers `PING`.
    pub fn start(
        master: &str,
        master_port: u16,
        down_after_ms: u64,
        failover_timeout_ms: u64,
    ) -> Self {
        require_binaries();
        let port = free_port();
        let dir = std::env::temp_dir().join(format!(
            "tollgate-sentinel-{}-{}-{port}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("create a temp dir for the sentinel");
        let conf = dir.join("sentinel.conf");
        let text = format!(
            "port {port}\nbind 127.0.0.1\nprotected-mode no\ndir {dir}\nlogfile {log}\n\
             sentinel monitor {master} 127.0.0.1 {master_port} 2\n\
             sentinel down-after-milliseconds {master} {down_after_ms}\n\
             sentinel failover-timeout {master} {failover_timeout_ms}\n\
             sentinel parallel-syncs {master} 1\n",
            dir = dir.display(),
            log = dir.join("sentinel.log").display(),
        );
        std::fs::write(&conf, text).expect("write sentinel.conf");
        let child = Command::new("redis-server")
            .arg(&conf)
            .arg("--sentinel")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("{INSTALL_HINT} ({e})"));
        let sentinel = Self {
            port,
            dir,
            child: Some(child),
        };
        if !wait_for_ping(
            SocketAddr::from(([127, 0, 0, 1], port)),
            Duration::from_secs(10),
        ) {
            sentinel.print_log();
            panic!("redis-server --sentinel on port {port} did not answer PING within 10 s");
        }
        sentinel
    }

    /// `127.0.0.1:PORT`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// `redis-cli -p PORT args...` against this sentinel.
    pub fn cli(&self, args: &[&str]) -> String {
        cli(self.port, args)
    }

    /// The port of the primary this sentinel names for `master` now.
    pub fn master_port(&self, master: &str) -> Option<u16> {
        let out = self.cli(&["SENTINEL", "get-master-addr-by-name", master]);
        out.lines().nth(1)?.trim().parse().ok()
    }

    /// The value of `field` in `SENTINEL master NAME`.
    pub fn master_field(&self, master: &str, field: &str) -> Option<String> {
        let out = self.cli(&["SENTINEL", "master", master]);
        let lines: Vec<&str> = out.lines().map(str::trim).collect();
        lines
            .iter()
            .position(|l| *l == field)
            .and_then(|i| lines.get(i + 1))
            .map(|v| (*v).to_owned())
    }

    pub fn print_log(&self) {
        if let Ok(log) = std::fs::read_to_string(self.dir.join("sentinel.log")) {
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            eprintln!("---- sentinel :{} log (last lines) ----", self.port);
            for line in tail.iter().rev() {
                eprintln!("{line}");
            }
        }
    }
}

impl Drop for Sentinel {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.print_log();
        }
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A primary, one replica of it and three sentinels (quorum 2) watching it as `mymaster`,
/// ready: the replica is in sync and every sentinel knows the replica and the two other
/// sentinels (so that they can agree on a failover).
pub struct SentinelSetup {
    pub primary: RedisServer,
    pub replica: RedisServer,
    pub sentinels: Vec<Sentinel>,
}

impl SentinelSetup {
    pub const MASTER: &'static str = "mymaster";

    pub fn start(down_after_ms: u64, failover_timeout_ms: u64) -> Self {
        let primary = RedisServer::start();
        let port = primary.port.to_string();
        let replica = RedisServer::start_with(&["--replicaof", "127.0.0.1", &port]);
        let deadline = Instant::now() + Duration::from_secs(15);
        while !replica
            .cli(&["INFO", "replication"])
            .contains("master_link_status:up")
        {
            assert!(
                Instant::now() < deadline,
                "the replica did not sync in 15 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let sentinels: Vec<Sentinel> = (0..3)
            .map(|_| {
                Sentinel::start(
                    Self::MASTER,
                    primary.port,
                    down_after_ms,
                    failover_timeout_ms,
                )
            })
            .collect();
        // Sentinels find each other through hello messages on the primary (every 2 s) and the
        // replica through INFO (every 10 s, sooner at start).
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let ready = sentinels.iter().all(|s| {
                s.master_field(Self::MASTER, "num-other-sentinels")
                    .as_deref()
                    == Some("2")
                    && s.master_field(Self::MASTER, "num-slaves").as_deref() == Some("1")
            });
            if ready {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the sentinels did not see each other and the replica within 20 s"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        Self {
            primary,
            replica,
            sentinels,
        }
    }

    /// `host:port` of each sentinel.
    pub fn sentinel_addrs(&self) -> Vec<String> {
        self.sentinels.iter().map(Sentinel::addr).collect()
    }
}

//! tollgate-server, nginx and Caddy as throwaway child processes on free loopback ports, each
//! in a temp dir of its own, stopped by pid on drop; and a small blocking HTTP client that
//! shows exactly what went over the wire.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

static SEQ: AtomicU32 = AtomicU32::new(0);

/// A fresh temp dir for one process.
pub fn temp_dir(what: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "tollgate-{what}-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create a temp dir");
    dir
}

fn which(bin: &str) -> bool {
    ["/usr/sbin", "/usr/bin", "/sbin", "/bin"]
        .iter()
        .map(PathBuf::from)
        .chain(
            std::env::var_os("PATH")
                .map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
                .unwrap_or_default(),
        )
        .any(|dir| dir.join(bin).is_file())
}

fn find(bin: &str) -> Option<PathBuf> {
    ["/usr/sbin", "/usr/bin"]
        .iter()
        .map(|d| Path::new(d).join(bin))
        .find(|p| p.is_file())
        .or_else(|| which(bin).then(|| PathBuf::from(bin)))
}

/// nginx, or a failure that says how to install it.
pub fn nginx_binary() -> PathBuf {
    find("nginx").unwrap_or_else(|| {
        panic!(
            "nginx is not installed: install it with `apt-get install -y nginx` (or run \
             scripts/test), then run the tests again"
        )
    })
}

/// caddy, or a failure that says how to install it.
pub fn caddy_binary() -> PathBuf {
    find("caddy").unwrap_or_else(|| {
        panic!(
            "caddy is not installed: install it with `apt-get install -y caddy` (or run \
             scripts/test), then run the tests again"
        )
    })
}

/// A port on 127.0.0.1 that is free now.
pub fn free_port() -> u16 {
    super::redis::free_port()
}

/// Output a child wrote, collected by a thread so the child never blocks on a full pipe.
#[derive(Clone, Default)]
pub struct Output(Arc<Mutex<String>>);

impl Output {
    fn collect(
        &self,
        stream: impl Read + Send + 'static,
        first_line: Option<std::sync::mpsc::Sender<String>>,
    ) {
        let out = self.clone();
        std::thread::spawn(move || {
            let mut first_line = first_line;
            for line in BufReader::new(stream).lines() {
                let Ok(line) = line else { break };
                if let Some(tx) = first_line.take() {
                    let _ = tx.send(line.clone());
                }
                let mut text = out.0.lock().unwrap();
                text.push_str(&line);
                text.push('\n');
            }
        });
    }

    /// Everything so far.
    pub fn text(&self) -> String {
        self.0.lock().unwrap().clone()
    }

    /// Waits up to `timeout` for `needle` to appear.
    pub fn wait_for(&self, needle: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.text().contains(needle) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.text().contains(needle)
    }
}

/// A running tollgate-server; killed on drop.
pub struct TollgateServer {
    pub child: Child,
    pub addr: SocketAddr,
    pub config: PathBuf,
    pub stdout: Output,
    pub stderr: Output,
    _dir: PathBuf,
}

/// The binary cargo built for these tests.
pub fn server_binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_tollgate-server"))
}

impl TollgateServer {
    /// Writes `config` to a file and starts the server on it, on any free port.
    pub fn start(config: &str) -> Self {
        let dir = temp_dir("server");
        let path = dir.join("tollgate.toml");
        std::fs::write(&path, config).expect("write the config");
        Self::start_file(&path, dir)
    }

    /// Starts the server on the config file at `path`, on any free port.
    pub fn start_file(path: &Path, dir: PathBuf) -> Self {
        let mut child = Command::new(server_binary())
            .arg("--config")
            .arg(path)
            .args(["--listen", "127.0.0.1:0"])
            .env("RUST_LOG", "info,tollgate::limited=warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start tollgate-server");
        let (stdout, stderr) = (Output::default(), Output::default());
        let (tx, rx) = std::sync::mpsc::channel();
        stdout.collect(child.stdout.take().expect("piped stdout"), Some(tx));
        stderr.collect(child.stderr.take().expect("piped stderr"), None);
        let banner = match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(line) => line,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "tollgate-server printed no banner within 20 s; stderr:\n{}",
                    stderr.text()
                );
            }
        };
        let addr = banner
            .split("http://")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("no address in the banner {banner:?}"));
        let server = Self {
            child,
            addr,
            config: path.to_path_buf(),
            stdout,
            stderr,
            _dir: dir,
        };
        let health = get(server.addr, "/healthz", &[]);
        assert_eq!(health.status, 200, "/healthz once ready: {health:?}");
        server
    }

    /// Sends `signal` (e.g. "HUP", "TERM") to the server.
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.child.id().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{signal} failed");
    }

    /// Rewrites the config file and sends SIGHUP.
    pub fn reload(&self, config: &str) {
        std::fs::write(&self.config, config).expect("rewrite the config");
        self.signal("HUP");
    }

    /// Waits for the process to exit, up to `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for TollgateServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- tollgate-server stderr ---\n{}", self.stderr.text());
        } else {
            let _ = std::fs::remove_dir_all(&self._dir);
        }
    }
}

/// Runs tollgate-server on `config` expecting it to refuse to start; returns its exit code
/// and stderr.
pub fn refuse(config: &str) -> (Option<i32>, String, PathBuf) {
    let dir = temp_dir("bad-config");
    let path = dir.join("bad.toml");
    std::fs::write(&path, config).expect("write the config");
    let mut child = Command::new(server_binary())
        .arg("--config")
        .arg(&path)
        .args(["--listen", "127.0.0.1:0"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start tollgate-server");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(Some(_)) = child.try_wait() {
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("tollgate-server started on a broken config:\n{config}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let out = child.wait_with_output().expect("output");
    let _ = std::fs::remove_dir_all(&dir);
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        path,
    )
}

/// A process started by a proxy helper; killed by pid on drop, its log printed on failure.
pub struct Proxy {
    pub child: Child,
    pub port: u16,
    pub dir: PathBuf,
    log: PathBuf,
    pub output: Output,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        // SIGTERM first: nginx's master stops its workers on it, where a SIGKILL would leave
        // them running as orphans. SIGKILL only if it has not gone within 5 s.
        if let Ok(None) = self.child.try_wait() {
            let pid = self.child.id().to_string();
            let _ = Command::new("kill").args(["-TERM", &pid]).status();
            for _ in 0..100 {
                if let Ok(Some(_)) = self.child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            eprintln!(
                "--- {} log ---\n{log}\n{}",
                self.dir.display(),
                self.output.text()
            );
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

fn running_as_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

/// Waits until something accepts connections on `port`.
pub fn wait_for_port(port: u16, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// The nginx `http` block the tests and the README use, for a proxy on `port` in front of the
/// upstream on `upstream`, asking tollgate-server at `tollgate`.
pub fn nginx_site(port: u16, upstream: u16, tollgate: SocketAddr) -> String {
    let snippet = include_str!("../../docs/nginx-tollgate.conf")
        .replace("127.0.0.1:8080", &tollgate.to_string())
        .replace("127.0.0.1:9000", &format!("127.0.0.1:{upstream}"))
        .replace("listen 80;", &format!("listen 127.0.0.1:{port};"));
    format!(
        "server {{\n    listen 127.0.0.1:{upstream};\n    location / {{ return 200 \"upstream ok\\n\"; }}\n}}\n{snippet}"
    )
}

/// nginx on a free port in front of an upstream of its own, with `auth_request` to tollgate.
pub fn start_nginx(tollgate: SocketAddr) -> Proxy {
    let bin = nginx_binary();
    let dir = temp_dir("nginx");
    let (port, upstream) = (free_port(), free_port());
    let d = dir.display();
    let user = if running_as_root() {
        "user root;\n"
    } else {
        ""
    };
    let conf = format!(
        "{user}worker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n\
         events {{ worker_connections 512; }}\n\
         http {{\n    access_log off;\n    client_body_temp_path {d}/body;\n    \
         proxy_temp_path {d}/proxy;\n    fastcgi_temp_path {d}/fastcgi;\n    \
         uwsgi_temp_path {d}/uwsgi;\n    scgi_temp_path {d}/scgi;\n{}\n}}\n",
        nginx_site(port, upstream, tollgate)
    );
    let conf_path = dir.join("nginx.conf");
    std::fs::write(&conf_path, conf).expect("write nginx.conf");
    let log = dir.join("error.log");
    let child = Command::new(&bin)
        .arg("-p")
        .arg(&dir)
        .arg("-e")
        .arg(&log)
        .arg("-c")
        .arg(&conf_path)
        .args(["-g", "daemon off;"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "cannot start {}: {e}; apt-get install -y nginx",
                bin.display()
            )
        });
    finish_proxy(child, port, dir, log, &[upstream])
}

/// The Caddyfile site the tests and the README use, for a proxy on `port` in front of the
/// upstream on `upstream`, asking tollgate-server at `tollgate`.
pub fn caddy_site(port: u16, upstream: u16, tollgate: SocketAddr) -> String {
    include_str!("../../docs/Caddyfile.tollgate")
        .replace("127.0.0.1:8080", &tollgate.to_string())
        .replace("127.0.0.1:9000", &format!("127.0.0.1:{upstream}"))
        .replace("http://127.0.0.1:80", &format!("http://127.0.0.1:{port}"))
}

/// Caddy on a free port in front of an upstream of its own, with `forward_auth` to tollgate.
/// The upstream answers with the `RateLimit` field it was given, so a test sees what Caddy
/// passed on.
pub fn start_caddy(tollgate: SocketAddr) -> Proxy {
    let bin = caddy_binary();
    let dir = temp_dir("caddy");
    let (port, upstream) = (free_port(), free_port());
    let caddyfile = format!(
        "{{\n    admin off\n    auto_https off\n}}\n\n{}\n\
         http://127.0.0.1:{upstream} {{\n    bind 127.0.0.1\n    \
         respond \"upstream ok, RateLimit: {{http.request.header.RateLimit}}\" 200\n}}\n",
        caddy_site(port, upstream, tollgate)
    );
    let path = dir.join("Caddyfile");
    std::fs::write(&path, caddyfile).expect("write the Caddyfile");
    let log = dir.join("caddy.log");
    let child = Command::new(&bin)
        .args(["run", "--adapter", "caddyfile", "--config"])
        .arg(&path)
        .env("HOME", &dir)
        .env("XDG_DATA_HOME", dir.join("data"))
        .env("XDG_CONFIG_HOME", dir.join("config"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "cannot start {}: {e}; apt-get install -y caddy",
                bin.display()
            )
        });
    finish_proxy(child, port, dir, log, &[upstream])
}

fn finish_proxy(mut child: Child, port: u16, dir: PathBuf, log: PathBuf, more: &[u16]) -> Proxy {
    let output = Output::default();
    output.collect(child.stdout.take().expect("piped stdout"), None);
    output.collect(child.stderr.take().expect("piped stderr"), None);
    let proxy = Proxy {
        child,
        port,
        dir,
        log,
        output,
    };
    for p in std::iter::once(port).chain(more.iter().copied()) {
        assert!(
            wait_for_port(p, Duration::from_secs(15)),
            "the proxy in {} does not listen on {p}",
            proxy.dir.display()
        );
    }
    proxy
}

/// A response as it came over the wire.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Reply {
    /// The first value of `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// `r=` of the `RateLimit` field.
    pub fn remaining(&self) -> Option<u64> {
        let field = self.header("ratelimit")?;
        field
            .split(';')
            .find_map(|p| p.trim().strip_prefix("r="))
            .and_then(|r| r.parse().ok())
    }
}

/// One request with `Connection: close`, raw header bytes allowed.
pub fn request_raw(addr: SocketAddr, head: &[u8]) -> std::io::Result<Reply> {
    let mut stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.write_all(head)?;
    read_reply(&mut stream)
}

/// Reads one response (with a content length, or until close) from `stream`.
pub fn read_reply(stream: &mut TcpStream) -> std::io::Result<Reply> {
    let mut buf = Vec::new();
    let mut byte = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        let n = stream.read(&mut byte)?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("closed after {} bytes", buf.len()),
            ));
        }
        buf.extend_from_slice(&byte[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad status line {status_line:?}")))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_owned(), v.trim().to_owned()))
        .collect();
    let mut body = buf[head_end + 4..].to_vec();
    let length = headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.parse::<usize>().ok());
    match length {
        Some(len) => {
            while body.len() < len {
                let n = stream.read(&mut byte)?;
                if n == 0 {
                    break;
                }
                body.extend_from_slice(&byte[..n]);
            }
            body.truncate(len);
        }
        None => {
            let chunked = headers
                .iter()
                .any(|(n, v)| n.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked"));
            if !chunked {
                stream.read_to_end(&mut body)?;
            } else {
                // Small bodies only: read until the last chunk.
                while !body.windows(5).any(|w| w == b"0\r\n\r\n") {
                    let n = stream.read(&mut byte)?;
                    if n == 0 {
                        break;
                    }
                    body.extend_from_slice(&byte[..n]);
                }
                body = dechunk(&body);
            }
        }
    }
    Ok(Reply {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(line_end) = data.windows(2).position(|w| w == b"\r\n") {
        let size = usize::from_str_radix(String::from_utf8_lossy(&data[..line_end]).trim(), 16)
            .unwrap_or(0);
        if size == 0 {
            break;
        }
        let start = line_end + 2;
        out.extend_from_slice(&data[start..(start + size).min(data.len())]);
        data = &data[(start + size + 2).min(data.len())..];
    }
    out
}

/// `GET path` with extra headers and `Connection: close`.
pub fn get(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Reply {
    let mut head = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n");
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    request_raw(addr, head.as_bytes()).unwrap_or_else(|e| panic!("GET {path} on {addr}: {e}"))
}

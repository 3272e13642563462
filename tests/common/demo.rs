//! Starts the built `examples/demo` binary (or another example) as a child process and stops it
//! by pid.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// The demo binary cargo built for this test run (examples are built before tests run).
pub fn demo_binary() -> PathBuf {
    example_binary("demo")
}

/// The binary of example `name` cargo built for this test run.
pub fn example_binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    // target/<profile>/deps/<test>-<hash> -> target/<profile>/examples/demo
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target/<profile> directory");
    let bin = profile_dir.join("examples").join(name);
    assert!(
        bin.exists(),
        "{} is missing: run the tests with `cargo test` (which builds examples) or \
         `cargo build --all-features --example {name}` first",
        bin.display()
    );
    bin
}

/// A running demo server; killed on drop.
pub struct Demo {
    pub child: Child,
    /// Everything the child wrote to stderr so far (drained by a thread, so that the child
    /// never blocks on a full pipe).
    stderr: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
    pub addr: SocketAddr,
    pub banner: String,
}

impl Demo {
    /// Starts the demo with `args` (plus `--listen 127.0.0.1:0`) and waits for its banner.
    pub fn start(args: &[&str]) -> Self {
        Self::start_example("demo", args)
    }

    /// Starts example `name` with `args` (plus `--listen 127.0.0.1:0`) and waits for the one
    /// line it prints when ready, which holds `http://ADDR`.
    pub fn start_example(name: &str, args: &[&str]) -> Self {
        let mut child = Command::new(example_binary(name))
            .args(["--listen", "127.0.0.1:0"])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start the demo");
        let stdout = child.stdout.take().expect("piped stdout");
        let stderr = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut pipe = child.stderr.take().expect("piped stderr");
        let sink = std::sync::Arc::clone(&stderr);
        std::thread::spawn(move || {
            use std::io::Read as _;
            let mut buf = [0u8; 4096];
            while let Ok(n) = pipe.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        });
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            if let Some(Ok(line)) = lines.next() {
                let _ = tx.send(line);
            }
            // Keep draining so the child never blocks on a full pipe.
            for _ in lines {}
        });
        let banner = match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(line) => line,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                std::thread::sleep(Duration::from_millis(100));
                panic!(
                    "{name} printed no banner within 30 s; stderr:\n{}",
                    String::from_utf8_lossy(&stderr.lock().unwrap())
                );
            }
        };
        let addr = banner
            .split("http://")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("no address in the banner {banner:?}"));
        Self {
            child,
            stderr,
            addr,
            banner,
        }
    }

    /// What the child has written to stderr so far.
    #[allow(dead_code)] // not every test binary that includes this module reads it
    pub fn stderr_text(&self) -> String {
        String::from_utf8_lossy(&self.stderr.lock().unwrap()).into_owned()
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Sends SIGTERM and waits (at most 10 s) for a clean exit; returns the exit status.
    pub fn terminate(mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        for _ in 0..100 {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("the demo did not exit within 10 s of SIGTERM");
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

//! Bytes per stored client: MemoryStore beside governor's keyed limiter, each filled with
//! 1,000,000 distinct IPv4 clients in a fresh child process, measured as resident-set growth.
//!
//! Run: `cargo bench --bench memory`. Linux only (reads /proc/self/statm).
#![allow(missing_docs)] // criterion_group! and the harness generate undocumented items

use std::num::NonZeroU32;
use std::process::Command;

const CLIENTS: u32 = 1_000_000;

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

fn ip(i: u32) -> String {
    let [a, b, c, d] = (0x0a00_0000 + i).to_be_bytes();
    format!("{a}.{b}.{c}.{d}")
}

fn child(which: &str) {
    let names: Vec<String> = (0..CLIENTS).map(ip).collect();
    let key_bytes: usize = names.iter().map(String::len).sum();
    let before = rss_bytes();
    match which {
        "tollgate" => {
            let store = tollgate::MemoryStore::new();
            let policy =
                tollgate::Policy::new("default", "60/m".parse().unwrap_or_else(|e| panic!("{e}")))
                    .unwrap_or_else(|e| panic!("{e}"));
            for n in &names {
                store.check_now(&policy, &tollgate::Key::from(n.as_str()), 1);
            }
            let grown = rss_bytes() - before;
            report(which, grown, key_bytes, store.len());
        }
        _ => {
            let limiter = governor::RateLimiter::keyed(governor::Quota::per_minute(
                NonZeroU32::new(60).unwrap_or(NonZeroU32::MIN),
            ));
            for n in &names {
                let _ = limiter.check_key(n);
            }
            let grown = rss_bytes() - before;
            report(which, grown, key_bytes, limiter.len());
        }
    }
}

fn report(which: &str, grown: u64, key_bytes: usize, stored: usize) {
    let per_key = grown as f64 / f64::from(CLIENTS);
    let key_len = key_bytes as f64 / f64::from(CLIENTS);
    println!(
        "{which:>9}: {stored} clients, {per_key:.1} B per client ({key_len:.1} B of which is the \
         client's address text, {:.1} B overhead)",
        per_key - key_len
    );
}

fn main() {
    if let Ok(which) = std::env::var("TOLLGATE_MEMORY_CHILD") {
        child(&which);
        return;
    }
    let exe = std::env::current_exe().unwrap_or_else(|e| panic!("{e}"));
    for which in ["tollgate", "governor"] {
        let status = Command::new(&exe)
            .env("TOLLGATE_MEMORY_CHILD", which)
            .status()
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(status.success(), "{which} child failed");
    }
}

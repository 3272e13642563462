//! The latency of single decisions on one busy thread while a `MemoryStore` at its cap keeps
//! making room: does keeping the store bounded ever stall a request?
//!
//! The store (`max_keys` 1,000,000) is first filled to its cap with live clients (each charged
//! once under `10/h;capacity=3`, so none is fresh for six minutes). Then one thread serves a
//! flood: each new distinct client (a first request, which inserts a key, so the store must
//! evict to stay bounded) is followed by one request of a known client. Every decision is timed
//! on its own (quanta's TSC clock), and the report gives the percentiles of the known client's
//! decisions, of the new clients', and of all of them, with the ratio p99.99 / p50. The row
//! "known, queued" is the known client's request as a server thread serves it when it arrives
//! while the request before it is being decided: from the start of that one to its own end (a
//! store that sweeps inside a request stalls every request queued behind it, which is how the
//! stall showed over HTTP).
//!
//! A control run follows: the same loop over clients the store already holds, so nothing is
//! inserted or evicted. Its tail is the machine's (interrupts, preemption, the hypervisor), the
//! floor under every row above.
//!
//! Only the public API is used, so the same file runs against older versions of the crate (copy
//! it into a worktree of the older commit) to show the before and after.
//!
//! Run: `scripts/bench-sweep [NEW_CLIENTS] [MAX_KEYS]` (defaults 2,000,000 and 1,000,000).
#![allow(missing_docs)] // a bench binary

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::time::Instant;

use tollgate::{Key, MemoryStore, Policy};

fn client(i: u64) -> Key {
    // Distinct IPv4 addresses from 1.0.0.0 up, as a flood of distinct clients would have.
    Key::from(IpAddr::V4(Ipv4Addr::from(
        0x0100_0000u32.wrapping_add(i as u32),
    )))
}

/// Percentiles of `ns` (sorted here), one row of the table.
fn row(label: &str, ns: &mut [u64]) {
    ns.sort_unstable();
    let at = |q: f64| {
        let i = ((ns.len() as f64 * q).ceil() as usize).clamp(1, ns.len().max(1)) - 1;
        ns.get(i).copied().unwrap_or(0)
    };
    let p50 = at(0.50);
    let p9999 = at(0.9999);
    println!(
        "{label:<16} {:>9} {:>8} {:>8} {:>9} {:>10} {:>11} {:>11} {:>8.1}x",
        ns.len(),
        p50,
        at(0.99),
        at(0.999),
        p9999,
        at(0.99999),
        ns.last().copied().unwrap_or(0),
        p9999 as f64 / p50.max(1) as f64,
    );
}

fn main() -> Result<(), String> {
    // `cargo bench` passes `--bench`; the numbers are ours.
    let numbers: Vec<u64> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let new_clients = numbers.first().copied().unwrap_or(2_000_000).max(1);
    let max_keys = numbers.get(1).copied().unwrap_or(1_000_000).max(16);

    let store = MemoryStore::builder()
        .max_keys(max_keys as usize)
        .build()
        .map_err(|e| e.to_string())?;
    let quota = "10/h;capacity=3".parse().map_err(|e| format!("{e}"))?;
    let policy = Policy::new("flood", quota).map_err(|e| e.to_string())?;
    let known = Key::from("known-client");

    let started = Instant::now();
    for i in 0..max_keys {
        black_box(store.check_now(&policy, &client(i), 1));
    }
    let filled = started.elapsed();
    // The known client: seen before the flood, admitted while it has capacity left, denied
    // from then on (the same quota as everyone).
    black_box(store.check_now(&policy, &known, 1));

    let clock = quanta::Clock::new();
    let timed = |other: &dyn Fn(u64) -> Key, range: std::ops::Range<u64>| {
        let mut known_ns = Vec::with_capacity((range.end - range.start) as usize);
        let mut other_ns = Vec::with_capacity(known_ns.capacity());
        let started = Instant::now();
        for i in range {
            let key = other(i);
            let t0 = clock.raw();
            black_box(store.check_now(&policy, &key, 1));
            let t1 = clock.raw();
            black_box(store.check_now(&policy, &known, 1));
            let t2 = clock.raw();
            other_ns.push(clock.delta_as_nanos(t0, t1));
            known_ns.push(clock.delta_as_nanos(t1, t2));
        }
        (known_ns, other_ns, started.elapsed())
    };
    let header = || {
        println!(
            "{:<16} {:>9} {:>8} {:>8} {:>9} {:>10} {:>11} {:>11} {:>9}",
            "decisions",
            "count",
            "p50 ns",
            "p99 ns",
            "p99.9 ns",
            "p99.99 ns",
            "p99.999 ns",
            "max ns",
            "p99.99/p50"
        );
    };

    // The flood: every other request is a new client, so the store keeps making room.
    let (mut known_ns, mut new_ns, elapsed) = timed(&client, max_keys..max_keys + new_clients);
    println!(
        "max_keys {max_keys}: filled to the cap with live clients in {:.2} s; then {new_clients} \
         new clients, each followed by a known client's request, on one thread, in {:.2} s \
         ({} keys stored at the end)",
        filled.as_secs_f64(),
        elapsed.as_secs_f64(),
        store.len(),
    );
    header();
    let mut all: Vec<u64> = known_ns.iter().chain(&new_ns).copied().collect();
    let mut queued: Vec<u64> = known_ns.iter().zip(&new_ns).map(|(k, n)| k + n).collect();
    row("known client", &mut known_ns);
    row("known, queued", &mut queued);
    row("new clients", &mut new_ns);
    row("every decision", &mut all);

    // The control: the same loop with clients the store already holds (the latest half of the
    // flood, which no eviction has reached), so nothing is inserted and nothing evicted. What
    // remains of the tail here is the machine's (interrupts, preemption), not the store's.
    let end = max_keys + new_clients;
    let recent = (max_keys / 2).min(new_clients).max(1);
    let held = |i: u64| client(end - 1 - i % recent);
    let (mut known_ns, mut held_ns, elapsed) = timed(&held, 0..new_clients);
    println!(
        "control: {new_clients} requests of {recent} clients already stored, each followed by \
         the known client's, in {:.2} s ({} keys stored at the end)",
        elapsed.as_secs_f64(),
        store.len(),
    );
    header();
    let mut all: Vec<u64> = known_ns.iter().chain(&held_ns).copied().collect();
    let mut queued: Vec<u64> = known_ns.iter().zip(&held_ns).map(|(k, n)| k + n).collect();
    row("known client", &mut known_ns);
    row("known, queued", &mut queued);
    row("stored clients", &mut held_ns);
    row("every decision", &mut all);
    Ok(())
}

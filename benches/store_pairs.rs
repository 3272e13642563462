//! MemoryStore beside governor's keyed limiter as paired ratios: for each case (allowed or
//! denied, one hot key or 100,000 keys, one or two threads), every round runs tollgate and
//! governor back to back for a short while, in alternating order, and the report gives the
//! median of the per-round ratios with their range. On a shared machine whose speed drifts
//! from second to second this is steadier than comparing two criterion estimates measured
//! seconds apart.
//!
//! A second table pairs a `BoxStore` around a `MemoryStore` with the `MemoryStore` itself,
//! both through `Store::check_ready` as the layer calls them: the price of choosing the store
//! at runtime.
//!
//! Run: `scripts/bench-store [ROUNDS] [MILLISECONDS_PER_RUN]` (defaults 15 and 200).
#![allow(missing_docs)] // a bench binary

use std::hint::black_box;
use std::num::NonZeroU32;
use std::time::{Duration, Instant};

use governor::{DefaultKeyedRateLimiter, Quota as GovQuota, RateLimiter};
use tollgate::{BoxStore, Key, MemoryStore, Policy, Quota, Store};

const KEYS: usize = 100_000;

struct Pair {
    ours: MemoryStore,
    policy: Policy,
    theirs: DefaultKeyedRateLimiter<String>,
}

/// Both limiters configured alike: `per_second` requests a second with `capacity` at once.
fn pair(per_second: u32, capacity: u32) -> Result<Pair, String> {
    let quota = Quota::per_second(per_second)
        .and_then(|q| q.with_capacity(capacity))
        .map_err(|e| e.to_string())?;
    let rate = NonZeroU32::new(per_second).ok_or("zero rate")?;
    let burst = NonZeroU32::new(capacity).ok_or("zero capacity")?;
    Ok(Pair {
        ours: MemoryStore::new(),
        policy: Policy::new("bench", quota).map_err(|e| e.to_string())?,
        theirs: RateLimiter::keyed(GovQuota::per_second(rate).allow_burst(burst)),
    })
}

/// Nanoseconds per decision with `threads` threads calling `op(i)` for `run` of wall time.
fn per_decision(threads: usize, run: Duration, op: &(dyn Fn(usize) + Sync)) -> f64 {
    let done: u64 = std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|t| {
                s.spawn(move || {
                    let start = Instant::now();
                    let mut i = t * 7_919;
                    let mut n = 0u64;
                    while start.elapsed() < run {
                        for _ in 0..256 {
                            op(i);
                            i = i.wrapping_add(1);
                        }
                        n += 256;
                    }
                    n
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().unwrap_or(0)).sum()
    });
    run.as_nanos() as f64 / done.max(1) as f64
}

/// Runs `a` and `b` back to back `rounds` times, in alternating order, and prints one row:
/// the medians of each one's time per decision and of their per-round ratio, with its range.
fn paired_row(
    label: &str,
    rounds: usize,
    run: Duration,
    threads: usize,
    a: &(dyn Fn(usize) + Sync),
    b: &(dyn Fn(usize) + Sync),
) {
    let (mut ratios, mut a_ns, mut b_ns) = (vec![], vec![], vec![]);
    for round in 0..rounds {
        let (x, y) = if round % 2 == 0 {
            let x = per_decision(threads, run, a);
            (x, per_decision(threads, run, b))
        } else {
            let y = per_decision(threads, run, b);
            (per_decision(threads, run, a), y)
        };
        ratios.push(x / y);
        a_ns.push(x);
        b_ns.push(y);
    }
    for v in [&mut ratios, &mut a_ns, &mut b_ns] {
        v.sort_by(f64::total_cmp);
    }
    println!(
        "{:<34} {:>12.1} {:>12.1} {:>7.2}x {:>6.2}-{:.2}x",
        label,
        median(&a_ns),
        median(&b_ns),
        median(&ratios),
        ratios.first().copied().unwrap_or(f64::NAN),
        ratios.last().copied().unwrap_or(f64::NAN),
    );
}

fn median(sorted: &[f64]) -> f64 {
    match sorted.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

fn main() -> Result<(), String> {
    // `cargo bench` passes `--bench`; the numbers are ours.
    let numbers: Vec<u64> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let rounds = numbers.first().copied().unwrap_or(15).max(1) as usize;
    let run = Duration::from_millis(numbers.get(1).copied().unwrap_or(200).max(10));

    let allowed = pair(1_000_000, 1_000_000_000)?;
    let denied = pair(1, 1)?;
    let names: Vec<String> = (0..KEYS)
        .map(|i| format!("10.{}.{}.{}", i >> 16, (i >> 8) & 255, i & 255))
        .collect();
    let keys: Vec<Key> = names.iter().map(|s| Key::from(s.as_str())).collect();
    for (k, s) in keys.iter().zip(&names) {
        for p in [&allowed, &denied] {
            p.ours.check_now(&p.policy, k, 1);
            let _ = p.theirs.check_key(s);
        }
    }

    println!(
        "{rounds} rounds of {} ms per limiter; tollgate / governor time per decision",
        run.as_millis()
    );
    println!(
        "{:<34} {:>12} {:>12} {:>8} {:>14}",
        "case", "tollgate ns", "governor ns", "median", "range"
    );
    for threads in [1usize, 2] {
        for (path, p) in [("allowed", &allowed), ("denied", &denied)] {
            for (keyset, n) in [("1 hot key", 1usize), ("100k keys", KEYS)] {
                let ours = |i: usize| {
                    let k = &keys[i.wrapping_mul(48_271) % n];
                    black_box(p.ours.check_now(&p.policy, k, 1));
                };
                let theirs = |i: usize| {
                    let k = &names[i.wrapping_mul(48_271) % n];
                    let _ = black_box(p.theirs.check_key(k));
                };
                let label = format!("{path}, {keyset}, {threads} thread(s)");
                paired_row(&label, rounds, run, threads, &ours, &theirs);
            }
        }
    }

    println!();
    println!(
        "{:<34} {:>12} {:>12} {:>8} {:>14}",
        "BoxStore / MemoryStore", "boxed ns", "direct ns", "median", "range"
    );
    for (path, p) in [("allowed", &allowed), ("denied", &denied)] {
        let boxed = BoxStore::new(p.ours.clone());
        let direct = |i: usize| {
            let k = &keys[i.wrapping_mul(48_271) % KEYS];
            black_box(Store::check_ready(&p.ours, &p.policy, k, 1));
        };
        let through_box = |i: usize| {
            let k = &keys[i.wrapping_mul(48_271) % KEYS];
            black_box(boxed.check_ready(&p.policy, k, 1));
        };
        let label = format!("{path}, 100k keys, 1 thread");
        paired_row(&label, rounds, run, 1, &through_box, &direct);
    }
    Ok(())
}

//! MemoryStore decisions beside governor's keyed limiter, in the same criterion groups so the
//! report reads as a ratio: one hot key and 100,000 keys, allowed and denied paths, one and two
//! threads.
//!
//! Run: `cargo bench --bench store`, or `scripts/bench-store` for paired, interleaved ratios
//! (`benches/store_pairs.rs`), which drift less on a shared machine.
#![allow(missing_docs)] // criterion_group! and the harness generate undocumented items

use std::hint::black_box;
use std::num::NonZeroU32;
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use governor::{DefaultKeyedRateLimiter, Quota as GovQuota, RateLimiter};
use tollgate::{Key, MemoryStore, Policy, Quota};

const KEYS: usize = 100_000;

/// Both limiters configured alike: `per_second` requests a second with `capacity` at once.
struct Pair {
    ours: MemoryStore,
    policy: Policy,
    theirs: DefaultKeyedRateLimiter<String>,
}

fn pair(per_second: u32, capacity: u32) -> Pair {
    let quota = Quota::per_second(per_second)
        .unwrap()
        .with_capacity(capacity)
        .unwrap();
    let gov = GovQuota::per_second(NonZeroU32::new(per_second).unwrap())
        .allow_burst(NonZeroU32::new(capacity).unwrap());
    Pair {
        ours: MemoryStore::new(),
        policy: Policy::new("bench", quota).unwrap(),
        theirs: RateLimiter::keyed(gov),
    }
}

fn keys(n: usize) -> (Vec<Key>, Vec<String>) {
    let names: Vec<String> = (0..n)
        .map(|i| format!("10.{}.{}.{}", i >> 16, (i >> 8) & 255, i & 255))
        .collect();
    (names.iter().map(|s| Key::from(s.as_str())).collect(), names)
}

/// Runs `op(i)` `iters` times split across `threads` threads; returns the wall time.
fn run_threads(threads: usize, iters: u64, op: &(dyn Fn(u64) + Sync)) -> Duration {
    let per = iters / threads as u64;
    let start = Instant::now();
    std::thread::scope(|s| {
        for t in 0..threads {
            s.spawn(move || {
                let base = t as u64 * 7_919;
                for i in 0..per {
                    op(base + i);
                }
            });
        }
    });
    start.elapsed()
}

fn bench(c: &mut Criterion) {
    // Allowed forever during the run: 1M/s with a capacity of 10^9.
    let allowed = pair(1_000_000, 1_000_000_000);
    // Denied forever: 1 per second, capacity 1, already used.
    let denied = pair(1, 1);
    let (our_keys, their_keys) = keys(KEYS);
    for (k, s) in our_keys.iter().zip(&their_keys) {
        denied.ours.check_now(&denied.policy, k, 1);
        let _ = denied.theirs.check_key(s);
        allowed.ours.check_now(&allowed.policy, k, 1);
        let _ = allowed.theirs.check_key(s);
    }
    for threads in [1usize, 2] {
        for (path, p) in [("allowed", &allowed), ("denied", &denied)] {
            for (keyset, n) in [("1 hot key", 1usize), ("100k keys", KEYS)] {
                let mut g = c.benchmark_group(format!("{path}/{keyset}/{threads} thread(s)"));
                g.measurement_time(Duration::from_secs(2));
                g.warm_up_time(Duration::from_millis(500));
                g.bench_function("tollgate", |b| {
                    b.iter_custom(|iters| {
                        run_threads(threads, iters, &|i| {
                            let k = &our_keys[(i as usize * 48_271) % n];
                            black_box(p.ours.check_now(&p.policy, k, 1));
                        })
                    })
                });
                g.bench_function("governor", |b| {
                    b.iter_custom(|iters| {
                        run_threads(threads, iters, &|i| {
                            let k = &their_keys[(i as usize * 48_271) % n];
                            let _ = black_box(p.theirs.check_key(k));
                        })
                    })
                });
                g.finish();
            }
        }
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);

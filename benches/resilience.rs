//! The denied path side by side, in one run against one throwaway redis-server (loopback, free
//! port), so every figure reads as a ratio:
//!
//! 1. `denied path`: a DenyCache hit (over RedisStore) vs MemoryStore's denied path vs the plain
//!    RedisStore's denied path (one EVALSHA round trip), one hot key, through `check_ready`
//!    (what the layer calls first) and through the `check` future; and with 100,000 denied keys.
//! 2. `breaker`: MemoryStore alone vs behind a closed CircuitBreaker (the bookkeeping cost), and
//!    an open breaker's fast failure.
//! 3. Store calls per 1,000 flood requests from one client, counted by Redis
//!    (`INFO commandstats`): plain RedisStore vs DenyCache, with a long and a short interval.
//!
//! Run: `cargo bench --features redis --bench resilience`. It ends with a ratio table (mean
//! time per operation over every criterion sample, warm-up included).

#[path = "../tests/common/redis.rs"]
#[allow(dead_code, unreachable_pub)]
mod redis_server;

use std::collections::BTreeMap;
use std::future::Future;
use std::hint::black_box;
use std::pin::pin;
use std::sync::Mutex;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use criterion::Criterion;
use redis_server::RedisServer;
use tollgate::store::redis::RedisStore;
use tollgate::{CircuitBreaker, DenyCache, Key, MemoryStore, Policy, Quota, Store};

const KEYS: usize = 100_000;

/// Mean nanoseconds per operation, per (group, function), over every sample.
static TOTALS: Mutex<BTreeMap<(String, String), (Duration, u64)>> = Mutex::new(BTreeMap::new());

fn note(group: &str, name: &str, elapsed: Duration, iters: u64) -> Duration {
    if let Ok(mut totals) = TOTALS.lock() {
        let e = totals
            .entry((group.to_owned(), name.to_owned()))
            .or_default();
        e.0 += elapsed;
        e.1 += iters;
    }
    elapsed
}

/// Benchmarks a synchronous operation, `op(i)` for the i-th iteration.
fn sync_bench(
    g: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    group: &str,
    name: &str,
    op: impl Fn(u64),
) {
    g.bench_function(name, |b| {
        b.iter_custom(|iters| {
            let t = Instant::now();
            for i in 0..iters {
                op(i);
            }
            note(group, name, t.elapsed(), iters)
        })
    });
}

/// Polls a future that is ready at once (a local decision), as the middleware's first poll does.
fn poll_once<F: Future>(f: F) -> Option<F::Output> {
    let mut f = pin!(f);
    match f.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(out) => Some(out),
        Poll::Pending => None,
    }
}

fn keys(n: usize) -> Vec<Key> {
    (0..n)
        .map(|i| Key::from(format!("10.{}.{}.{}", i >> 16, (i >> 8) & 255, i & 255)))
        .collect()
}

fn evalsha_calls(server: &RedisServer) -> u64 {
    server
        .cli(&["INFO", "commandstats"])
        .lines()
        .find_map(|l| l.strip_prefix("cmdstat_evalsha:calls="))
        .and_then(|rest| rest.split(',').next())
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

fn main() {
    let mut c = Criterion::default()
        .measurement_time(Duration::from_secs(2))
        .warm_up_time(Duration::from_millis(500))
        .configure_from_args();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let server = RedisServer::start();
    let redis = rt.block_on(async {
        RedisStore::builder(&server.url())
            .command_timeout(Duration::from_secs(2))
            .build()
            .await
            .expect("RedisStore builds")
    });
    // Denied forever during the run: 1 per hour, already used.
    let policy = Policy::new("bench", Quota::per_hour(1).unwrap()).unwrap();
    let memory = MemoryStore::new();
    let cache = DenyCache::new(redis.clone());
    let all = keys(KEYS);
    rt.block_on(async {
        for (i, k) in all.iter().enumerate() {
            memory.check_now(&policy, k, 1);
            memory.check_now(&policy, k, 1);
            if i == 0 {
                for _ in 0..2 {
                    cache.check(&policy, k, 1).await.unwrap();
                    redis.check(&policy, k, 1).await.unwrap();
                }
            }
        }
    });
    // 100,000 denied keys in a second cache (over MemoryStore: filling it through Redis would
    // take 200,000 round trips for nothing).
    let big_cache = DenyCache::new(MemoryStore::new()).max_keys(2 * KEYS);
    for k in &all {
        for _ in 0..2 {
            poll_once(big_cache.check(&policy, k, 1));
        }
    }
    assert_eq!(big_cache.len(), KEYS);

    let hot = &all[0];
    let group = "denied path, 1 hot key";
    let mut g = c.benchmark_group(group);
    // What the layer calls first: the synchronous answer, no future at all.
    sync_bench(
        &mut g,
        group,
        "DenyCache<RedisStore> hit, check_ready",
        |_| {
            black_box(cache.check_ready(&policy, hot, 1));
        },
    );
    sync_bench(&mut g, group, "MemoryStore denied, check_ready", |_| {
        black_box(memory.check_ready(&policy, hot, 1));
    });
    // Through the `check` future, polled once.
    sync_bench(&mut g, group, "DenyCache<RedisStore> hit, future", |_| {
        black_box(poll_once(cache.check(&policy, hot, 1)));
    });
    sync_bench(&mut g, group, "MemoryStore denied, future", |_| {
        black_box(poll_once(memory.check(&policy, hot, 1)));
    });
    g.bench_function("RedisStore denied", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let t = Instant::now();
                for _ in 0..iters {
                    black_box(redis.check(&policy, hot, 1).await.ok());
                }
                note(group, "RedisStore denied", t.elapsed(), iters)
            })
        })
    });
    g.finish();

    let group = "denied path, 100k keys";
    let mut g = c.benchmark_group(group);
    let at = |i: u64| &all[(i as usize).wrapping_mul(48_271) % KEYS];
    sync_bench(&mut g, group, "DenyCache hit, check_ready", |i| {
        black_box(big_cache.check_ready(&policy, at(i), 1));
    });
    sync_bench(&mut g, group, "MemoryStore denied, check_ready", |i| {
        black_box(memory.check_ready(&policy, at(i), 1));
    });
    g.finish();

    let group = "breaker";
    let allowed = Policy::new("open", "1000000/s;capacity=1000000000".parse().unwrap()).unwrap();
    let closed = CircuitBreaker::new(MemoryStore::new());
    let plain = MemoryStore::new();
    // An open breaker: its store (nothing listens on 127.0.0.1:1) always fails; three failures
    // open it for an hour.
    let open = rt.block_on(async {
        let store = RedisStore::builder("redis://127.0.0.1:1")
            .command_timeout(Duration::from_millis(20))
            .connect_timeout(Duration::from_millis(20))
            .build()
            .await
            .expect("builds while Redis is unreachable");
        let breaker = CircuitBreaker::new(store)
            .failures(3)
            .cooldown(Duration::from_secs(3_600));
        for _ in 0..3 {
            let _ = breaker.check(&allowed, hot, 1).await;
        }
        breaker
    });
    assert_eq!(open.state(), tollgate::BreakerState::Open);
    let mut g = c.benchmark_group(group);
    sync_bench(&mut g, group, "MemoryStore allowed", |_| {
        black_box(plain.check_ready(&allowed, hot, 1));
    });
    sync_bench(&mut g, group, "CircuitBreaker<MemoryStore> allowed", |_| {
        black_box(closed.check_ready(&allowed, hot, 1));
    });
    sync_bench(&mut g, group, "open breaker fails fast", |_| {
        black_box(open.check_ready(&allowed, hot, 1));
    });
    g.finish();
    c.final_summary();

    // Store calls per 1,000 flood requests from one client, counted by Redis.
    let mut flood = Vec::new();
    for (quota, spacing) in [
        ("5/h", Duration::ZERO),
        ("20/s;capacity=5", Duration::from_millis(1)),
    ] {
        let p = Policy::new("flood", quota.parse::<Quota>().unwrap()).unwrap();
        for (name, cached) in [("RedisStore", false), ("DenyCache<RedisStore>", true)] {
            let key = Key::from(format!("flood-{quota}-{name}"));
            let cache = DenyCache::new(redis.clone());
            let before = evalsha_calls(&server);
            let t = Instant::now();
            rt.block_on(async {
                for _ in 0..1_000 {
                    let d = if cached {
                        cache.check(&p, &key, 1).await
                    } else {
                        redis.check(&p, &key, 1).await
                    };
                    black_box(d.ok());
                    if !spacing.is_zero() {
                        tokio::time::sleep(spacing).await;
                    }
                }
            });
            let elapsed = t.elapsed();
            let calls = evalsha_calls(&server) - before;
            flood.push((quota, spacing, name, calls, elapsed));
        }
    }

    println!("\n== ratios (mean per operation over all samples) ==");
    let totals = TOTALS.lock().map(|t| t.clone()).unwrap_or_default();
    let mean = |g: &str, n: &str| {
        totals
            .get(&(g.to_owned(), n.to_owned()))
            .map(|(d, i)| d.as_nanos() as f64 / (*i).max(1) as f64)
            .unwrap_or(f64::NAN)
    };
    let g = "denied path, 1 hot key";
    let red = mean(g, "RedisStore denied");
    for how in ["check_ready", "future"] {
        let hit = mean(g, &format!("DenyCache<RedisStore> hit, {how}"));
        let mem = mean(g, &format!("MemoryStore denied, {how}"));
        println!(
            "{g}, {how}: DenyCache hit {hit:.1} ns, MemoryStore denied {mem:.1} ns \
             (ratio {:.2}); RedisStore denied {red:.0} ns ({:.0}x the hit)",
            hit / mem,
            red / hit
        );
    }
    let g = "denied path, 100k keys";
    let (hit, mem) = (
        mean(g, "DenyCache hit, check_ready"),
        mean(g, "MemoryStore denied, check_ready"),
    );
    println!(
        "{g}, check_ready: DenyCache hit {hit:.1} ns, MemoryStore denied {mem:.1} ns, \
         ratio {:.2}",
        hit / mem
    );
    let g = "breaker";
    let (plain, closed, open) = (
        mean(g, "MemoryStore allowed"),
        mean(g, "CircuitBreaker<MemoryStore> allowed"),
        mean(g, "open breaker fails fast"),
    );
    println!(
        "{g}: MemoryStore allowed {plain:.1} ns, behind a closed breaker {closed:.1} ns \
         (ratio {:.2}); an open breaker's fast failure {open:.1} ns",
        closed / plain
    );
    println!("store calls per 1,000 flood requests (one client), counted by Redis:");
    for (quota, spacing, name, calls, elapsed) in flood {
        println!(
            "  quota {quota}, one request every {spacing:?}: {name}: {calls} calls in {elapsed:?}"
        );
    }
}

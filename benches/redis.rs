//! RedisStore side by side with its references, in one run against one throwaway redis-server
//! (loopback, free port), so every figure reads as a ratio:
//!
//! 1. Redis CPU per decision (`INFO commandstats` usec_per_call): our script's `evalsha` vs
//!    redis-cell's native `CL.THROTTLE` (when its module is available) vs a bare
//!    `TIME` + `GET` + `SET PX` script (the floor of any Lua GCRA).
//! 2. Decisions/s and p50/p99 latency at 1, 16 and 128 in flight: RedisStore (ConnectionManager),
//!    RedisStore on a deadpool pool, and a bare redis-rs loop sending the same `EVALSHA` with the
//!    same arguments on one multiplexed connection.
//! 3. p50 at 1 in flight vs a plain `INCR` round trip.
//!
//! Run: `scripts/bench-redis` (builds redis-cell into /tmp first), or
//! `REDIS_CELL_SO=/path/libredis_cell.so cargo bench --features redis --bench redis`.
//! Knobs: `BENCH_ROUNDS` (default 3), `BENCH_SECS` per measurement (default 1.0).

#[path = "../tests/common/redis.rs"]
#[allow(dead_code, unreachable_pub)]
mod redis_server;

use std::sync::Arc;
use std::time::{Duration, Instant};

use redis::Value;
use redis::aio::ConnectionManager;
use redis_server::RedisServer;
use tollgate::store::redis::RedisStore;
use tollgate::{Key, Policy, Quota, Store};

const KEYS: usize = 1_000;
const FLOOR_LUA: &str = "local t = redis.call('TIME') \
    local now = tonumber(t[1]) * 1000000 + tonumber(t[2]) \
    local v = tonumber(redis.call('GET', KEYS[1])) or now \
    redis.call('SET', KEYS[1], now + 1, 'PX', 1000) return 1";

/// One way of asking for a decision.
#[derive(Clone)]
enum Client {
    Store(RedisStore),
    Bare {
        conn: ConnectionManager,
        sha: Arc<str>,
        /// The Redis keys, precomputed (a bare loop hashes nothing).
        keys: Arc<Vec<Vec<u8>>>,
        interval: u64,
        capacity: u32,
    },
    Incr(ConnectionManager),
    /// redis-cell's `CL.THROTTLE` on one multiplexed connection.
    Cell(ConnectionManager),
}

struct Run {
    per_sec: f64,
    p50: Duration,
    p99: Duration,
    /// This process's CPU time (user + system) per decision, in microseconds.
    cpu_us: f64,
}

/// This process's user + system CPU time, from /proc (clock ticks of 10 ms; runs are long
/// enough for that to be fine). Zero where /proc is missing.
fn process_cpu() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // After the command name: state is field 0, utime field 11, stime field 12.
    Duration::from_millis((ticks(11) + ticks(12)) * 10)
}

async fn measure(
    client: &Client,
    policy: &Policy,
    keys: &Arc<Vec<Key>>,
    inflight: usize,
    secs: f64,
) -> Run {
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let start = Instant::now();
    let cpu_start = process_cpu();
    let mut tasks = Vec::new();
    for w in 0..inflight {
        let (client, policy, keys) = (client.clone(), policy.clone(), keys.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(4_096);
            let mut i = w * 7;
            // Bounded in time and in count.
            while Instant::now() < deadline && lat.len() < 2_000_000 {
                let k = i % KEYS;
                i += 1;
                let t0 = Instant::now();
                match &client {
                    Client::Store(s) => {
                        s.check(&policy, &keys[k], 1).await.expect("decision");
                    }
                    Client::Bare {
                        conn,
                        sha,
                        keys,
                        interval,
                        capacity,
                    } => {
                        let _: Value = redis::cmd("EVALSHA")
                            .arg(&**sha)
                            .arg(1)
                            .arg(&keys[k])
                            .arg(*interval)
                            .arg(*capacity)
                            .arg(1)
                            .query_async(&mut conn.clone())
                            .await
                            .expect("evalsha");
                    }
                    Client::Cell(conn) => {
                        let _: Value = redis::cmd("CL.THROTTLE")
                            .arg(format!("cell:{k}"))
                            .arg(999_999)
                            .arg(1_000_000)
                            .arg(1)
                            .query_async(&mut conn.clone())
                            .await
                            .expect("cl.throttle");
                    }
                    Client::Incr(conn) => {
                        let _: i64 = redis::cmd("INCR")
                            .arg("bench-incr")
                            .query_async(&mut conn.clone())
                            .await
                            .expect("incr");
                    }
                }
                lat.push(t0.elapsed());
            }
            lat
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    let elapsed = start.elapsed().as_secs_f64();
    let cpu = (process_cpu() - cpu_start).as_secs_f64();
    all.sort_unstable();
    let pct = |p: f64| all[((all.len() as f64 * p) as usize).min(all.len() - 1)];
    Run {
        per_sec: all.len() as f64 / elapsed,
        p50: pct(0.50),
        p99: pct(0.99),
        cpu_us: cpu * 1e6 / all.len() as f64,
    }
}

fn usec_per_call(server: &RedisServer, cmd: &str) -> Option<f64> {
    let stats = server.cli(&["INFO", "commandstats"]);
    stats
        .lines()
        .find(|l| l.starts_with(&format!("cmdstat_{cmd}:")))?
        .split("usec_per_call=")
        .nth(1)?
        .split(',')
        .next()?
        .parse()
        .ok()
}

fn cell_so() -> Option<String> {
    let candidates = [
        std::env::var("REDIS_CELL_SO").ok(),
        Some("/tmp/redis-cell/target/release/libredis_cell.so".to_owned()),
    ];
    candidates
        .into_iter()
        .flatten()
        .find(|p| std::path::Path::new(p).is_file())
}

/// `min-max (median m)` of a set of ratios.
fn range(v: &[f64]) -> String {
    let mut sorted: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if sorted.is_empty() {
        return "n/a".to_owned();
    }
    sorted.sort_by(f64::total_cmp);
    let median = sorted[sorted.len() / 2];
    format!(
        "{:.2}-{:.2} (median {median:.2})",
        sorted[0],
        sorted[sorted.len() - 1]
    )
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` runs this too: keep that short.
    let quick = !std::env::args().any(|a| a == "--bench");
    let rounds: usize = std::env::var("BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if quick { 1 } else { 3 });
    let secs: f64 = std::env::var("BENCH_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if quick { 0.1 } else { 1.0 });
    let so = cell_so();
    let server = match &so {
        Some(path) => RedisServer::start_with(&["--loadmodule", path]),
        None => RedisServer::start(),
    };
    if so.is_none() {
        eprintln!(
            "redis-cell module not found (set REDIS_CELL_SO or run scripts/bench-redis): skipping CL.THROTTLE"
        );
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    if std::env::var("BENCH_ONLY").is_ok_and(|v| v == "group") {
        rt.block_on(group_commit(&server, so.is_some(), rounds, secs));
        return;
    }
    rt.block_on(run(&server, so.is_some(), rounds, secs));
    rt.block_on(group_commit(&server, so.is_some(), rounds, secs));
}

async fn run(server: &RedisServer, cell: bool, rounds: usize, secs: f64) {
    let url = server.url();
    // A quota that admits nearly everything, so every decision takes the write path.
    let quota: Quota = "1000000/s".parse().unwrap();
    let policy = Policy::new("bench", quota).unwrap();
    let keys: Arc<Vec<Key>> = Arc::new(
        (0..KEYS)
            .map(|i| Key::from(format!("client-{i}")))
            .collect(),
    );
    let store = RedisStore::builder(&url)
        .command_timeout(Duration::from_secs(1))
        .build()
        .await
        .unwrap();
    let pool = deadpool_redis::Config::from_url(url.clone())
        .create_pool(Some(deadpool_redis::Runtime::Tokio1))
        .unwrap();
    let pooled = RedisStore::from_pool(pool)
        .command_timeout(Duration::from_secs(1))
        .build()
        .await
        .unwrap();
    let conn = redis::Client::open(url.as_str())
        .unwrap()
        .get_connection_manager()
        .await
        .unwrap();
    let sha = redis::Script::new(include_str!("../lua/gcra.lua"))
        .get_hash()
        .to_owned();
    let bare = Client::Bare {
        conn: conn.clone(),
        sha: sha.into(),
        keys: Arc::new(keys.iter().map(|k| store.redis_key(&policy, k)).collect()),
        interval: quota.emission_interval().as_micros() as u64,
        capacity: quota.capacity(),
    };
    let ours = Client::Store(store.clone());
    let pooled = Client::Store(pooled);
    let incr = Client::Incr(conn.clone());
    let floor = redis::Script::new(FLOOR_LUA);
    let mut admin = conn.clone();

    if let Ok(which) = std::env::var("BENCH_PROFILE") {
        let client = if which == "bare" { &bare } else { &ours };
        let r = measure(client, &policy, &keys, 128, secs).await;
        println!("profile {which}: {:.0}/s cpu {:.1} us", r.per_sec, r.cpu_us);
        return;
    }
    let mut cpu_ratio_cell = Vec::new();
    let mut cpu_ratio_floor = Vec::new();
    let mut cpu_ours = Vec::new();
    let mut tput: Vec<Vec<(f64, f64, f64)>> = vec![Vec::new(); 3];
    let mut incr_gap = Vec::new();
    println!("round | in flight | client | decisions/s | p50 | p99 | client CPU us/decision");
    for round in 0..rounds {
        // 1. Redis CPU per decision, same keys, same count.
        let n = if secs < 0.5 { 2_000 } else { 20_000 };
        let _: () = redis::cmd("CONFIG")
            .arg("RESETSTAT")
            .query_async(&mut admin)
            .await
            .unwrap();
        for i in 0..n {
            store.check(&policy, &keys[i % KEYS], 1).await.unwrap();
        }
        let ours_us = usec_per_call(server, "evalsha").unwrap_or(f64::NAN);
        let _: () = redis::cmd("CONFIG")
            .arg("RESETSTAT")
            .query_async(&mut admin)
            .await
            .unwrap();
        for i in 0..n {
            let _: i64 = floor
                .key(format!("floor:{}", i % KEYS))
                .invoke_async(&mut admin)
                .await
                .unwrap();
        }
        let floor_us = usec_per_call(server, "evalsha").unwrap_or(f64::NAN);
        let cell_us = if cell {
            let _: () = redis::cmd("CONFIG")
                .arg("RESETSTAT")
                .query_async(&mut admin)
                .await
                .unwrap();
            for i in 0..n {
                let _: Value = redis::cmd("CL.THROTTLE")
                    .arg(format!("cell:{}", i % KEYS))
                    .arg(999_999)
                    .arg(1_000_000)
                    .arg(1)
                    .query_async(&mut admin)
                    .await
                    .unwrap();
            }
            usec_per_call(server, "cl.throttle").unwrap_or(f64::NAN)
        } else {
            f64::NAN
        };
        println!(
            "round {round}: Redis CPU per decision: tollgate evalsha {ours_us:.2} us, CL.THROTTLE {cell_us:.2} us, TIME+GET+SET floor {floor_us:.2} us"
        );
        cpu_ours.push(ours_us);
        cpu_ratio_cell.push(ours_us / cell_us);
        cpu_ratio_floor.push(ours_us / floor_us);

        // 2. Throughput and latency, alternating the order per round.
        for (ci, inflight) in [1usize, 16, 128].into_iter().enumerate() {
            let order: Vec<(&str, &Client)> = if round.is_multiple_of(2) {
                vec![("store", &ours), ("bare", &bare), ("pool", &pooled)]
            } else {
                vec![("pool", &pooled), ("bare", &bare), ("store", &ours)]
            };
            let mut got = std::collections::HashMap::new();
            for (name, client) in order {
                let r = measure(client, &policy, &keys, inflight, secs).await;
                println!(
                    "{round} | {inflight} | {name} | {:.0} | {:?} | {:?} | {:.1}",
                    r.per_sec, r.p50, r.p99, r.cpu_us
                );
                got.insert(name, r);
            }
            let (s, b, p) = (&got["store"], &got["bare"], &got["pool"]);
            tput[ci].push((
                s.per_sec / b.per_sec,
                p.per_sec / b.per_sec,
                s.p99.as_secs_f64() / b.p99.as_secs_f64(),
            ));
            if inflight == 1 {
                let i = measure(&incr, &policy, &keys, 1, secs).await;
                println!(
                    "{round} | 1 | INCR | {:.0} | {:?} | {:?}",
                    i.per_sec, i.p50, i.p99
                );
                incr_gap.push(s.p50.as_secs_f64() * 1e6 - i.p50.as_secs_f64() * 1e6);
            }
        }
    }
    println!();
    println!("## Summary over {rounds} round(s), {secs} s per measurement (ranges min-max)");
    println!(
        "Redis CPU per decision, tollgate evalsha: {} us",
        range(&cpu_ours)
    );
    if cell {
        println!(
            "  ratio tollgate / redis-cell CL.THROTTLE: {}x",
            range(&cpu_ratio_cell)
        );
    }
    println!(
        "  ratio tollgate / TIME+GET+SET Lua floor: {}x",
        range(&cpu_ratio_floor)
    );
    for (ci, inflight) in [1, 16, 128].into_iter().enumerate() {
        let s: Vec<f64> = tput[ci].iter().map(|x| x.0).collect();
        let p: Vec<f64> = tput[ci].iter().map(|x| x.1).collect();
        let l: Vec<f64> = tput[ci].iter().map(|x| x.2).collect();
        println!(
            "{inflight:>3} in flight: RedisStore / bare loop decisions/s {}x; deadpool store / bare {}x; RedisStore p99 / bare p99 {}x",
            range(&s),
            range(&p),
            range(&l)
        );
    }
    println!(
        "p50 at 1 in flight, RedisStore minus plain INCR: {} us",
        range(&incr_gap)
    );
    multi_quota(server, &store, &policy, &keys, rounds, secs).await;
}

/// A policy of two quotas (one Lua call over two keys) beside the single-quota policy: Redis
/// CPU per decision and decisions/s at 16 in flight, same store, alternating order per round.
async fn multi_quota(
    server: &RedisServer,
    store: &RedisStore,
    single: &Policy,
    keys: &Arc<Vec<Key>>,
    rounds: usize,
    secs: f64,
) {
    let quotas = [
        "1000000/s".parse::<Quota>().unwrap(),
        "1000000000/d".parse().unwrap(),
    ];
    let multi = Policy::multi("bench-multi", quotas).unwrap();
    let mut admin = redis::Client::open(server.url().as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let ours = Client::Store(store.clone());
    let (mut cpu, mut tput) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        let mut us = Vec::new();
        for policy in [single, &multi] {
            let _: () = redis::cmd("CONFIG")
                .arg("RESETSTAT")
                .query_async(&mut admin)
                .await
                .unwrap();
            for i in 0..5_000 {
                store.check(policy, &keys[i % KEYS], 1).await.unwrap();
            }
            us.push(usec_per_call(server, "evalsha").unwrap_or(f64::NAN));
        }
        let order = if round.is_multiple_of(2) {
            [single, &multi]
        } else {
            [&multi, single]
        };
        let mut per_sec = std::collections::HashMap::new();
        for policy in order {
            let r = measure(&ours, policy, keys, 16, secs).await;
            per_sec.insert(policy.name().to_owned(), r.per_sec);
        }
        println!(
            "round {round}: two quotas vs one: Redis CPU {:.2} vs {:.2} us; decisions/s at 16 in flight {:.0} vs {:.0}",
            us[1], us[0], per_sec["bench-multi"], per_sec["bench"]
        );
        cpu.push(us[1] / us[0]);
        tput.push(per_sec["bench-multi"] / per_sec["bench"]);
    }
    println!(
        "two-quota policy / single-quota policy: Redis CPU per decision {}x, decisions/s at 16 in flight {}x",
        range(&cpu),
        range(&tput)
    );
}

/// Redis's own CPU for the decisions since the last `CONFIG RESETSTAT`: the `INFO
/// commandstats` usec of the commands clients send to decide (`EVALSHA`, `EVAL`,
/// `CL.THROTTLE`). The commands a script calls are listed too, but their time is already part
/// of the script's, so they are not added.
fn commandstats_usec(server: &RedisServer) -> f64 {
    let stats = server.cli(&["INFO", "commandstats"]);
    stats
        .lines()
        .filter(|l| {
            ["cmdstat_evalsha:", "cmdstat_eval:", "cmdstat_cl.throttle:"]
                .iter()
                .any(|c| l.starts_with(c))
        })
        .filter_map(|l| {
            l.split("usec=")
                .nth(1)?
                .split(',')
                .next()?
                .parse::<f64>()
                .ok()
        })
        .sum()
}

/// The redis-server process's user + system CPU time, from /proc (10 ms ticks).
fn server_cpu(server: &RedisServer) -> Duration {
    let Some(pid) = server.pid() else {
        return Duration::ZERO;
    };
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    Duration::from_millis((ticks(11) + ticks(12)) * 10)
}

/// One measurement of the group-commit section: throughput, latency, and Redis CPU per
/// decision two ways (commandstats, and the server process's CPU time).
struct Measured {
    per_sec: f64,
    p50: Duration,
    stats_us: f64,
    server_us: f64,
}

async fn reset_stats(admin: &mut ConnectionManager) {
    let _: () = redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query_async(admin)
        .await
        .unwrap();
}

async fn measured(
    server: &RedisServer,
    admin: &mut ConnectionManager,
    client: &Client,
    policy: &Policy,
    keys: &Arc<Vec<Key>>,
    inflight: usize,
    secs: f64,
) -> Measured {
    reset_stats(admin).await;
    let cpu0 = server_cpu(server);
    let start = Instant::now();
    let r = measure(client, policy, keys, inflight, secs).await;
    let decisions = r.per_sec * start.elapsed().as_secs_f64();
    let server_us = (server_cpu(server) - cpu0).as_secs_f64() * 1e6 / decisions;
    Measured {
        per_sec: r.per_sec,
        p50: r.p50,
        stats_us: commandstats_usec(server) / decisions,
        server_us,
    }
}

/// The Node peer: rate-limiter-flexible's `RateLimiterRedis` on ioredis
/// (`benches/support/rlf_peer.js`), when `node` and the packages are there (`NODE_PATH`, set by
/// scripts/bench-redis).
async fn node_peer(
    server: &RedisServer,
    admin: &mut ConnectionManager,
    inflight: usize,
    secs: f64,
) -> Option<Measured> {
    reset_stats(admin).await;
    let cpu0 = server_cpu(server);
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/benches/support/rlf_peer.js");
    let out = tokio::process::Command::new("node")
        .arg(script)
        .arg(server.port.to_string())
        .arg(inflight.to_string())
        .arg(secs.to_string())
        .arg(KEYS.to_string())
        .output()
        .await
        .ok()?;
    if !out.status.success() {
        eprintln!(
            "the Node peer failed: {}",
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .next()
                .unwrap_or("")
        );
        return None;
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    let decisions = v["decisions"].as_f64()?;
    Some(Measured {
        per_sec: v["per_sec"].as_f64()?,
        p50: Duration::from_secs_f64(v["p50_us"].as_f64()? / 1e6),
        // Includes the peer's connection setup and one warm-up decision: negligible.
        stats_us: commandstats_usec(server) / decisions,
        server_us: (server_cpu(server) - cpu0).as_secs_f64() * 1e6 / decisions,
    })
}

/// Group commit side by side: RedisStore as built by default (batching), the same store with
/// `max_batch(1)` (one script call per decision, the store before group commit),
/// rate-limiter-flexible on ioredis, and redis-cell's `CL.THROTTLE` on one multiplexed
/// connection, at 1, 16 and 128 in flight, the order rotating per round.
async fn group_commit(server: &RedisServer, cell: bool, rounds: usize, secs: f64) {
    let url = server.url();
    let quota: Quota = "1000000/s".parse().unwrap();
    let policy = Policy::new("bench-group", quota).unwrap();
    let keys: Arc<Vec<Key>> = Arc::new(
        (0..KEYS)
            .map(|i| Key::from(format!("client-{i}")))
            .collect(),
    );
    let build = |max_batch: usize| {
        RedisStore::builder(&url)
            .command_timeout(Duration::from_secs(1))
            .max_batch(max_batch)
            .build()
    };
    let batched = Client::Store(
        build(tollgate::store::redis::DEFAULT_MAX_BATCH)
            .await
            .unwrap(),
    );
    let single = Client::Store(build(1).await.unwrap());
    let conn = redis::Client::open(url.as_str())
        .unwrap()
        .get_connection_manager()
        .await
        .unwrap();
    let cell_client = Client::Cell(conn.clone());
    let mut admin = conn;
    let node = std::process::Command::new("node")
        .arg("-e")
        .arg("require('rate-limiter-flexible'); require('ioredis')")
        .status()
        .is_ok_and(|s| s.success());
    if !node {
        eprintln!(
            "node with rate-limiter-flexible and ioredis not found (run scripts/bench-redis, \
             which installs them from npm under /tmp): skipping the Node peer"
        );
    }
    let mut names = vec!["batched", "single"];
    if node {
        names.push("rlf");
    }
    if cell {
        names.push("cell");
    }
    // [in flight][name] -> measurements over the rounds.
    let mut got: Vec<std::collections::HashMap<&str, Vec<Measured>>> =
        (0..3).map(|_| Default::default()).collect();
    println!();
    println!(
        "## Group commit: round | in flight | client | decisions/s | p50 | Redis commandstats us/decision | redis-server CPU us/decision"
    );
    let wanted: Vec<usize> = std::env::var("BENCH_INFLIGHT")
        .ok()
        .map(|v| v.split(',').filter_map(|n| n.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![1, 16, 128]);
    for round in 0..rounds {
        for (ci, inflight) in [1usize, 16, 128].into_iter().enumerate() {
            if !wanted.contains(&inflight) {
                continue;
            }
            let mut order = names.clone();
            order.rotate_left(round % names.len());
            for name in order {
                let m = match name {
                    "batched" => {
                        measured(server, &mut admin, &batched, &policy, &keys, inflight, secs).await
                    }
                    "single" => {
                        measured(server, &mut admin, &single, &policy, &keys, inflight, secs).await
                    }
                    "cell" => {
                        measured(
                            server,
                            &mut admin,
                            &cell_client,
                            &policy,
                            &keys,
                            inflight,
                            secs,
                        )
                        .await
                    }
                    _ => match node_peer(server, &mut admin, inflight, secs).await {
                        Some(m) => m,
                        None => continue,
                    },
                };
                println!(
                    "{round} | {inflight} | {name} | {:.0} | {:?} | {:.2} | {:.2}",
                    m.per_sec, m.p50, m.stats_us, m.server_us
                );
                got[ci].entry(name).or_default().push(m);
            }
        }
    }
    println!();
    println!(
        "## Group commit summary over {rounds} round(s), {secs} s per measurement (min-max (median))"
    );
    let ratios = |ci: usize, a: &str, b: &str, f: fn(&Measured) -> f64| -> Vec<f64> {
        match (got[ci].get(a), got[ci].get(b)) {
            (Some(x), Some(y)) => x.iter().zip(y).map(|(x, y)| f(x) / f(y)).collect(),
            _ => Vec::new(),
        }
    };
    let tput: fn(&Measured) -> f64 = |m| m.per_sec;
    let stats: fn(&Measured) -> f64 = |m| m.stats_us;
    let proc_cpu: fn(&Measured) -> f64 = |m| m.server_us;
    let p50: fn(&Measured) -> f64 = |m| m.p50.as_secs_f64();
    for (ci, inflight) in [1, 16, 128].into_iter().enumerate() {
        if !wanted.contains(&inflight) {
            continue;
        }
        let abs = |name: &str, f: fn(&Measured) -> f64| -> Vec<f64> {
            got[ci]
                .get(name)
                .map(|v| v.iter().map(f).collect())
                .unwrap_or_default()
        };
        println!("{inflight:>3} in flight:");
        for name in &names {
            println!(
                "    {name:>7}: decisions/s {}; commandstats us/decision {}; redis-server CPU us/decision {}",
                range(&abs(name, tput)),
                range(&abs(name, stats)),
                range(&abs(name, proc_cpu))
            );
        }
        println!(
            "    batched / single (today's RedisStore): decisions/s {}x; commandstats us/decision {}x; p50 {}x",
            range(&ratios(ci, "batched", "single", tput)),
            range(&ratios(ci, "batched", "single", stats)),
            range(&ratios(ci, "batched", "single", p50))
        );
        println!(
            "    batched / rate-limiter-flexible: decisions/s {}x",
            range(&ratios(ci, "batched", "rlf", tput))
        );
        println!(
            "    batched / CL.THROTTLE: commandstats us/decision {}x; redis-server CPU us/decision {}x; decisions/s {}x",
            range(&ratios(ci, "batched", "cell", stats)),
            range(&ratios(ci, "batched", "cell", proc_cpu)),
            range(&ratios(ci, "batched", "cell", tput))
        );
    }
}

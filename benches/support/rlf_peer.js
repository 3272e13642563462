// The Node peer of benches/redis.rs: rate-limiter-flexible's RateLimiterRedis on ioredis, the
// limiter many Node services run, deciding at a fixed number of requests in flight against the
// same throwaway redis-server. Started by the bench (NODE_PATH points at the packages that
// scripts/bench-redis installs from the npm registry under /tmp); prints one JSON line.
//
// node rlf_peer.js PORT IN_FLIGHT SECONDS KEYS
'use strict';
const Redis = require('ioredis');
const { RateLimiterRedis } = require('rate-limiter-flexible');

async function main() {
  const [port, inflight, secs, keys] = process.argv.slice(2).map(Number);
  const client = new Redis({ host: '127.0.0.1', port, enableOfflineQueue: true });
  // Admits nearly everything, as the Rust side does: every decision takes the write path.
  const limiter = new RateLimiterRedis({
    storeClient: client,
    points: 1000000,
    duration: 1,
    keyPrefix: 'rlf',
  });
  await limiter.consume('warm-up');
  const deadline = Date.now() + secs * 1000;
  const latencies = [];
  const start = process.hrtime.bigint();
  const worker = async (w) => {
    let i = w * 7;
    // Bounded in time and in count.
    while (Date.now() < deadline && latencies.length < 2000000) {
      const key = `client-${i % keys}`;
      i += 1;
      const t0 = process.hrtime.bigint();
      await limiter.consume(key);
      latencies.push(Number(process.hrtime.bigint() - t0) / 1000);
    }
  };
  await Promise.all(Array.from({ length: inflight }, (_, w) => worker(w)));
  const elapsed = Number(process.hrtime.bigint() - start) / 1e9;
  latencies.sort((a, b) => a - b);
  const pct = (p) => latencies[Math.min(latencies.length - 1, Math.floor(latencies.length * p))];
  console.log(JSON.stringify({
    decisions: latencies.length,
    per_sec: latencies.length / elapsed,
    p50_us: pct(0.5),
    p99_us: pct(0.99),
  }));
  client.disconnect();
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});

-- tollgate GCRA: one decision for one key, in integer microseconds on the Redis server's clock.
-- Source of truth for RedisStore (include_str!). Decides and writes exactly as `step` in
-- src/gcra.rs does; the client then derives the reported numbers (remaining, retry_after,
-- reset_after, next_available) by running that same `step` on the returned `used`.
--
-- KEYS[1]  the state key (holds the TAT in microseconds, as an integer string)
-- ARGV[1]  T, the emission interval in microseconds (integer >= 1)
-- ARGV[2]  B, the capacity (integer >= 1); B*T <= 100 years, so every value below is < 2^53
-- ARGV[3]  n, the cost (integer >= 0)
-- ARGV[4]  optional `now` in microseconds. TESTS ONLY: RedisStore never sends it in production;
--          the shared vector tests use it to replay DESIGN.md section 3 at chosen instants.
--
-- Returns one integer, `used` = max(TAT, now) - now in microseconds, read before this request
-- (0 for a fresh key). Everything else follows from it: the request is allowed iff
-- n <= B and used + n*T <= B*T, which is the only case that writes:
-- SET key (TAT + n*T) PX ceil_ms(used + n*T). There used + n*T >= T >= 1 us, so PX >= 1.
-- A denied, impossible or zero-cost request writes nothing.

local t = tonumber(ARGV[1])
local b = tonumber(ARGV[2])
local n = tonumber(ARGV[3])
local now = tonumber(ARGV[4])
if not now then
  local clock = redis.call('TIME')
  now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
end

-- Integers below 2^53 are exact in Lua doubles: now < 2^53 until the year 2255, B*T is at most
-- 100 years, and used + n*T <= 2*B*T whenever it is computed, so every sum below is exact and
-- math.floor((x + 999) / 1000) is the exact ceil_ms(x).
local tat = tonumber(redis.call('GET', KEYS[1])) or 0
if tat < now then
  tat = now
end
local used = tat - now
if n > 0 and n <= b then
  local new_used = used + n * t
  if new_used <= b * t then
    redis.call('SET', KEYS[1], tat + n * t, 'PX', math.floor((new_used + 999) / 1000))
  end
end
return used

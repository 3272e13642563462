-- tollgate GCRA: one decision for one key, in integer microseconds on the Redis server's clock.
-- Mirrors src/gcra.rs `step` line by line. Source of truth for RedisStore (include_str!).
--
-- KEYS[1]  the state key (holds the TAT in microseconds, as an integer string)
-- ARGV[1]  T, the emission interval in microseconds (integer >= 1)
-- ARGV[2]  B, the capacity (integer >= 1); B*T <= 100 years, so every value below is < 2^53
-- ARGV[3]  n, the cost (integer >= 0)
-- ARGV[4]  optional `now` in microseconds. TESTS ONLY: RedisStore never sends it in production;
--          the shared vector tests use it to replay DESIGN.md section 3 at chosen instants.
--
-- Returns {outcome, remaining, used, retry}: outcome 0 allowed, 1 denied, 2 impossible (cost
-- above capacity); remaining = floor((B*T - used) / T); used = reset_after in microseconds;
-- retry = retry_after in microseconds on a denial, else 0. Only integers cross the wire.
-- Writes only when a request is allowed with n > 0: SET key new_tat PX ceil_ms(reset_after),
-- and reset_after >= n*T >= 1 microsecond there, so PX is never 0.

local t = tonumber(ARGV[1])
local b = tonumber(ARGV[2])
local n = tonumber(ARGV[3])
local now = tonumber(ARGV[4])
if not now then
  local clock = redis.call('TIME')
  now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
end
local tolerance = t * b

-- Divisions: for integers 0 <= x, 1 <= d with x + d < 2^53 (here <= 2 * 100 years in us), the
-- double quotient x / d is within half an ulp of the true one and cannot round across an
-- integer, so math.floor(x / d) is the exact integer quotient.
local tat = tonumber(redis.call('GET', KEYS[1])) or 0
if tat < now then
  tat = now
end
local used = tat - now
if n > b then
  local left = tolerance - used
  if left < 0 then
    left = 0
  end
  return {2, math.floor(left / t), used, 0}
end
local new_used = used + n * t
if new_used <= tolerance then
  if n > 0 then
    redis.call('SET', KEYS[1], tat + n * t, 'PX', math.floor((new_used + 999) / 1000))
  end
  return {0, math.floor((tolerance - new_used) / t), new_used, 0}
end
local left = tolerance - used
if left < 0 then
  left = 0
end
return {1, math.floor(left / t), used, new_used - tolerance}

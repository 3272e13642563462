-- tollgate GCRA over several quotas: one atomic decision for one client under a policy of N
-- quotas (e.g. 10/s AND 1000/d), in integer microseconds on the Redis server's clock. The
-- request is admitted only if every quota admits it; then every quota is charged, otherwise
-- none is. Mirrors `step_all` in src/gcra.rs, as lua/gcra.lua mirrors `step`.
--
-- KEYS[i]        the state key of quota i (all share one hash tag, so one cluster slot)
-- ARGV[2i-1]     T_i, quota i's emission interval in microseconds (integer >= 1)
-- ARGV[2i]       B_i, quota i's capacity (integer >= 1); B_i*T_i <= 100 years
-- ARGV[2N+1]     n, the cost (integer >= 0)
-- ARGV[2N+2]     optional `now` in microseconds. TESTS ONLY, as in gcra.lua.
--
-- Returns an array of N integers: used_i = max(TAT_i, now) - now before this request. The
-- client derives every reported number from them with the same `step_all`. Writes happen only
-- when n > 0 and every quota admits: SET key_i (TAT_i + n*T_i) PX ceil_ms(used_i + n*T_i),
-- where used_i + n*T_i >= T_i >= 1 us, so PX >= 1. All values stay below 2^53 (see gcra.lua).

local count = #KEYS
local n = tonumber(ARGV[2 * count + 1])
local now = tonumber(ARGV[2 * count + 2])
if not now then
  local clock = redis.call('TIME')
  now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
end

local used = {}
local tats = {}
local admit = n > 0
for i = 1, count do
  local t = tonumber(ARGV[2 * i - 1])
  local b = tonumber(ARGV[2 * i])
  local tat = tonumber(redis.call('GET', KEYS[i])) or 0
  if tat < now then
    tat = now
  end
  tats[i] = tat
  used[i] = tat - now
  if n > b or used[i] + n * t > b * t then
    admit = false
  end
end
if admit then
  for i = 1, count do
    local t = tonumber(ARGV[2 * i - 1])
    local new_used = used[i] + n * t
    redis.call('SET', KEYS[i], tats[i] + n * t, 'PX', math.floor((new_used + 999) / 1000))
  end
end
return used

-- tollgate GCRA: one atomic decision for one client under a policy of N >= 1 quotas (e.g. 10/s
-- AND 1000/d), in integer microseconds on the Redis server's clock. Source of truth for
-- RedisStore (include_str!). The request is admitted only if every quota admits it; then every
-- quota is charged, otherwise none is. Decides and writes exactly as `step` (N = 1) and
-- `step_all` (N > 1) in src/gcra.rs do; the client derives the reported numbers (remaining,
-- retry_after, reset_after, next_available) by running that same function on the reply.
--
-- KEYS[i]        the state key of quota i, holding its TAT in microseconds as an integer
--                string: `<prefix>:{tag}:<policy>` for N = 1, `<prefix>:{tag}:<policy>#<i-1>`
--                for N > 1 (all with one hash tag, so one cluster slot)
-- ARGV[2i-1]     T_i, quota i's emission interval in microseconds (integer >= 1)
-- ARGV[2i]       B_i, quota i's capacity (integer >= 1); B_i*T_i <= 100 years, so every value
--                below is < 2^53
-- ARGV[2N+1]     n, the cost (integer >= 0)
-- ARGV[2N+2]     optional `now` in microseconds. TESTS ONLY: RedisStore never sends it in
--                production; the conformance kit uses it to replay DESIGN.md section 3 at
--                chosen instants.
--
-- Returns used_i = max(TAT_i, now) - now in microseconds, read before this request (0 for a
-- fresh key): for N = 1 one integer, for N > 1 an array of N integers. Everything else follows
-- from them: the request is allowed iff n <= B_i and used_i + n*T_i <= B_i*T_i for every i,
-- which (with n > 0) is the only case that writes: SET key_i (TAT_i + n*T_i)
-- PX ceil_ms(used_i + n*T_i) for every i. There used_i + n*T_i >= T_i >= 1 us, so PX >= 1.
-- A denied, impossible or zero-cost request writes nothing.
--
-- Integers below 2^53 are exact in Lua doubles: now < 2^53 until the year 2255, B*T is at most
-- 100 years, and used + n*T <= 2*B*T whenever it is computed, so every sum below is exact and
-- math.floor((x + 999) / 1000) is the exact ceil_ms(x).

local count = #KEYS
local n = tonumber(ARGV[2 * count + 1])
local now = tonumber(ARGV[2 * count + 2])
if not now then
  local clock = redis.call('TIME')
  now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
end

-- One quota, the common case, without tables and with an integer reply: through the general
-- loop below it cost 1.14-1.27x the Redis CPU per call of this branch's former script of its
-- own (1.06-1.23x with only the reply an array); this branch costs 0.90-1.02x. Figures and
-- method beside `decide` in src/store/redis/mod.rs.
if count == 1 then
  local t = tonumber(ARGV[1])
  local b = tonumber(ARGV[2])
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

-- tollgate GCRA, group commit: M independent decisions in one script call, on one reading of the
-- Redis server's clock. Source of truth for RedisStore's batches (include_str!). Each decision
-- is exactly one call of gcra.lua at that instant: same reads, same admission rule, same writes,
-- same reply numbers. Decisions run in the order given, each seeing the writes of the ones before
-- it, so two decisions on one key in one batch are decided one after the other, as two calls
-- would be.
--
-- KEYS           the state keys of every decision, in order: q_j keys for decision j (its
--                policy's quotas, as for gcra.lua)
-- ARGV, per decision j, in order:
--   q_j          how many quotas (and keys) it has, 1 to 8
--   n_j          its cost (integer >= 0; 0 is a peek)
--   T, B         q_j pairs: each quota's emission interval in microseconds (>= 1) and capacity
--                (>= 1), B*T <= 100 years, so every value below is < 2^53
--
-- Returns one flat array with one integer per key, in KEYS order: used = max(TAT, now) - now in
-- microseconds, read before that decision (0 for a fresh key). The client splits it q_j at a
-- time and reads each part as it reads a gcra.lua reply. No injected clock: tests that replay
-- fixed instants go through gcra.lua.
--
-- The arithmetic (exact in Lua doubles below 2^53) and the writes are those of gcra.lua:
-- SET key (TAT + n*T) PX ceil_ms(used + n*T) for every quota of an admitted decision with
-- n > 0; a denied, impossible or zero-cost decision writes nothing.

local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
local out = {}
local tats = {}
local k = 1
local a = 1
local last = #ARGV
while a <= last do
  local q = tonumber(ARGV[a])
  local n = tonumber(ARGV[a + 1])
  if q == 1 then
    local t = tonumber(ARGV[a + 2])
    local b = tonumber(ARGV[a + 3])
    local key = KEYS[k]
    local tat = tonumber(redis.call('GET', key)) or 0
    if tat < now then
      tat = now
    end
    local used = tat - now
    if n > 0 and n <= b then
      local new_used = used + n * t
      if new_used <= b * t then
        redis.call('SET', key, tat + n * t, 'PX', math.floor((new_used + 999) / 1000))
      end
    end
    out[k] = used
    k = k + 1
    a = a + 4
  else
    local admit = n > 0
    for i = 0, q - 1 do
      local t = tonumber(ARGV[a + 2 + 2 * i])
      local b = tonumber(ARGV[a + 3 + 2 * i])
      local tat = tonumber(redis.call('GET', KEYS[k + i])) or 0
      if tat < now then
        tat = now
      end
      tats[i] = tat
      local used = tat - now
      out[k + i] = used
      if n > b or used + n * t > b * t then
        admit = false
      end
    end
    if admit then
      for i = 0, q - 1 do
        local t = tonumber(ARGV[a + 2 + 2 * i])
        local new_used = out[k + i] + n * t
        redis.call('SET', KEYS[k + i], tats[i] + n * t, 'PX', math.floor((new_used + 999) / 1000))
      end
    end
    k = k + q
    a = a + 2 + 2 * q
  end
end
return out

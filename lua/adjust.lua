-- tollgate GCRA adjustment: charge a client unconditionally, or give units back, after the
-- fact, on every quota of a policy, atomically; in integer microseconds on the Redis server's
-- clock. Source of truth for RedisStore::adjust (include_str!). Adjusts exactly as `adjust`
-- (and `adjust_all`) in src/gcra.rs do; the client derives the reported numbers by peeking at
-- the returned state with that same module.
--
-- KEYS[i]        the state key of quota i, as for gcra.lua (one hash tag, so one cluster slot)
-- ARGV[i]        T_i, quota i's emission interval in microseconds (integer >= 1)
-- ARGV[N+1]      delta, a signed integer number of units: > 0 charges delta*T_i whatever the
--                state (the client may go into debt), < 0 gives back -delta*T_i, never below
--                a fresh state (TAT = now); 0 changes nothing
-- ARGV[N+2]      the most debt one quota may hold, in microseconds (gcra::MAX_DEBT_MICROS)
-- ARGV[N+3]      optional `now` in microseconds. TESTS ONLY, as for gcra.lua.
--
-- Returns an array of N integers: used_i = TAT_i - now after the adjustment (0 = fresh).
-- Writes only what changed: SET key_i (now + used_i) PX ceil_ms(used_i) while used_i > 0, DEL
-- key_i when a refund made it fresh (PX is never 0).
--
-- Exactness: used_i before the adjustment is at most max_debt (< 2^53), and it is only
-- compared with, or clamped to, values below 2^53 (a huge delta*T_i rounds, but then the clamp
-- to 0 or to max_debt decides, exactly as the saturating arithmetic of src/gcra.rs).

local count = #KEYS
local delta = tonumber(ARGV[count + 1])
local max_debt = tonumber(ARGV[count + 2])
local now = tonumber(ARGV[count + 3])
if not now then
  local clock = redis.call('TIME')
  now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
end

local result = {}
for i = 1, count do
  local t = tonumber(ARGV[i])
  local tat = tonumber(redis.call('GET', KEYS[i])) or 0
  if tat < now then
    tat = now
  end
  local used = tat - now
  local new_used = used
  if delta > 0 then
    new_used = used + delta * t
    local cap = max_debt
    if used > cap then
      cap = used
    end
    if new_used > cap then
      new_used = cap
    end
  elseif delta < 0 and used > 0 then
    new_used = used + delta * t
    if new_used < 0 then
      new_used = 0
    end
  end
  if new_used ~= used then
    if new_used > 0 then
      redis.call('SET', KEYS[i], now + new_used, 'PX', math.floor((new_used + 999) / 1000))
    else
      redis.call('DEL', KEYS[i])
    end
  end
  result[i] = new_used
end
return result

-- tollgate GCRA, group commit: M independent decisions in one script call, on one reading of the
-- Redis server's clock. Source of truth for RedisStore's batches (include_str!). Each decision
-- is exactly one call of gcra.lua at that instant: same reads, same admission rule, same writes,
-- same reply numbers. Decisions run in the order given, each seeing the writes of the ones before
-- it, so two decisions on one key in one batch are decided one after the other, as two calls
-- would be.
--
-- KEYS           the state keys of every decision, in order: q keys for a decision under a
--                policy of q quotas (laid out as for gcra.lua)
-- ARGV[1]        P, how many distinct policies the batch uses; then for each policy p = 0..P-1:
--   q_p          its number of quotas, 1 to 8
--   T, B         q_p pairs: each quota's emission interval in microseconds (>= 1) and capacity
--                (>= 1), B*T <= 100 years, so every value below is < 2^53
-- then one argument per decision, in order: p * 2^32 + n, its policy's index and its cost n
--                (integer >= 0; 0 is a peek), one number so that a decision costs Redis one
--                argument to parse
--
-- Returns one flat array with one integer per key, in KEYS order: used = max(TAT, now) - now in
-- microseconds, read before that decision (0 for a fresh key). The client splits it q_j at a
-- time and reads each part as it reads a gcra.lua reply. No injected clock: tests that replay
-- fixed instants go through gcra.lua.
--
-- The arithmetic (exact in Lua doubles below 2^53) and the writes are those of gcra.lua:
-- SET key (TAT + n*T) PX ceil_ms(used + n*T) for every quota of an admitted decision with
-- n > 0; a denied, impossible or zero-cost decision writes nothing. Three things differ in how,
-- not in what, to save Redis CPU per decision (each redis.call costs about as much as the
-- GCRA itself):
-- - One MGET (per 500 keys) reads every key before the first decision; a key that an earlier
--   decision of the batch charged is read from that decision's result instead.
-- - Writes wait for the end: one SET per key charged, with its last TAT. PX is ceil_ms of that
--   TAT minus now, exactly what the last charge's own SET would have written, so the stored
--   value and expiry are those of the one-call-per-decision sequence. All writes come after
--   all reads, so an OOM refusal (at a script's first write) fails the batch before any write.
-- - MGET reads a key of another type (written there by someone else) as absent, where GET
--   fails with WRONGTYPE. Such a key is written with NX, which refuses it: the batch then fails
--   with a WRONGTYPE error, as a decision alone would, and the keys written before it in this
--   loop stay charged (at-least-once, as under timeouts). Never a silent overwrite.

local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])

local count = #KEYS
local stored
if count <= 500 then
  stored = redis.call('MGET', unpack(KEYS))
else
  stored = {}
  for first = 1, count, 500 do
    local part = redis.call('MGET', unpack(KEYS, first, math.min(first + 499, count)))
    for i = 1, #part do
      stored[first + i - 1] = part[i]
    end
  end
end

-- The policies: qs[p] quotas, starting at ARGV index at[p].
local qs = {}
local at = {}
local a = 2
for p = 0, tonumber(ARGV[1]) - 1 do
  qs[p] = tonumber(ARGV[a])
  at[p] = a + 1
  a = a + 1 + 2 * qs[p]
end

local latest = {} -- key -> TAT charged by an earlier decision of this batch
local dirty = {}  -- keys to write, in the order of their first charge
local absent = {} -- key -> true when MGET found nothing there
local out = {}
local tats = {}
local k = 1
local last = #ARGV
while a <= last do
  local code = tonumber(ARGV[a])
  local p = math.floor(code / 4294967296)
  local n = code - p * 4294967296
  local q = qs[p]
  local first = at[p]
  if q == 1 then
    local t = tonumber(ARGV[first])
    local b = tonumber(ARGV[first + 1])
    local key = KEYS[k]
    local tat = latest[key] or tonumber(stored[k]) or 0
    if tat < now then
      tat = now
    end
    local used = tat - now
    if n > 0 and n <= b and used + n * t <= b * t then
      if not latest[key] then
        dirty[#dirty + 1] = key
        absent[key] = not stored[k]
      end
      latest[key] = tat + n * t
    end
    out[k] = used
    k = k + 1
  else
    local admit = n > 0
    for i = 0, q - 1 do
      local t = tonumber(ARGV[first + 2 * i])
      local b = tonumber(ARGV[first + 1 + 2 * i])
      local tat = latest[KEYS[k + i]] or tonumber(stored[k + i]) or 0
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
        local key = KEYS[k + i]
        if not latest[key] then
          dirty[#dirty + 1] = key
          absent[key] = not stored[k + i]
        end
        latest[key] = tats[i] + n * tonumber(ARGV[first + 2 * i])
      end
    end
    k = k + q
  end
  a = a + 1
end

-- Integers as text with %d (exact below 2^53): cheaper for Redis than converting a Lua number
-- argument itself, which it does with %.17g.
local format = string.format
for i = 1, #dirty do
  local key = dirty[i]
  local tat = latest[key]
  local px = format('%d', math.floor((tat - now + 999) / 1000))
  if absent[key] then
    if not redis.call('SET', key, format('%d', tat), 'PX', px, 'NX') then
      return redis.error_reply('WRONGTYPE Operation against a key holding the wrong kind of value')
    end
  else
    redis.call('SET', key, format('%d', tat), 'PX', px)
  end
end
return out

-- release_waiting.lua: make every batch that waits for one reason due now.
--
-- KEYS[1] schedule  ZSET   batch id -> due ms; the released entries become due now
-- KEYS[2] reasons   HASH   batch id -> what it waits for (read)
-- KEYS[3] nudge     LIST   wakes a coalescer when something was released
-- ARGV[1] the reason (e.g. "credentials": a probe passed, or a worker started with a key)
--
-- Guarantees: only entries waiting for that reason move, and only earlier. Returns how
-- many batches were released.
local now = now_ms()
local reasons = redis.call('HGETALL', KEYS[2])
local released = 0
for i = 1, #reasons, 2 do
  if reasons[i + 1] == ARGV[1] then
    local due = redis.call('ZSCORE', KEYS[1], reasons[i])
    if due and tonumber(due) > now then
      redis.call('ZADD', KEYS[1], now, reasons[i])
      released = released + 1
    end
  end
end
if released > 0 then
  nudge(KEYS[3])
end
return released

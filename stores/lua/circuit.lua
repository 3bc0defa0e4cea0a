-- circuit.lua: open or close the credentials circuit of a workspace's budget.
--
-- KEYS[1] limiter  HASH  "circuit" -> why posting stopped (HTTP 401/403/404 and Braze's
--                        message), "circuit_since" (ms), "paused_until" (ms: the next
--                        probe) and "pause_reason", shared with acquire_token.lua
-- ARGV[1] "open" | "close"   ARGV[2] reason (open)   ARGV[3] probe interval (ms, open)
--
-- Guarantees: while the circuit is open no worker posts, except one probe per interval
-- (acquire_token.lua grants it); the first opening's time is kept across re-openings, so
-- status can say since when. Closing removes the pause with the circuit. The key does not
-- expire while the circuit is open. Returns 1 if the state changed, else 0.
local now = now_ms()
if ARGV[1] == 'open' then
  local changed = 0
  if redis.call('HEXISTS', KEYS[1], 'circuit') == 0 then
    redis.call('HSET', KEYS[1], 'circuit_since', now)
    changed = 1
  end
  redis.call('HSET', KEYS[1], 'circuit', ARGV[2], 'pause_reason', ARGV[2],
    'paused_until', string.format('%.3f', now + tonumber(ARGV[3])))
  redis.call('PERSIST', KEYS[1])
  return changed
end
if redis.call('HEXISTS', KEYS[1], 'circuit') == 1 then
  redis.call('HDEL', KEYS[1], 'circuit', 'circuit_since', 'paused_until', 'pause_reason')
  return 1
end
return 0

-- observe_rate_limit.lua: bring the shared budget in step with what Braze says is left.
--
-- KEYS[1] limiter  HASH  "tat" (ms) as in acquire_token.lua; "paused_until" (ms) and
--                        "pause_reason" when pausing
-- ARGV[1] X-RateLimit-Remaining   ARGV[2] X-RateLimit-Reset (ms since the epoch)
-- ARGV[3] interval (ms)  ARGV[4] tolerance (ms)  ARGV[5] margin (requests kept in reserve
-- for our own requests still on their way)   ARGV[6] window (ms)
-- ARGV[7] "pause" to pause every worker until the reset (after a 429), else "observe"
-- ARGV[8] pause reason (with "pause")
--
-- Guarantees: the budget only ever yields here, never grows: when Braze reports fewer
-- requests left before its window resets than the limiter would still grant by then
-- (another client of the workspace is spending it), the theoretical arrival time moves so
-- that no more than that many are granted before the reset. A 429 pauses every worker
-- sharing the key until the reset. Reset times in the past or more than two windows ahead
-- are ignored as untrustworthy. Returns 1 if the budget yielded or paused, else 0.
local now = now_ms_exact()
local reset = tonumber(ARGV[2])
if reset <= now or reset > now + 2 * tonumber(ARGV[6]) then
  return 0
end
if ARGV[7] == 'pause' then
  local paused = tonumber(redis.call('HGET', KEYS[1], 'paused_until') or '0')
  if reset > paused then
    redis.call('HSET', KEYS[1], 'paused_until', string.format('%.3f', reset),
      'pause_reason', ARGV[8])
  end
  redis.call('PEXPIRE', KEYS[1], math.ceil(reset - now + 2 * tonumber(ARGV[6])))
  return 1
end
local interval = tonumber(ARGV[3])
local allowed = tonumber(ARGV[1]) - tonumber(ARGV[5])
local floor = reset - allowed * interval + tonumber(ARGV[4])
local tat = tonumber(redis.call('HGET', KEYS[1], 'tat') or '0')
if tat < now then
  tat = now
end
if floor > tat then
  redis.call('HSET', KEYS[1], 'tat', string.format('%.3f', floor))
  redis.call('PEXPIRE', KEYS[1], math.ceil(floor - now + 2 * tonumber(ARGV[6])))
  return 1
end
return 0

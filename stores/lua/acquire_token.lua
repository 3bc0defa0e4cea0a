-- acquire_token.lua: reserve one request from the workspace's shared rate budget.
--
-- KEYS[1] limiter      HASH  "tat" -> theoretical arrival time (ms): the budget is spent up
--                            to here; "paused_until" (ms) and "pause_reason" after a 429
-- KEYS[2] credentials  HASH  the deployment's credentials circuit (circuit.lua): which
--                            key's workspace Braze refuses, and its next probe ("probe_at")
-- ARGV[1] interval (ms between requests at the sustained rate)
-- ARGV[2] tolerance (ms: burst - 1 intervals)   ARGV[3] longest wait worth reserving (ms)
-- ARGV[4] expiry of the key when idle (ms)   ARGV[5] credentials probe interval (ms)
-- ARGV[6] this budget's workspace id (endpoint host + a hash of the key)
-- ARGV[7] 0 for a bulk request; for a live one, the interval of the live lane's own limit
--         (ms: interval / (1 - bulk floor share)), kept in "live_tat" of the same hash
-- ARGV[8] how long after a bulk request live still keeps to its own limit (ms); a bulk
--         request notes its time in "bulk_at"
-- ARGV[9] while bulk asks: how far ahead live may reserve turns of its own limit (ms);
--         refused live callers are spaced by "live_queue_tat"
--
-- Lanes: the caller passes a shorter ARGV[3] for bulk, so bulk never reserves turns
-- further ahead than that and a live request's turn comes at most that long after now;
-- while bulk has asked for a turn lately, a live request must also fit the live lane's
-- own limit, so live never spends more than 1 - the floor share of the budget and bulk
-- keeps the rest; without bulk, live may spend it all. While bulk asks, live also reserves
-- its own limit's turns at most ARGV[9] ahead (a live flood goes back to the schedule
-- rather than holding the budget two seconds ahead): the shared turns then stay within
-- bulk's reach, so a bulk caller finds the share live leaves.
--
-- A generic cell rate algorithm with reservations: the caller that is granted a request
-- is told how long to wait before sending it, so nobody spins or polls. Sends granted this
-- way satisfy: in any interval of length W there are at most burst + W / interval of them,
-- which the limiter sizes to stay under Braze's limit for every sliding window. Every
-- worker process and both API versions share the key, and the clock is Redis's.
-- While the credentials circuit names this workspace's key, nothing is granted but one
-- probe per probe interval: the first caller after "probe_at", which is pushed on at once.
-- While it names another key, requests are granted as usual and marked "check": this key
-- may work (a rotation), and its first success closes the circuit for everyone.
-- Returns {1, wait ms, send time ms, "probe" | "check" | "", ""} (granted: send after the
-- wait) or {0, wait ms, "", "", why} (not granted, nothing reserved; why: "paused" after a
-- 429, "credentials" for the next probe, "budget" when the turn is further than ARGV[3], or
-- a live turn of its own limit further than ARGV[9] while bulk asks: then the wait is when
-- to ask again, a place in the queue of refused callers).
local now = now_ms_exact()
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local paused = tonumber(redis.call('HGET', KEYS[1], 'paused_until') or '0')
if paused > now then
  return {0, math.ceil(paused - now), '', '', 'paused'}
end
local refused = redis.call('HMGET', KEYS[2], 'workspace', 'probe_at')
local check = ''
if refused[1] then
  if refused[1] == ARGV[6] then
    local probe_at = tonumber(refused[2] or '0')
    if probe_at > now then
      return {0, math.ceil(probe_at - now), '', '', 'credentials'}
    end
    redis.call('HSET', KEYS[2], 'probe_at', string.format('%.3f', now + tonumber(ARGV[5])))
    return {1, 0, string.format('%.3f', now), 'probe', ''}
  end
  check = 'check'
end
local tat = tonumber(redis.call('HGET', KEYS[1], 'tat') or '0')
if tat < now then
  tat = now
end
local wait = tat - tolerance - now
local live_interval = tonumber(ARGV[7])
local live_tat = 0
local floor_applies = false
if live_interval > 0 then
  -- Live keeps to its share only while bulk is asking for turns: alone, it may have all.
  local bulk_at = tonumber(redis.call('HGET', KEYS[1], 'bulk_at') or '0')
  floor_applies = now - bulk_at <= tonumber(ARGV[8])
  if floor_applies then
    live_tat = math.max(tonumber(redis.call('HGET', KEYS[1], 'live_tat') or '0'), now)
    local own = live_tat - tolerance - now
    local horizon = tonumber(ARGV[9])
    if own > horizon then
      -- Live's own share is reserved that far already: ask again when it is within reach,
      -- the refused live callers one live interval apart.
      local queued = math.max(tonumber(redis.call('HGET', KEYS[1], 'live_queue_tat') or '0'),
        live_tat)
      redis.call('HSET', KEYS[1], 'live_queue_tat', string.format('%.3f', queued + live_interval))
      local back = math.max(queued - tolerance - horizon / 2 - now, own - horizon)
      return {0, math.ceil(back), '', '', 'budget'}
    end
    wait = math.max(wait, own)
  end
else
  redis.call('HSET', KEYS[1], 'bulk_at', string.format('%.3f', now))
end
if wait < 0 then
  wait = 0
end
local reach = tonumber(ARGV[3])
if wait > reach then
  -- Not granted: say when a turn will be within reach, counting the callers refused
  -- before this one ("queue_tat": one interval each), so refused batches come back one
  -- interval apart, each when its turn is half its reach away, rather than all at once
  -- to be refused again (a backfill's batches in flight churning through the schedule).
  local queued = math.max(tonumber(redis.call('HGET', KEYS[1], 'queue_tat') or '0'), tat)
  redis.call('HSET', KEYS[1], 'queue_tat', string.format('%.3f', queued + interval))
  local back = math.max(queued - tolerance - reach / 2 - now, wait - reach)
  return {0, math.ceil(back), '', '', 'budget'}
end
-- A live turn pushed later by live's own limit moves the shared one on with it: no two
-- sends closer than the interval, whatever the lanes.
redis.call('HSET', KEYS[1], 'tat', string.format('%.3f', math.max(tat, now + wait) + interval))
if live_interval > 0 then
  -- Without bulk, live's own limit follows its sends, so it holds nothing back from live
  -- when bulk comes.
  local base = live_tat
  if not floor_applies then
    base = now + wait
  end
  redis.call('HSET', KEYS[1], 'live_tat', string.format('%.3f', base + live_interval))
end
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return {1, math.ceil(wait), string.format('%.3f', now + wait), check, ''}

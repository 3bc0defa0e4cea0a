-- circuit.lua: open or close the deployment's credentials circuit (Braze refuses the key).
--
-- KEYS[1] credentials  HASH  "workspace" -> the workspace id of the key Braze refused
--                            (endpoint host + a hash of the key: never the key), "reason"
--                            (HTTP 401/403/404 and Braze's message), "since" (ms: the first
--                            refusal) and "probe_at" (ms: when that key may probe again);
--                            read by acquire_token.lua, status and the exporter
-- ARGV[1] "open" | "close"   ARGV[2] reason (open)   ARGV[3] probe interval (ms, open)
-- ARGV[4] the workspace id of the key that was refused (open)
--
-- Guarantees: the state belongs to the deployment's key in Redis, not to the process that
-- saw the refusal: while it is open no worker holding the refused key posts, except one
-- probe per interval (acquire_token.lua grants it), and every reader (status, the exporter,
-- whatever key it holds) sees it. Any working key closes it for everyone: a success with
-- the refused key (its probe) or with another one (a rotation). The first refusal's time
-- is kept across re-openings, so status can say since when. The key never expires.
-- Returns 1 if the state changed (opened or closed), else 0.
local now = now_ms()
if ARGV[1] == 'open' then
  local changed = 0
  if redis.call('EXISTS', KEYS[1]) == 0 then
    redis.call('HSET', KEYS[1], 'since', now)
    changed = 1
  end
  redis.call('HSET', KEYS[1], 'workspace', ARGV[4], 'reason', ARGV[2],
    'probe_at', string.format('%.3f', now + tonumber(ARGV[3])))
  return changed
end
return redis.call('DEL', KEYS[1])

-- replay_dead_letter.lua: return one dead-letter entry's identifiers to the buffer.
--
-- KEYS[1] dlq       HASH   entry id -> JSON entry; the entry is removed
-- KEYS[2] dlq index ZSET   entry id -> dead-lettered at; the entry is removed
-- KEYS[3] dlq count STRING identifiers in the store; decreased by the entry's size
-- KEYS[4] seq       STRING sequence counter; each re-queued change gets a new number
-- KEYS[5] pending   HASH   field -> change; re-queued changes are written here
-- KEYS[6] due       ZSET   field -> due ms; re-queued changes are due now
-- KEYS[7] inflight  HASH   field -> batch id (read: a batch holds a newer change)
-- ARGV[1] entry id
--
-- Guarantees: an identifier for which the buffer or an in-flight batch holds a change is
-- skipped, so a replay never overwrites a newer change; the others are due at once. The
-- entry leaves the store in the same step. Returns {re-queued, skipped}, or {-1, 0} when
-- there is no such entry.
local raw = redis.call('HGET', KEYS[1], ARGV[1])
if not raw then
  return {-1, 0}
end
local entry = cjson.decode(raw)
local sep = '\31'
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local doi = 0
if entry.use_double_opt_in_logic then
  doi = 1
end
local requeued, skipped = 0, 0
for _, identifier in ipairs(entry.identifiers) do
  local field = entry.subscription_group_id .. sep .. identifier.kind .. sep .. identifier.value
  if redis.call('HEXISTS', KEYS[5], field) == 1 or redis.call('HEXISTS', KEYS[7], field) == 1 then
    skipped = skipped + 1
  else
    local seq = redis.call('INCR', KEYS[4])
    redis.call('HSET', KEYS[5], field,
      cjson.encode({s = entry.subscription_state, o = doi, q = seq, t = now_ms}))
    redis.call('ZADD', KEYS[6], now_ms, field)
    requeued = requeued + 1
  end
end
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('DECRBY', KEYS[3], #entry.identifiers)
return {requeued, skipped}

-- replay_dead_letter.lua: return one dead-letter entry's identifiers to the buffer.
--
-- KEYS[1] dlq       HASH   entry id -> JSON entry; the entry is removed
-- KEYS[2] dlq index ZSET   entry id -> dead-lettered at; the entry is removed
-- KEYS[3] dlq count STRING identifiers in the store; decreased by the entry's size
-- KEYS[4] seq       STRING sequence counter; each re-queued change gets a new number
-- KEYS[5] pending   HASH   field -> change; re-queued changes are written here
-- KEYS[6] due       ZSET   field -> due ms; re-queued changes are due now
-- KEYS[7] inflight  HASH   field -> batch id (read: a batch holds a newer change)
-- KEYS[8] dlq fields HASH  field -> entry id; only fields still pointing here are replayed
-- ARGV[1] entry id   ARGV[2] history retention (ms)   ARGV[3] most history events per
-- identifier   ARGV[4] subject key lifetime (ms)
-- Per identifier (see _prelude.lua): the subject's reference to the entry goes; a
-- re-queued one gets "replayed" in its history and keeps its watermark.
--
-- Guarantees: an identifier is replayed only while this entry still holds its latest
-- change: any change enqueued since (pending, in flight, or already delivered) removed it
-- from the dlq fields, so a replay never overwrites a newer change. The others are due
-- at once, and locked fields wait for their batch like any enqueued change. The
-- entry leaves the store in the same step. Returns {re-queued, skipped}, or {-1, 0} when
-- there is no such entry.
local raw = redis.call('HGET', KEYS[1], ARGV[1])
if not raw then
  return {-1, 0}
end
local entry = cjson.decode(raw)
local now = now_ms()
local doi = 0
if entry.use_double_opt_in_logic then
  doi = 1
end
local requeued, skipped = 0, 0
local keys_prefix = key_prefix(KEYS[5])
local keep, most = tonumber(ARGV[2]), tonumber(ARGV[3])
local mark_keep = tonumber(ARGV[4])
local group = entry.subscription_group_id
for _, identifier in ipairs(entry.identifiers) do
  local field = group .. SEP .. identifier.kind .. SEP .. identifier.value
  local subject, history = identity_keys(keys_prefix, identifier.kind .. SEP .. identifier.value)
  redis.call('HDEL', subject, 'd' .. SEP .. ARGV[1])
  if redis.call('HGET', KEYS[8], field) ~= ARGV[1] then
    skipped = skipped + 1
  else
    redis.call('HDEL', KEYS[8], field)
    local seq = redis.call('INCR', KEYS[4])
    redis.call('HSET', KEYS[5], field, cjson.encode({
      s = entry.subscription_state, o = doi, q = seq, t = now, w = identifier.w or now,
      r = identifier.r or 0, p = 1}))
    if redis.call('HEXISTS', KEYS[7], field) == 0 then
      redis.call('ZADD', KEYS[6], now, field)
    end
    if identifier.w then
      local mark = tonumber(redis.call('HGET', subject, 'w' .. SEP .. group))
      if not mark or mark < identifier.w then
        redis.call('HSET', subject, 'w' .. SEP .. group, identifier.w)
      end
    end
    touch_subject(subject, mark_keep)
    remember(history, now, {e = 'replayed', g = group, b = ARGV[1], q = seq}, keep, most)
    requeued = requeued + 1
  end
end
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('DECRBY', KEYS[3], #entry.identifiers)
return {requeued, skipped}

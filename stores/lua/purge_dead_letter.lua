-- purge_dead_letter.lua: delete one dead-letter entry for good.
--
-- KEYS[1] dlq       HASH   entry id -> JSON entry; the entry is removed
-- KEYS[2] dlq index ZSET   entry id -> dead-lettered at; the entry is removed
-- KEYS[3] dlq count STRING identifiers in the store; decreased by the entry's size
-- KEYS[4] dlq fields HASH  field -> entry id; this entry's fields are removed
-- ARGV[1] entry id   ARGV[2] "purged" (an operator) | "expired" (the retention)
-- ARGV[3] history retention (ms)   ARGV[4] most history events per identifier
-- Per identifier (see _prelude.lua): the subject's reference to the entry goes and its
-- history gets "purged" with the reason.
--
-- Guarantees: the entry and its share of the identifier count go in one step, so the
-- count `status` shows always matches the entries. Returns the identifiers removed, or -1
-- when there is no such entry.
local raw = redis.call('HGET', KEYS[1], ARGV[1])
if not raw then
  return -1
end
local entry = cjson.decode(raw)
local size = #entry.identifiers
local keys_prefix = key_prefix(KEYS[1])
local keep, most = tonumber(ARGV[3]), tonumber(ARGV[4])
local now = now_ms()
for _, identifier in ipairs(entry.identifiers) do
  local field = entry.subscription_group_id .. SEP .. identifier.kind .. SEP .. identifier.value
  if redis.call('HGET', KEYS[4], field) == ARGV[1] then
    redis.call('HDEL', KEYS[4], field)
  end
  local subject, history = identity_keys(keys_prefix, identifier.kind .. SEP .. identifier.value)
  redis.call('HDEL', subject, 'd' .. SEP .. ARGV[1])
  remember(history, now, {e = 'purged', g = entry.subscription_group_id, b = ARGV[1],
    why = ARGV[2]}, keep, most)
end
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('DECRBY', KEYS[3], size)
return size

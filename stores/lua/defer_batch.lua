-- defer_batch.lua: put a batch back after a failed attempt, to be posted again later.
--
-- KEYS[1] batch     STRING batch record; attempts and last error updated
-- KEYS[2] claim     STRING claim token; must be ours or expired; released
-- KEYS[3] batches   ZSET   batch id -> redispatch time; set past the planned retry
-- ARGV[1] batch id  ARGV[2] claim token  ARGV[3] attempts to add (0 or 1)
-- ARGV[4] error text  ARGV[5] redispatch after (ms): retry delay plus the sweep's grace
-- ARGV[6] "solo" to take the batch out of its v2 pack (it will be sent alone), else ""
-- ARGV[7] HTTP status of the failed post ("" when none came)   ARGV[8] history retention
-- (ms)   ARGV[9] most history events per identifier
-- Per member (see _prelude.lua): after a post that failed (an HTTP status, or an attempt
-- counted) its history gets "retried" with the status, attempts and error; a batch only
-- waiting for its turn records nothing.
--
-- Guarantees: the batch keeps its identifiers and their locks (no newer change can
-- overtake it); the attempt is counted in the record itself, so the count survives a lost
-- message or a dead worker. Returns the attempts so far, or -1 if the batch is gone or
-- another worker holds a live claim on it.
local record_json = redis.call('GET', KEYS[1])
if not record_json then
  return -1
end
local holder = redis.call('GET', KEYS[2])
if holder and holder ~= ARGV[2] then
  return -1
end
local record = cjson.decode(record_json)
record.attempts = record.attempts + tonumber(ARGV[3])
record.error = ARGV[4]
if ARGV[6] == 'solo' then
  record.pack = {ARGV[1]}
end
redis.call('SET', KEYS[1], cjson.encode(record))
redis.call('DEL', KEYS[2])
local now = now_ms()
local status = tonumber(ARGV[7])
if status or tonumber(ARGV[3]) > 0 then
  local keys_prefix = key_prefix(KEYS[3])
  local keep, most = tonumber(ARGV[8]), tonumber(ARGV[9])
  for _, member in ipairs(record.members) do
    local _, history = identity_keys(keys_prefix, record.kind .. SEP .. member[1])
    remember(history, now, {e = 'retried', g = record.group, b = ARGV[1], h = status,
      n = record.attempts, x = ARGV[4]}, keep, most)
  end
end
redis.call('ZADD', KEYS[3], now + tonumber(ARGV[5]), ARGV[1])
return record.attempts

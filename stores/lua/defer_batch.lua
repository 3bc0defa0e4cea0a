-- defer_batch.lua: put a claimed batch back into the schedule, to be posted again when due.
--
-- KEYS[1] batch     STRING batch record; attempts and last error updated
-- KEYS[2] batches   ZSET   batch id -> sweep deadline; set past the due time
-- KEYS[3] claims    ZSET   batch id -> lease end; the claim ends
-- KEYS[4] tokens    HASH   batch id -> holder's token; must be ARGV[2]; removed
-- KEYS[5] fences    HASH   batch id -> sent at ms; removed (the outcome is known now)
-- KEYS[6] schedule  ZSET   batch id -> due ms; the batch waits here
-- KEYS[7] reasons   HASH   batch id -> what it waits for
-- KEYS[8] nudge     LIST   wakes a coalescer when the batch is due at once
-- ARGV[1] batch id  ARGV[2] claim token  ARGV[3] attempts to add (0 or 1)
-- ARGV[4] error text  ARGV[5] due after (ms)  ARGV[6] "solo" to take the batch out of its
-- v2 pack (it will be sent alone), else ""  ARGV[7] reason (core/waiting.py)
-- ARGV[8] sweep grace after the due time (ms)  ARGV[9] HTTP status of the failed post (""
-- when none came)  ARGV[10] history retention (ms)  ARGV[11] most history events per
-- identifier  ARGV[12] the error text for the members' histories
-- The texts are confined by the caller (core/redaction.py `confine`): ARGV[4], for the
-- record, quotes no identifier but this batch's members; ARGV[12] quotes none, so no
-- identifier's history ever names another one.
-- Per member (see _prelude.lua): after a post that failed (an HTTP status, or an attempt
-- counted) its history gets "retried" with the status, attempts and error; a batch only
-- waiting for its turn records nothing.
--
-- Guarantees: the batch keeps its identifiers and their locks (no newer change can
-- overtake it) and waits in Redis, not in any worker's memory: the coalescer's tick
-- sends it a message when due, whoever is alive then. The attempt is counted in the record
-- itself, so the count survives a lost message or a dead worker. Only the holder defers.
-- Returns {"deferred", attempts so far}, {"lost", 0} (not this token's, whether or not
-- it has ended since: it was taken back, and waits or is posted elsewhere) or
-- {"gone", 0} (the caller's claim on a batch that is gone: cannot happen).
local id = ARGV[1]
if redis.call('HGET', KEYS[4], id) ~= ARGV[2] then
  return {'lost', 0}
end
local record_json = redis.call('GET', KEYS[1])
if not record_json then
  end_claim(KEYS[3], KEYS[4], KEYS[5], id)
  return {'gone', 0}
end
local record = cjson.decode(record_json)
record.attempts = record.attempts + tonumber(ARGV[3])
record.error = ARGV[4]
if ARGV[6] == 'solo' then
  record.pack = {id}
end
redis.call('SET', KEYS[1], cjson.encode(record))
end_claim(KEYS[3], KEYS[4], KEYS[5], id)
local now = now_ms()
local status = tonumber(ARGV[9])
if status or tonumber(ARGV[3]) > 0 then
  local keys_prefix = key_prefix(KEYS[2])
  local keep, most = tonumber(ARGV[10]), tonumber(ARGV[11])
  for _, member in ipairs(record.members) do
    local _, history = member_keys(keys_prefix, record.kind, member)
    remember(history, now, {e = 'retried', g = record.group, b = id, h = status,
      n = record.attempts, x = ARGV[12]}, keep, most)
  end
end
local due = now + tonumber(ARGV[5])
wait_in_schedule(KEYS[6], KEYS[7], id, due, ARGV[7])
redis.call('ZADD', KEYS[2], due + tonumber(ARGV[8]), id)
if tonumber(ARGV[5]) <= 0 then
  nudge(KEYS[8])
end
return {'deferred', record.attempts}

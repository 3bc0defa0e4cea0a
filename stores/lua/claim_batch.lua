-- claim_batch.lua: give one worker the right to post a batch, and drop superseded members.
--
-- KEYS[1] batch     STRING batch record (JSON); rewritten without superseded members
-- KEYS[2] claim     STRING token of the worker posting it; set with the lease as expiry
-- KEYS[3] batches   ZSET   batch id -> redispatch time ms; pushed to the lease's end
-- KEYS[4] pending   HASH   field -> change (read: a field here is a newer change)
-- KEYS[5] due       ZSET   field -> due ms; a released field becomes due
-- KEYS[6] inflight  HASH   field -> batch id; released for superseded members
-- ARGV[1] batch id  ARGV[2] claim token  ARGV[3] lease (ms)
-- ARGV[4] history retention (ms)  ARGV[5] most history events per identifier
-- Per member superseded (see _prelude.lua): its history gets "superseded" (in its batch)
--
-- Guarantees: at most one live claim per batch (a worker that dies loses it when the lease
-- expires). A member whose field the buffer holds again was superseded by a newer change:
-- it leaves the batch and its lock is released, so the newer change becomes due and the
-- older state is never sent after it. Returns {"gone"} (finished already), {"busy"}
-- (another live claim), {"empty"} (every member superseded; the batch is finished) or
-- {"claimed", record}; "empty" also carries the record as it was, so that the rest of its
-- pack can still be sent.
local record_json = redis.call('GET', KEYS[1])
if not record_json then
  return {'gone'}
end
local holder = redis.call('GET', KEYS[2])
if holder and holder ~= ARGV[2] then
  return {'busy'}
end
local record = cjson.decode(record_json)
local prefix = record.group .. SEP .. record.kind .. SEP
local kept = {}
local keys_prefix = key_prefix(KEYS[4])
local keep, most = tonumber(ARGV[4]), tonumber(ARGV[5])
local now = now_ms()
for _, member in ipairs(record.members) do
  local field = prefix .. member[1]
  local newer = redis.call('HGET', KEYS[4], field)
  if newer then
    if redis.call('HGET', KEYS[6], field) == ARGV[1] then
      redis.call('HDEL', KEYS[6], field)
      redis.call('ZADD', KEYS[5], cjson.decode(newer).t, field)
    end
    local _, history = identity_keys(keys_prefix, record.kind .. SEP .. member[1])
    remember(history, now, {e = 'superseded', g = record.group, at = 'batch', b = ARGV[1]},
      keep, most)
  else
    kept[#kept + 1] = member
  end
end
if #kept == 0 then
  redis.call('DEL', KEYS[1], KEYS[2])
  redis.call('ZREM', KEYS[3], ARGV[1])
  return {'empty', record_json}
end
if #kept < #record.members then
  record.members = kept
  record_json = cjson.encode(record)
  redis.call('SET', KEYS[1], record_json)
end
redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
redis.call('ZADD', KEYS[3], now + tonumber(ARGV[3]), ARGV[1])
return {'claimed', record_json}

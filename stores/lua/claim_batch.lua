-- claim_batch.lua: give one worker the right to post a batch, and drop superseded members.
--
-- KEYS[1] batch     STRING batch record (JSON); rewritten without superseded members
-- KEYS[2] batches   ZSET   batch id -> sweep deadline ms; pushed to the lease's end
-- KEYS[3] claims    ZSET   batch id -> lease end ms; the claim is written here
-- KEYS[4] tokens    HASH   batch id -> holder's token ("<worker id>/<random>")
-- KEYS[5] fences    HASH   batch id -> sent at ms; cleared when a new holder claims
-- KEYS[6] schedule  ZSET   batch id -> due ms (read: a waiting batch is not claimable);
--                          an emptied batch's pack siblings are put here, due now
-- KEYS[7] reasons   HASH   batch id -> what it waits for
-- KEYS[8] pending   HASH   field -> change (read: a field here is a newer change)
-- KEYS[9] due       ZSET   field -> due ms; a released field becomes due (in its lane's
--                          set: this one for bulk, the one `lane_due` names for live)
-- KEYS[10] inflight HASH   field -> batch id; released for superseded members
-- KEYS[11] nudge    LIST   wakes a coalescer when pack siblings become due
-- ARGV[1] batch id  ARGV[2] claim token  ARGV[3] lease (ms)
-- ARGV[4] history retention (ms)  ARGV[5] most history events per identifier
-- Per member superseded (see _prelude.lua): its history gets "superseded" (in its batch)
--
-- Guarantees: at most one claim per batch, and only a batch that is neither claimed nor
-- waiting in the schedule can be claimed. So a duplicate or late message for a batch that
-- waits for its retry, or that another worker holds, posts nothing: a double opt-in batch
-- is never posted twice because of a message. A claim ends only by its holder (finish,
-- defer, split) or by take_back.lua once the holder's heartbeat is gone or its lease ran
-- out. A member whose field the buffer holds again was superseded by a newer change: it
-- leaves the batch and its lock is released, so the newer change becomes due and the
-- older state is never sent after it. When every member was superseded the batch ends,
-- and the other batches of its v2 pack that no one holds are scheduled due now (they were
-- to travel with this batch's message).
-- Returns {"gone"} (finished already), {"busy"} (another worker holds it), {"waiting"}
-- (it waits in the schedule), {"empty", record as it was} or {"claimed", record}. The
-- holder may claim again with its own token (a renewal).
local id = ARGV[1]
local record_json = redis.call('GET', KEYS[1])
if not record_json then
  return {'gone'}
end
local holder = redis.call('HGET', KEYS[4], id)
if holder and holder ~= ARGV[2] then
  return {'busy'}
end
if not holder and redis.call('ZSCORE', KEYS[6], id) then
  return {'waiting'}
end
local record = cjson.decode(record_json)
local prefix = record.group .. SEP .. record.kind .. SEP
local kept = {}
local keys_prefix = key_prefix(KEYS[8])
local keep, most = tonumber(ARGV[4]), tonumber(ARGV[5])
local now = now_ms()
for _, member in ipairs(record.members) do
  local field = prefix .. member[1]
  local newer = redis.call('HGET', KEYS[8], field)
  if newer then
    if redis.call('HGET', KEYS[10], field) == id then
      redis.call('HDEL', KEYS[10], field)
      local change = cjson.decode(newer)
      redis.call('ZADD', lane_due(KEYS[9], change), change.t, field)
    end
    local _, history = identity_keys(keys_prefix, record.kind .. SEP .. member[1])
    remember(history, now, {e = 'superseded', g = record.group, at = 'batch', b = id},
      keep, most)
  else
    kept[#kept + 1] = member
  end
end
if #kept == 0 then
  redis.call('DEL', KEYS[1])
  redis.call('ZREM', KEYS[2], id)
  end_claim(KEYS[3], KEYS[4], KEYS[5], id)
  local woke = false
  for _, sibling in ipairs(record.pack or {}) do
    if sibling ~= id and redis.call('ZSCORE', KEYS[2], sibling)
        and not redis.call('ZSCORE', KEYS[3], sibling)
        and not redis.call('ZSCORE', KEYS[6], sibling) then
      wait_in_schedule(KEYS[6], KEYS[7], sibling, now, 'ready')
      woke = true
    end
  end
  if woke then
    nudge(KEYS[11])
  end
  return {'empty', record_json}
end
if #kept < #record.members then
  record.members = kept
  record_json = cjson.encode(record)
  redis.call('SET', KEYS[1], record_json)
end
local lease_end = now + tonumber(ARGV[3])
redis.call('ZADD', KEYS[3], lease_end, id)
redis.call('HSET', KEYS[4], id, ARGV[2])
if not holder then
  redis.call('HDEL', KEYS[5], id)
end
redis.call('ZADD', KEYS[2], lease_end, id)
return {'claimed', record_json}

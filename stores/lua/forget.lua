-- forget.lua: erase everything held about one identifier, across all groups.
--
-- KEYS[1] pending    HASH   field -> change; the identifier's fields are deleted
-- KEYS[2] due        ZSET   field -> due ms; its fields leave it, and the live lane's
--                           set (`due` .. ":live")
-- KEYS[3] inflight   HASH   field -> batch id; its locks are released
-- KEYS[4] dlq        HASH   entry id -> JSON entry; it leaves every entry (an entry left
--                           empty is deleted)
-- KEYS[5] dlq index  ZSET   entry id -> dead-lettered at; emptied entries leave it
-- KEYS[6] dlq count  STRING identifiers in the dead-letter store; decreased
-- KEYS[7] dlq fields HASH   field -> entry id; its fields are deleted
-- KEYS[8] stats      HASH   "erased" += 1
-- KEYS[9] groups     SET    every group id a change was enqueued for (read)
-- KEYS[10] claims    ZSET   batch id -> lease end; claims of batches not yet sent end
-- KEYS[11] tokens    HASH   batch id -> holder's token; likewise
-- KEYS[12] fences    HASH   batch id -> sent at ms (read: a request on the wire)
-- KEYS[13] schedule  ZSET   batch id -> due ms; a batch whose claim ended waits here, due now
-- KEYS[14] reasons   HASH   batch id -> "ready"
-- KEYS[15] batches   ZSET   batch id -> sweep deadline (read: unfinished; set)
-- KEYS[16] nudge     LIST   wakes a coalescer to send those batches their messages
-- KEYS[17] subject   HASH   the identifier's watermarks and dead-letter index: deleted
-- KEYS[18] history   LIST   its history: left holding one "erased" event with the counts,
--                           no identifier (both as _prelude.lua's identity_keys names them;
--                           a script refuses names that differ)
-- Derived (see _prelude.lua; same hash tag, so same slot): the records
-- of the batches that hold it ({prefix}:batch:<id>: it leaves their members and their
-- error text) and their opt-out reads ({prefix}:optout:<id>: deleted, a cache).
-- ARGV[1] kind   ARGV[2] value (normalised)   ARGV[3] history retention (ms)
-- ARGV[4] sweep grace (ms)
--
-- The groups to look in: every group a change was ever enqueued for (pending changes of
-- the identifier not yet taken have left no other trace), the subject's (watermarks,
-- dead letters holding it) and the history's. Guarantees: one atomic step, so no change,
-- batch or dead letter can move between the places looked in. A batch on the wire
-- finishes, but its record no longer names the identifier: its end (finish_batch.lua), a
-- retry (defer, claim), a split or the sweep write nothing about it, and a dead letter or
-- replay cannot bring it back. A batch claimed but not yet sent (its worker waits for its
-- turn or an opt-out read, with the identifier in memory) loses its claim here, with the
-- other batches of the same request (a v2 pack): the worker's check right before the first
-- byte (fence_batch.lua) then finds the claim gone and sends nothing, as after a take-back;
-- the batches wait in the schedule, due now, and go out without the identifier. A batch
-- whose claim fenced it (claim_batch.lua, a v1 turn for now) counts as sent from then.
-- Returns a JSON object counting what was removed.
local kind, value = ARGV[1], ARGV[2]
local ident = kind .. SEP .. value
local prefix = key_prefix(KEYS[1])
local subject, history = identity_keys(prefix, ident)
if KEYS[17] ~= subject or KEYS[18] ~= history then
  return redis.error_reply('ERR forget: KEYS[17..18] are not the identifier\'s subject and history')
end
local marker = '[erased]'

local function scrub(text)
  if type(text) ~= 'string' then
    return text
  end
  local out, start = {}, 1
  while true do
    local from, to = string.find(text, value, start, true)
    if not from then
      break
    end
    out[#out + 1] = string.sub(text, start, from - 1) .. marker
    start = to + 1
  end
  out[#out + 1] = string.sub(text, start)
  return table.concat(out)
end

local now = now_ms()
local grace = tonumber(ARGV[4])

-- End the claim of batch `id` unless its request is on the wire (then it reaches Braze:
-- nothing can call it back); it waits in the schedule, due now.
local function stop_unsent(id)
  if not redis.call('HGET', KEYS[11], id) or redis.call('HEXISTS', KEYS[12], id) == 1 then
    return
  end
  end_claim(KEYS[10], KEYS[11], KEYS[12], id)
  if redis.call('ZSCORE', KEYS[15], id) then
    wait_in_schedule(KEYS[13], KEYS[14], id, now, 'ready')
    redis.call('ZADD', KEYS[15], now + grace, id)
    nudge(KEYS[16])
  end
end

local groups, entries = {}, {}
for _, group in ipairs(redis.call('SMEMBERS', KEYS[9])) do
  groups[group] = true
end
local marks = 0
local flat = redis.call('HGETALL', subject)
for i = 1, #flat, 2 do
  local tag, rest = string.sub(flat[i], 1, 1), string.sub(flat[i], 3)
  if tag == 'w' then
    groups[rest] = true
    marks = marks + 1
  elseif tag == 'd' then
    entries[rest] = true
    groups[flat[i + 1]] = true
  end
end
local events = redis.call('LRANGE', history, 0, -1)
for _, raw in ipairs(events) do
  local at = string.find(raw, SEP, 1, true)
  local ok, event = pcall(cjson.decode, string.sub(raw, at + 1))
  if ok and type(event) == 'table' and event.g then
    groups[event.g] = true
    if event.e == 'dead_lettered' and event.b then
      entries[event.b] = true
    end
  end
end

local removed = {pending = 0, in_flight = 0, dead_letters = 0, history_events = #events,
  watermarks = marks}
for group in pairs(groups) do
  local field = group .. SEP .. ident
  removed.pending = removed.pending + redis.call('HDEL', KEYS[1], field)
  redis.call('ZREM', KEYS[2], field)
  redis.call('ZREM', KEYS[2] .. ':live', field)
  local batch = redis.call('HGET', KEYS[3], field)
  if batch then
    redis.call('HDEL', KEYS[3], field)
    local batch_key = prefix .. 'batch:' .. batch
    local raw = redis.call('GET', batch_key)
    if raw then
      local record = cjson.decode(raw)
      local kept = {}
      for _, member in ipairs(record.members) do
        if member[1] ~= value then
          kept[#kept + 1] = member
        end
      end
      record.members = kept
      record.error = scrub(record.error)
      redis.call('SET', batch_key, cjson.encode(record))
      removed.in_flight = removed.in_flight + 1
      local token = redis.call('HGET', KEYS[11], batch)
      if token then
        for _, sibling in ipairs(record.pack or {}) do
          if sibling ~= batch and redis.call('HGET', KEYS[11], sibling) == token then
            stop_unsent(sibling)
          end
        end
        stop_unsent(batch)
      end
    end
    redis.call('DEL', prefix .. 'optout:' .. batch)
  end
  local entry = redis.call('HGET', KEYS[7], field)
  if entry then
    redis.call('HDEL', KEYS[7], field)
    entries[entry] = true
  end
end

for entry_id in pairs(entries) do
  local raw = redis.call('HGET', KEYS[4], entry_id)
  if raw then
    local entry = cjson.decode(raw)
    local kept = {}
    for _, identifier in ipairs(entry.identifiers) do
      if not (identifier.kind == kind and identifier.value == value) then
        kept[#kept + 1] = identifier
      end
    end
    local gone = #entry.identifiers - #kept
    if gone > 0 then
      removed.dead_letters = removed.dead_letters + 1
      redis.call('DECRBY', KEYS[6], gone)
      if #kept == 0 then
        redis.call('HDEL', KEYS[4], entry_id)
        redis.call('ZREM', KEYS[5], entry_id)
      else
        entry.identifiers = kept
        entry.error = scrub(entry.error)
        redis.call('HSET', KEYS[4], entry_id, cjson.encode(entry))
      end
    end
  end
end

redis.call('DEL', subject, history)
redis.call('RPUSH', history, now .. SEP .. cjson.encode({e = 'erased', removed = removed}))
redis.call('PEXPIRE', history, tonumber(ARGV[3]))
redis.call('HINCRBY', KEYS[8], 'erased', 1)
return cjson.encode(removed)

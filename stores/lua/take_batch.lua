-- take_batch.lua: move planned changes from the buffer into a new batch record, atomically.
--
-- KEYS[1] pending   HASH   field -> change; the members taken are deleted
-- KEYS[2] due       ZSET   field -> due ms (bulk lane); the members taken leave it
-- KEYS[3] inflight  HASH   field -> batch id; the members taken are locked to this batch
-- KEYS[4] batches   ZSET   batch id -> redispatch time ms; the new batch is added
-- KEYS[5] batch     STRING the new batch record (JSON)
-- KEYS[6] stats     HASH   "batches" += 1, "batched" += members taken
-- KEYS[7] due live  ZSET   like KEYS[2], the live lane's; the members taken leave it
-- KEYS[8] short     ZSET   batches not yet claimed, by kind (_prelude.lua `short_entry`);
--                          a batch travelling alone is added
-- ARGV[1] batch id  ARGV[2] group  ARGV[3] state  ARGV[4] kind  ARGV[5] double opt-in 0|1
-- ARGV[6] redispatch after (ms)    ARGV[7] JSON array: ids of the batches planned to share
-- one v2 request with this one (its pack)   ARGV[8] history retention (ms)
-- ARGV[9] most history events per identifier   ARGV[10] subject key lifetime (ms)
-- ARGV[11] most identifiers per batch a top-up fills it to (0: no top-up)
-- ARGV[12] most due entries the top-up looks at
-- ARGV[13] the members planned, in one text: value SEP sequence number, each member's pair
--          joined by SEP (issue 26: one argument a batch, not two a member, which cost the
--          worker's redis-py ~1.5 us a member to encode and Redis ~850 instructions each
--          to parse; values never hold a control character, see core/changes.py)
-- Each member is taken by `take_change` (_prelude.lua: the buffer, the lock, the
-- watermark, the history), as a claim's top-up takes one (claim_batch.lua).
-- KEYS[6] "topped_up" += members a top-up took (they count in "batched" too).
--
-- The record's members are [value, seq, respect opt-out 0|1, occurred at ms, digest, head,
-- covered], so the poster sees per member whether Braze's opt-out is to be respected, and
-- the finish names the identifier's keys by the digest of "kind SEP value", trims its
-- history without reading its oldest event while `head` (a time no later than it; null
-- when the take did not learn it) is within the retention, and reads no watermark and
-- sets no expiry its take's cover (`covered`, the least of the expiries this take gave the
-- identifier's keys) (_prelude.lua `member_keys`, `member_covered`, issue 26).
--
-- Guarantees: a member is taken only if the buffer still holds exactly the planned change
-- (same sequence number) and no batch locks its field. So a change enters at most one
-- batch even with two coalescers running, and a change written after planning stays in the
-- buffer for the next tick. The record is written in the same step that removes its
-- changes from the buffer: a crash on either side of this script loses nothing, and the
-- sweep re-dispatches a record whose task message never left.
-- Run twice, it takes once: a take whose record exists already answers what that record
-- holds, and takes nothing more. Each take names a new batch id (stores/buffer.py), so an
-- existing record is this very take's, run before by a call whose reply was lost: the
-- connection dropped after Redis ran it (a master killed mid-pipeline, whose replica had
-- the write), and redis-py sent the pipeline again. Answered 0 then ("nothing was
-- written"), the coalescer sent no message for a batch that holds its members' locks,
-- and only the sweep (BATCH_REDISPATCH_SECONDS) would post it
-- (e2e/test_redis_cluster.py's kill test, 1 run in ~10).
-- Top-up at the cut (issue 26): a batch that comes out short of ARGV[11] (a key's
-- remainder, or planned members a newer change replaced between the cut's read and this
-- take: under flips, whole runs of a key's batches came out short this way) and that
-- travels alone (a pack of one: the other records of a v2 pack are not written yet, so
-- its distinct identifiers could not be counted) takes due changes of its kind by the
-- claim's rules (`top_up` in _prelude.lua: its group, state, kind and double opt-in,
-- live then bulk for a live batch, bulk only for a bulk one, oldest due first; only a
-- change the buffer holds, due, whose field no batch locks). So the changes that came
-- after the read join the batch rather than a short batch of their own; order holds as
-- for any member taken. Every batch that travels alone is listed in KEYS[8], where the
-- claim of a short batch of its kind finds it (`absorb`: one that stays short is emptied
-- into it; under flips, a full one that waits for its turn lends it the places its lost
-- members left). Returns the members taken (0: nothing was written), or, run again, the
-- members its record holds now (fewer if a claim's absorb took some meanwhile).
local existing = redis.call('GET', KEYS[5])
if existing then
  return #cjson.decode(existing).members
end
local prefix = ARGV[2] .. SEP .. ARGV[4] .. SEP
local now = now_ms()
-- The expiries' texts formatted once a take (no number formatted per member, see `digits`
-- in _prelude.lua), the history's retention a number once (the cutoff's arithmetic took
-- its text, one conversion a member: issue 26); the planned members taken with
-- `at.taken`, their buffer's part in one call each (`flush_taken`).
local at = {prefix = key_prefix(KEYS[1]), pending = KEYS[1], due = KEYS[2], due_live = KEYS[7],
  inflight = KEYS[3], keep = tonumber(ARGV[8]), most = tonumber(ARGV[9]),
  subject_keep = ARGV[10],
  now = now, taken = {}, texts = {},
  keep_at = expiry_at(now, ARGV[8]), subject_at = expiry_at(now, ARGV[10])}
local members = {}
-- The planned members' changes and locks in one HMGET each (issue 26: two calls a batch,
-- not two a member). Read before any is taken: taking one changes neither the change nor
-- the lock of another field, and a value planned twice is taken once (`seen`).
-- The sequence numbers made numbers here, before any write (`+ 0`: one conversion, where
-- tonumber() makes two and a call; a malformed one raises before anything is taken).
local fields, values, seqs, numbers = {}, {}, {}, {}
for value, seq in string.gmatch(ARGV[13], '([^\31]+)\31([^\31]+)') do
  local n = #fields + 1
  values[n], seqs[n], numbers[n] = value, seq, seq + 0
  fields[n] = prefix .. value
end
local currents = call_in_slices('HMGET', KEYS[1], fields)
local locks = call_in_slices('HMGET', KEYS[3], fields)
local seen = {}
for n = 1, #fields do
  local value, seq = values[n], seqs[n]
  local current = currents[n]
  local change = current and cjson.decode(current)
  if change and change.q == numbers[n] and not locks[n] and not seen[value] then
    seen[value] = true
    members[#members + 1] = take_change(at, ARGV[1], ARGV[2], ARGV[4], value, change, seq,
      fields[n])
  end
end
if #members == 0 then
  return 0
end
flush_taken(at, ARGV[1])
local texts = at.texts
at.taken, at.texts = nil, nil  -- a top-up takes each change at once (it reads the buffer)
local record = {
  id = ARGV[1], group = ARGV[2], state = ARGV[3], kind = ARGV[4],
  doi = tonumber(ARGV[5]), attempts = 0, created = now,
  pack = cjson.decode(ARGV[7])}
local top_up_to = tonumber(ARGV[11])
local topped = 0
if #members < top_up_to and #record.pack <= 1 then
  topped = top_up(KEYS[5], record, members, at, top_up_to, tonumber(ARGV[12]))
  if topped > 0 then
    redis.call('HINCRBY', KEYS[6], 'topped_up', topped)
  end
end
local record_json
if topped == 0 then
  -- The members' texts written by take_change (issue 26: no number formatted again):
  -- the same JSON cjson writes, the members last.
  local head = cjson.encode(record)
  record_json = string.sub(head, 1, -2) .. ',"members":[' .. table.concat(texts, ',') .. ']}'
  record.members = members
else
  record.members = members
  record_json = cjson.encode(record)
end
redis.call('SET', KEYS[5], record_json)
if top_up_to > 0 and #record.pack <= 1 then
  redis.call('ZADD', KEYS[8], 0, short_entry(record))
end
redis.call('ZADD', KEYS[4], now + tonumber(ARGV[6]), ARGV[1])
redis.call('HINCRBY', KEYS[6], 'batches', 1)
redis.call('HINCRBY', KEYS[6], 'batched', #members)
return #members

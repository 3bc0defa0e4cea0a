-- top_up_batch.lua: right before a claimed batch's request is built, top it up again with
-- the due changes of its kind that came while it waited for its turn (issue 26).
--
-- KEYS[1] batch     STRING batch record (JSON); rewritten with the members taken
-- KEYS[2] claims    ZSET   batch id -> lease end ms (read)
-- KEYS[3] tokens    HASH   batch id -> holder's token (read)
-- KEYS[4] fences    HASH   batch id -> sent at ms (read: a batch sent is not topped up)
-- KEYS[5] pending   HASH   field -> change; a change taken is deleted
-- KEYS[6] due       ZSET   field -> due ms, bulk lane; a taken change leaves it
-- KEYS[7] inflight  HASH   field -> batch id; a taken change's field is locked to the batch
-- KEYS[8] due live  ZSET   like KEYS[6], the live lane's
-- KEYS[9] stats     HASH   "batched" += members taken from the buffer, "topped_up" +=
--                          members taken from the buffer or another batch
-- KEYS[10] short    ZSET   short batches not yet claimed (_prelude.lua `absorb`)
-- KEYS[11] schedule ZSET   batch id -> due ms (read: a waiting batch is not absorbed)
-- KEYS[12] batches  ZSET   batch id -> sweep deadline; an emptied absorbed batch leaves it
-- ARGV[1] batch id  ARGV[2] claim token  ARGV[3] lease that must remain, in ms (the HTTP
-- timeout, as the fence asks)  ARGV[4] history retention (ms)  ARGV[5] most history
-- events per identifier  ARGV[6] most identifiers per batch (and per v2 request)
-- ARGV[7] most due entries the top-up looks at  ARGV[8] subject key lifetime (ms)
-- Per member taken: what take_batch.lua does per member (`take_change`). The records of
-- the batch's v2 pack siblings are read (named like KEYS[1], with their id).
--
-- Guarantees: the claim's top-up (claim_batch.lua) happens when a worker takes the
-- batch's message; under a binding budget the batch then waits for its turn
-- (acquire_token.lua, up to TOKEN_WAIT_MAX_SECONDS), and changes of its kind that become
-- due meanwhile (the next wave's, or a flip released when the batch that locked it ended)
-- would otherwise be cut into batches of their own (and short batches of its kind cut
-- since, not yet claimed: `absorb`). This is the same top-up, with the same
-- rules (`top_up` in _prelude.lua: a batch short of ARGV[6], never attempted, never split;
-- its group, state, kind and double opt-in; live then bulk for a live batch, bulk only
-- for a bulk one; only a change the buffer holds, due, whose field no batch locks, taken
-- and locked in this step), and only while ARGV[2] holds the claim with more than ARGV[3]
-- left and the batch was not sent: a worker that lost its claim while it waited takes
-- nothing into a batch it does not hold. The request is built from the record this
-- returns, and the fence (fence_batch.lua) is still checked right before its first byte;
-- a batch whose fence then refuses is taken back with the members taken here, locked to
-- it, exactly like a batch topped up at its claim. Members superseded since the claim are
-- left in (their newer change waits for the lock): sending them keeps order.
-- Returns {"lost"} (the claim is not this token's, or too short: nothing written),
-- {"kept", record} (nothing taken) or {"topped", record, members taken}.

local id = ARGV[1]
if redis.call('HGET', KEYS[3], id) ~= ARGV[2] then
  return {'lost'}
end
local now = now_ms()
local lease_end = tonumber(redis.call('ZSCORE', KEYS[2], id) or '0')
if lease_end - now <= tonumber(ARGV[3]) then
  return {'lost'}
end
local record_json = redis.call('GET', KEYS[1])
if not record_json then
  return {'lost'}
end
local record = cjson.decode(record_json)
local most_members = tonumber(ARGV[6])
if #record.members >= most_members or record.attempts ~= 0 or record.split
    or record.sibling or redis.call('HEXISTS', KEYS[4], id) == 1 then
  return {'kept', record_json}
end
local kept = record.members
local at = {prefix = key_prefix(KEYS[5]), pending = KEYS[5], due = KEYS[6],
  due_live = KEYS[8], inflight = KEYS[7], keep = tonumber(ARGV[4]),
  most = tonumber(ARGV[5]), subject_keep = tonumber(ARGV[8]), now = now, short = KEYS[10],
  tokens = KEYS[3], schedule = KEYS[11], batches = KEYS[12]}
local absorbed = absorb(at, KEYS[1], record, kept, most_members)
local taken = top_up(KEYS[1], record, kept, at, most_members, tonumber(ARGV[7]))
local topped = absorbed + taken
if topped == 0 then
  return {'kept', record_json}
end
if taken > 0 then
  redis.call('HINCRBY', KEYS[9], 'batched', taken)
end
redis.call('HINCRBY', KEYS[9], 'topped_up', topped)
record.members = kept
record_json = cjson.encode(record)
redis.call('SET', KEYS[1], record_json)
return {'topped', record_json, topped}

-- claim_batch.lua: give one worker the right to post a batch, drop superseded members, and
-- top the batch up with due changes of its kind when it is short.
--
-- KEYS[1] batch     STRING batch record (JSON); rewritten without superseded members (and
--                          with the members of a top-up)
-- KEYS[2] batches   ZSET   batch id -> sweep deadline ms; pushed to the lease's end
-- KEYS[3] claims    ZSET   batch id -> lease end ms; the claim is written here
-- KEYS[4] tokens    HASH   batch id -> holder's token ("<worker id>/<random>")
-- KEYS[5] fences    HASH   batch id -> sent at ms; cleared when a new holder claims
-- KEYS[6] schedule  ZSET   batch id -> due ms (read: a waiting batch is not claimable);
--                          an emptied batch's pack siblings are put here, due now
-- KEYS[7] reasons   HASH   batch id -> what it waits for
-- KEYS[8] pending   HASH   field -> change (read: a field here is a newer change); a
--                          change taken by the top-up is deleted
-- KEYS[9] due       ZSET   field -> due ms, bulk lane; a released bulk field becomes due
--                          here; the top-up reads it and its members leave it
-- KEYS[10] inflight HASH   field -> batch id; released for superseded members, locked to
--                          this batch for the top-up's members
-- KEYS[11] nudge    LIST   wakes a coalescer when pack siblings become due
-- KEYS[12] due live ZSET   like KEYS[9], the live lane's
-- KEYS[13] stats    HASH   "batched" and "topped_up" += members a top-up took ("topped_up"
--                          only for members moved from another batch)
-- KEYS[14] short    ZSET   short batches not yet claimed (_prelude.lua `short_entry`): this
--                          batch's entry goes; a batch whose members this one absorbs
--                          leaves it when emptied
-- KEYS[15] limiter     HASH   the workspace's rate budget (acquire_token.lua's KEYS[1]);
--                           only with ARGV[9] "1"
-- KEYS[16] credentials HASH   the credentials circuit (acquire_token.lua's KEYS[2]); likewise
-- ARGV[1] batch id  ARGV[2] claim token  ARGV[3] lease (ms)
-- ARGV[4] history retention (ms)  ARGV[5] most history events per identifier
-- ARGV[6] most identifiers per batch (and per v2 request)   ARGV[7] most due entries the
-- top-up looks at   ARGV[8] subject key lifetime (ms)
-- ARGV[9] "1": take the batch's turn of the rate budget too (the poster's v1 post; absent
-- or anything else: no turn)   ARGV[10..18] acquire_token.lua's ARGV[1..9] (the lane's)
-- ARGV[19] (only with ARGV[9] "1"; absent: no fence) lease that must remain, in ms (the
-- HTTP timeout, as fence_batch.lua's ARGV[2]): fence the batch in this call when nothing
-- can happen between the claim and the request (below)   ARGV[20] "1": the poster reads
-- Braze's opt-outs before a request (delivery/opt_outs.py) for members that ask for it
-- Per member superseded (see _prelude.lua): its history gets "superseded" (in its batch).
-- Per member of a top-up: what take_batch.lua does per member (`take_change`).
-- The records of the batch's v2 pack siblings are read (named like KEYS[1], with their id).
-- Read too, named from the declared keys' prefix P as stores/keys.py names them (same hash
-- tag, so the same slot): P .. "refused:" .. group SEP state SEP kind (STRING, a refusal of
-- the batch's group + state + kind as a whole, stores/refusals.py) and, for a half of a
-- split, P .. "refused-half:" .. batch id (STRING, Braze's message while the half awaits
-- its sibling). The poster read both right after the claim, two round trips a post; the
-- claim's reply carries them now (issue 26), read at the instant of the claim.
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
-- Top-up (issue 26): a batch short of ARGV[6] members (it lost members but kept some,
-- or it was cut short: a key's partial remainder, or planned members a newer change
-- replaced before the cut took them), claimed afresh (not a renewal), never attempted and
-- never split, takes due changes of its own group, state,
-- identifier kind and double opt-in, oldest due first, until it holds ARGV[6] members
-- (for a v2 pack: until the pack holds ARGV[6] distinct identifiers, the other records
-- counted as they are now), looking at most at ARGV[7] due entries. A live batch looks at
-- live's due changes, then bulk's; a bulk batch at bulk's only (a live change must not
-- wait for bulk's turns). Each is taken exactly as the coalescer's take_batch.lua takes
-- one: only a change the buffer holds whose field no batch locks (one in-flight lock per
-- identifier), not due later (a delay), out of the buffer and locked in the same step,
-- watermark and history written. So the request goes out full, and order holds as for a
-- cut: a taken change is the newest of its identifier, and no batch holds an older one.
-- (`top_up` in _prelude.lua, shared with top_up_batch.lua: the same top-up again right
-- before the request, for changes that became due while the batch waited for its turn.)
-- Before the due changes, such a batch takes in the members of other short batches of its
-- kind no one has claimed yet (`absorb` in _prelude.lua: they would go out short after
-- it), by the same rules, each member moving with its lock.
-- The turn (issue 26: the claim and the turn in one call, where a post made two): with
-- ARGV[9] "1", a claim made (status "claimed") that finds no standing refusal and no
-- refused half's message (the poster then sends no request) takes the batch's turn exactly
-- as acquire_token.lua does (`take_turn` in _prelude.lua; same keys, same answer) and
-- notes the answer for the claim's token in P .. "turn:" .. batch id (STRING "token SEP
-- granted SEP time SEP mark SEP why", the time absolute: the send time granted, or when to
-- ask again; expires after twice the lease: the poster tries a claim again up to a lease
-- after its first error, which may come up to a lease after the first try, so a renewal
-- finds the note its first try left). A claim that is not made takes no turn: nothing of
-- the budget is spent. A renewal by the same token (the poster's claim tried again after
-- a reply lost to a failover: its first try may have run) answers the noted turn again,
-- its wait counted from now, and takes none; with none noted for its token (its first try
-- took none, or the note expired), it takes one.
-- The fence (issue 26: the claim, the turn and the fence in one call, where a post made
-- two): with ARGV[19], a claim whose turn is granted for now (no wait), that holds no
-- member whose opt-out Braze is to be read first (ARGV[20] "1", state "subscribed", a
-- member's respect flag not 0), that travels alone (no v2 pack to hand off) and that no
-- top-up before the send would add to (full; or claimed afresh, so the claim's top-up just
-- looked; or never topped up: attempted, split, a half) is fenced here exactly as
-- fence_batch.lua fences it: only while ARGV[2] holds it with more than ARGV[19] of lease
-- left, its "sent at" mark (KEYS[5]) written now, before any byte can go. The poster then
-- sends without fence_batch.lua, its exchange's deadline counted from before it sent
-- this call (so the request ends before the lease does, and by the mark and the HTTP
-- timeout, which take_back.lua waits for). A renewal by the same token that finds the mark
-- (its first try fenced; a reply lost) answers fenced again with the mark moved to now,
-- its noted turn and no refusal (its first try read none): the poster never sent on the
-- lost reply. Anything else answers not fenced, and the poster fences before the request.
-- Returns {"gone"} (finished already), {"busy"} (another worker holds it), {"waiting"}
-- (it waits in the schedule), {"empty", record as it was} or {"claimed", record, members
-- the top-up took, the standing refusal's JSON or nil, the refused half's message or nil}
-- followed, when it took or renewed a turn, by acquire_token.lua's five answers (granted
-- 1/0, wait ms, send time ms or "", "probe" | "check" | "", why not granted or ""), and,
-- with ARGV[19], 1 (fenced: send now) or 0.
-- The holder may claim again with its own token (a renewal). The reads change nothing: a
-- refused batch is claimed (and topped up) as before, and the poster dead-letters it
-- unsent.

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
-- The record without its members first (`record_head`, issue 26): a claim that finds no
-- member superseded and no room for a top-up (a full batch) neither decodes nor rewrites
-- the members and answers the record as stored; any other decodes it whole, as before.
-- (Told to fence with opt-outs read: whether a member asks for its read, see below.)
local record, values, asks_read = record_head(record_json,
  ARGV[9] == '1' and ARGV[19] ~= nil and ARGV[20] == '1')
if not record then
  record = cjson.decode(record_json)
  values = {}
  for n, member in ipairs(record.members) do
    values[n] = member[1]
  end
end
redis.call('ZREM', KEYS[14], short_entry(record))
local prefix = record.group .. SEP .. record.kind .. SEP
local kept = {}
local keys_prefix = key_prefix(KEYS[8])
local keep, most = tonumber(ARGV[4]), tonumber(ARGV[5])
local now = now_ms()
-- The members' newer changes, if any, in one HMGET (issue 26: one call a batch, not one a
-- member); nothing below writes the buffer's changes before the top-up.
local fields = {}
for n, value in ipairs(values) do
  fields[n] = prefix .. value
end
local newers = call_in_slices('HMGET', KEYS[8], fields)
local whole = #fields >= tonumber(ARGV[6])
for n = 1, #fields do
  if newers[n] then
    whole = false
    break
  end
end
if whole then
  -- Every member stays and there is no room for a top-up: the reply is the record as
  -- stored, its lease written below.
elseif not record.members then
  record = cjson.decode(record_json)
end
for n, member in ipairs(whole and {} or record.members) do
  local field = fields[n]
  local newer = newers[n]
  if newer then
    if redis.call('HGET', KEYS[10], field) == id then
      redis.call('HDEL', KEYS[10], field)
      local change = cjson.decode(newer)
      if change.l == 1 then
        redis.call('ZADD', KEYS[12], change.t, field)
      else
        redis.call('ZADD', KEYS[9], change.t, field)
      end
    end
    local _, history = member_keys(keys_prefix, record.kind, member)
    remember(history, now, {e = 'superseded', g = record.group, at = 'batch', b = id},
      keep, most)
  else
    kept[#kept + 1] = member
  end
end
if not whole and #kept == 0 then
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
local topped = 0
local lost = not whole and #kept < #record.members
if not whole and #kept < tonumber(ARGV[6]) and not holder and record.attempts == 0
    and not record.split and not record.sibling then
  local at = {prefix = keys_prefix, pending = KEYS[8], due = KEYS[9], due_live = KEYS[12],
    inflight = KEYS[10], keep = keep, most = most, subject_keep = tonumber(ARGV[8]),
    now = now, short = KEYS[14], tokens = KEYS[4], schedule = KEYS[6], batches = KEYS[2]}
  local absorbed = absorb(at, KEYS[1], record, kept, tonumber(ARGV[6]))
  local taken = top_up(KEYS[1], record, kept, at, tonumber(ARGV[6]), tonumber(ARGV[7]))
  topped = absorbed + taken
  if taken > 0 then
    redis.call('HINCRBY', KEYS[13], 'batched', taken)
  end
  if topped > 0 then
    redis.call('HINCRBY', KEYS[13], 'topped_up', topped)
  end
end
if lost or topped > 0 then
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
local need = ARGV[9] == '1' and tonumber(ARGV[19] or '') or nil
-- A renewal whose first try fenced the batch (only this token's claims write a mark a
-- renewal finds: a new holder's claim clears it above).
local fenced_before = need and holder and redis.call('HEXISTS', KEYS[5], id) == 1
local refusal, half = false, false
if not fenced_before then
  refusal = redis.call('GET', keys_prefix .. 'refused:' .. record.group .. SEP
    .. record.state .. SEP .. record.kind)
  if type(record.sibling) == 'string' and record.sibling ~= '' then
    half = redis.call('GET', keys_prefix .. 'refused-half:' .. id)
  end
end
if ARGV[9] ~= '1' or refusal or half then
  return {'claimed', record_json, topped, refusal, half}
end

-- Whether a member asks for its opt-out in Braze to be read before the request: its third
-- element not 0 (delivery/opt_outs.py `to_check`; unsure: yes). Members decoded, or read
-- off the text by record_head (`asks_read`).
local function asks_opt_out_read()
  if record.state ~= 'subscribed' then
    return false
  end
  local members = whole and record.members or (not whole and kept) or nil
  if not members then
    return asks_read
  end
  for _, member in ipairs(members) do
    local respect = member[3]
    if respect ~= 0 and respect ~= false and respect ~= cjson.null then
      return true
    end
  end
  return false
end

-- The fence in this call (see above): 1 when fenced, 0 when the poster fences later;
-- nothing when not asked.
local function fence_now(granted, wait)
  if not need then
    return nil
  end
  if fenced_before then
    redis.call('HSET', KEYS[5], id, now)
    return 1
  end
  if granted ~= 1 or wait > 0 or lease_end - now <= need or #(record.pack or {}) > 1 then
    return 0
  end
  local count = whole and #fields or #kept
  if count < tonumber(ARGV[6]) and holder and record.attempts == 0 and not record.split
      and not record.sibling then
    return 0  -- a renewal's short batch: the top-up before the send may take some
  end
  if ARGV[20] == '1' and asks_opt_out_read() then
    return 0
  end
  redis.call('HSET', KEYS[5], id, now)
  return 1
end

local noted = keys_prefix .. 'turn:' .. id
local token_sep = ARGV[2] .. SEP
if holder then
  local note = redis.call('GET', noted)
  if note and string.sub(note, 1, #token_sep) == token_sep then
    local granted, at, mark, why = string.match(string.sub(note, #token_sep + 1),
      '^(%d)\31([^\31]*)\31([^\31]*)\31(.*)$')
    local wait = math.max(0, math.ceil(tonumber(at) - now_ms_exact()))
    return {'claimed', record_json, topped, refusal, half, tonumber(granted), wait,
      granted == '1' and at or '', mark, why, fence_now(tonumber(granted), wait)}
  end
end
local turn = take_turn(KEYS[15], KEYS[16], ARGV, 9)
local at = turn[3]
if turn[1] == 0 then
  at = string.format('%.3f', now + turn[2])
end
redis.call('SET', noted, token_sep .. turn[1] .. SEP .. at .. SEP .. turn[4] .. SEP .. turn[5],
  'PX', 2 * tonumber(ARGV[3]))
return {'claimed', record_json, topped, refusal, half, turn[1], turn[2], turn[3], turn[4],
  turn[5], fence_now(turn[1], turn[2])}

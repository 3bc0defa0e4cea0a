-- finish_batch.lua: end a batch, delivered or dead-lettered, and unlock its identifiers.
--
-- KEYS[1] batch     STRING batch record; deleted
-- KEYS[2] batches   ZSET   batch id -> sweep deadline; the batch leaves it
-- KEYS[3] claims    ZSET   batch id -> lease end; the claim ends
-- KEYS[4] tokens    HASH   batch id -> holder's token; must be ARGV[2]; removed
-- KEYS[5] fences    HASH   batch id -> sent at ms; removed
-- KEYS[6] pending   HASH   field -> change (read: a newer change waiting for the lock)
-- KEYS[7] due       ZSET   field -> due ms; a waiting newer change becomes due (in its
--                          lane's set: this one for bulk, the one `lane_due` names for live)
-- KEYS[8] inflight  HASH   field -> batch id; this batch's locks are released
-- KEYS[9] dlq       HASH   entry id -> JSON entry (written when dead-lettering)
-- KEYS[10] dlq index ZSET  entry id -> dead-lettered at ms
-- KEYS[11] dlq count STRING identifiers in the dead-letter store
-- KEYS[12] stats    HASH   "delivered" / "dead_lettered" += members; "opt_out_skipped" +=
--                          members left out (listed in ARGV[11..]), counted once, here
-- KEYS[13] dlq fields HASH field -> entry id, for the members no newer change supersedes
-- KEYS[14] request totals HASH "<endpoint> <status>" -> requests (when ARGV[13] is given)
-- ARGV[1] batch id  ARGV[2] claim token  ARGV[3] "delivered" | "dead"  ARGV[4] error text
-- ARGV[5] JSON array of member values Braze's 2xx `errors` named (delivered only; may be
--         empty): those members alone are dead-lettered, with ARGV[4]; the rest delivered
-- ARGV[6] HTTP status ("" when none came)   ARGV[7] Braze's answer time in ms ("")
-- ARGV[8] history retention (ms)   ARGV[9] most history events per identifier
-- ARGV[10] subject key lifetime (ms)   ARGV[11] the error text for the members' histories
-- ARGV[12] "all" when every member was sent, "listed" when only ARGV[17..] were (the
-- others were left out: Braze holds an opt-out their change asked to respect)
-- ARGV[13..16] the request to count with the outcome, as count_request.lua's ARGV[1],
-- [2], [4], [5] (never a 429's: that one is deferred): the per-second counters' key name
-- without the second, identifiers, totals field, seconds kept; ARGV[13] "" counts nothing
-- (a pack's other batches: its first counts the request). Issue 26: one call a post where
-- the count was one of its own after the finish.
-- The texts are confined by the caller (core/redaction.py `confine`): ARGV[4], for the
-- dead-letter entry, quotes no identifier but this batch's members; ARGV[11] quotes none,
-- so no identifier's history or dead letter ever names another one.
-- Per member (see _prelude.lua): history gets "posted" (status, answer time),
-- "skipped_opt_out" or "dead_lettered" (status, attempts, error); the subject keeps the
-- watermark (set again to the member's change if it expired meanwhile) and, when dead, a
-- reference to the entry. Both keys live their retention (and the slack) from now: when
-- the member's take already gave them that long (`member_covered`: now + retention no later
-- than its covered time, so within a minute of the take, see EXPIRY_SLACK_MS), no expiry
-- is set again and the watermark is not read: the subject cannot have expired since the
-- take wrote the watermark, which only a later change raises (issue 26: three calls of
-- four a member; a previous release's member, or a finish past the cover, as before). A
-- dead member's new reference to its entry is covered alike: the subject's lifetime is at
-- least the dead-letter retention. (Settings that shorten a lifetime between a take and
-- its finish shorten keys already expiring later, as they do today.) Members erased while the batch was on the wire are no longer in
-- the record (forget.lua scrubbed it), so nothing about them is written here.
--
-- Guarantees: the batch ends exactly once, in one step with the release of its locks, so
-- a newer change for one of its identifiers becomes due only after this batch's state has
-- reached Braze or the dead-letter store (order per identifier). A dead-lettered batch is
-- recorded whole, with its error and attempts: nothing is dropped silently. Returns the
-- number of members ended (0 when all were erased meanwhile); -1 if the caller no longer
-- holds its claim, whether or not the batch has ended since (it was taken back: whoever
-- holds or took it next ends it, and the caller must not report it delivered); -2 if the
-- caller holds the claim of a batch that is gone (cannot happen: only the holder ends a
-- batch). A dead batch left without members (all erased) leaves no dead-letter entry.
-- The request told (ARGV[13..16]) is counted in every case, after the outcome (it was
-- sent whoever ends the batch), as the poster's count after the finish did. The count is
-- bookkeeping: a count that fails (an error of Redis's) fails nothing else, as the count
-- after the finish did not (its writes so far stand, the outcome's too: Redis undoes no
-- write of a script that raises, so a raise here would have left the outcome recorded and
-- the caller told nothing, a v2 pack's other batches never finished); the reply is then
-- {the number above, Redis's error text} for the caller to log.
local now = now_ms()
local function count(reply)
  if ARGV[13] ~= '' then
    local ok, err = pcall(count_post, KEYS[14], ARGV[13], ARGV[14], '0', ARGV[15],
      ARGV[16], now)
    if not ok then
      return {reply, type(err) == 'table' and tostring(err.err) or tostring(err)}
    end
  end
  return reply
end
if redis.call('HGET', KEYS[4], ARGV[1]) ~= ARGV[2] then
  return count(-1)
end
local record_json = redis.call('GET', KEYS[1])
if not record_json then
  end_claim(KEYS[3], KEYS[4], KEYS[5], ARGV[1])
  return count(-2)
end
local record = cjson.decode(record_json)
local prefix = record.group .. SEP .. record.kind .. SEP
local named = {}
if ARGV[5] and ARGV[5] ~= '' then
  for _, value in ipairs(cjson.decode(ARGV[5])) do
    named[value] = true
  end
end
local keys_prefix = key_prefix(KEYS[6])
local subject_prefix, history_prefix = keys_prefix .. 'subject:', keys_prefix .. 'history:'
local status, answered = tonumber(ARGV[6]), tonumber(ARGV[7])
-- The expiries' texts formatted once a batch (issue 26: no number formatted per member,
-- see `digits` in _prelude.lua); the history's retention a number once (the cutoff's
-- arithmetic converted its text once a member).
local keep, most = tonumber(ARGV[8]), tonumber(ARGV[9])
local subject_keep = ARGV[10]
local keep_at, subject_at = expiry_at(now, keep), expiry_at(now, subject_keep)
local keep_until, subject_until = now + keep, now + tonumber(subject_keep)
local sent = nil
if ARGV[12] == 'listed' then
  sent = {}
  for i = 17, #ARGV do
    sent[ARGV[i]] = true
  end
end
local mark_field = 'w' .. SEP .. record.group
-- A member's history event is the same for every member of the batch (its outcome, the
-- batch, the answer): encoded once a batch, not once a member (issue 26).
local dead_entry = {now .. SEP .. cjson.encode({e = 'dead_lettered', g = record.group,
  b = ARGV[1], h = status, n = record.attempts + 1, x = ARGV[11]})}
local skipped_entry = {now .. SEP .. cjson.encode({e = 'skipped_opt_out', g = record.group,
  b = ARGV[1]})}
local posted_entry = {now .. SEP .. cjson.encode({e = 'posted', g = record.group,
  b = ARGV[1], h = status, l = answered})}
local identifiers = {}
local delivered = 0
-- The members' locks and newer changes in one HMGET each (issue 26: two calls a batch, not
-- three or four a member). Nothing below writes the buffer's changes, and a member's lock
-- is released by its own step only (the members are distinct).
local fields = {}
for n, member in ipairs(record.members) do
  fields[n] = prefix .. member[1]
end
local locks = call_in_slices('HMGET', KEYS[8], fields)
local newers = call_in_slices('HMGET', KEYS[6], fields)
local released = {}  -- the locks this batch holds, released in one HDEL (issue 26)
for n, member in ipairs(record.members) do
  local dead = ARGV[3] == 'dead' or named[member[1]] == true
  local field = fields[n]
  -- The keys by the digest, the oldest event's time as the take learnt them (issue 26:
  -- no SHA-1, no LINDEX a member; a previous release's record: both as before).
  local digest = member_digest(record.kind, member)
  local history, subject = history_prefix .. digest, nil
  local head = member_head(member)
  local occurred = member[4]
  -- What the take's expiries cover (issue 26): nothing for a previous release's member.
  local covered = member_covered(member)
  local history_at = keep_at
  if covered and keep_until <= covered then
    history_at = false
  end
  local subject_covered = covered and subject_until <= covered
  if dead or not subject_covered then
    -- (issue 26: the subject's name only where it is written, a concatenation a member)
    subject = subject_prefix .. digest
  end
  if occurred and not subject_covered then
    local mark = tonumber(redis.call('HGET', subject, mark_field))
    if not mark or mark < occurred then
      redis.call('HSET', subject, mark_field, digits(occurred))
    end
  end
  if dead then
    redis.call('HSET', subject, 'd' .. SEP .. ARGV[1], record.group)
    remember_entries(history, now, dead_entry, keep, most, nil, history_at, head)
  elseif sent and not sent[member[1]] then
    remember_entries(history, now, skipped_entry, keep, most, nil, history_at, head)
    redis.call('HINCRBY', KEYS[12], 'opt_out_skipped', 1)
  else
    remember_entries(history, now, posted_entry, keep, most, nil, history_at, head)
  end
  if not subject_covered then
    touch_subject(subject, subject_keep, subject_at)
  end
  local newer = newers[n]
  if locks[n] == ARGV[1] then
    released[#released + 1] = field
    if newer then
      local change = cjson.decode(newer)
      redis.call('ZADD', lane_due(KEYS[7], change), change.t, field)
    end
  end
  local superseded = newer ~= false
  if dead and not superseded then
    redis.call('HSET', KEYS[13], field, ARGV[1])
  end
  if dead then
    identifiers[#identifiers + 1] = {
      kind = record.kind, value = member[1], seq = member[2], superseded = superseded,
      r = member[3] or 0, w = member[4]}
  else
    delivered = delivered + 1
  end
end
call_in_slices('HDEL', KEYS[8], released)
if #identifiers > 0 then
  redis.call('HSET', KEYS[9], ARGV[1], cjson.encode({
    id = ARGV[1], subscription_group_id = record.group, subscription_state = record.state,
    use_double_opt_in_logic = record.doi == 1, identifiers = identifiers, error = ARGV[4],
    -- the attempt that just failed is not yet in the record (defer_batch.lua counts)
    attempts = record.attempts + 1, created_at = record.created, dead_lettered_at = now}))
  redis.call('ZADD', KEYS[10], now, ARGV[1])
  redis.call('INCRBY', KEYS[11], #identifiers)
  redis.call('HINCRBY', KEYS[12], 'dead_lettered', #identifiers)
end
if delivered > 0 then
  redis.call('HINCRBY', KEYS[12], 'delivered', delivered)
end
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[1])
end_claim(KEYS[3], KEYS[4], KEYS[5], ARGV[1])
return count(#record.members)

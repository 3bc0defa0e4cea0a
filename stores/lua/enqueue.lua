-- enqueue.lua: add changes to the buffer; the change that occurred last wins per group +
-- identifier, whatever order changes arrive in.
--
-- KEYS[1] seq       STRING counter; each change gets the next sequence number
-- KEYS[2] pending   HASH   field -> {"s": state, "o": double opt-in 0|1, "q": seq, "t": due ms,
--                          and only when they say something: "w": occurred at ms (else the
--                          arrival, t - d, stands in), "d": delay ms, "r": 1 to respect an
--                          opt-out, "c": source, "x": 1 when older than the watermark
--                          retention, "p": 1 when re-queued by a replay, "l": 1 in the
--                          live lane (absent: bulk)}
-- KEYS[3] due       ZSET   field -> due ms; holds the bulk lane's pending fields that no
--                          batch locks
-- KEYS[4] inflight  HASH   field -> batch id (read only here)
-- KEYS[5] stats     HASH   "enqueued" += changes received, "stale" += changes dropped,
--                          "beyond_retention" += accepted changes older than the watermarks
-- KEYS[6] dlq fields HASH  field -> dead-letter entry id; a newer change removes the field
-- KEYS[7] groups    SET    every group id a change was enqueued for (erasure looks there)
-- KEYS[8] nudge     LIST   one item: wakes a coalescer waiting for work (_prelude.lua)
-- KEYS[9] due live  ZSET   like KEYS[3], for the live lane's fields
-- KEYS[10] nudge live LIST like KEYS[8], pushed only when a live change was accepted
-- Per identifier (see _prelude.lua; named by the digest argument): subject (read: watermark
-- per group), history (written only for a change dropped as stale, or replacing a pending
-- one or a dead letter)
-- ARGV[1] watermark retention (ms)   ARGV[2] history retention (ms)
-- ARGV[3] most history events kept per identifier
-- ARGV[4] lane of the changes that name none: "live" | "bulk"
-- ARGV[5] G, the number of groups the call's changes name; ARGV[6..5+G] those groups
-- ARGV[6+G..] groups of five (stores/buffer.py `encode_change` owns the format): field;
--         the identifier's digest (SHA-1 of "kind SEP value", as identity_keys computes
--         it: names its subject and history keys); occurred at in ms ("" = now); the
--         profile: the lane as one character ("l" live, "b" bulk, "-" = ARGV[4]) and the
--         delay in ms; and the members of the pending JSON that the producer knows ("s",
--         "o", and only when they say something "w", "d", "r", "c"), which this script
--         completes with "q", "t", and "x" and "l" when they apply
--
-- Guarantees: the changes are applied in argument order with no other command in between.
-- A change is accepted when it occurred no earlier than the latest change accepted for its
-- field: the pending one, else the watermark (the change in flight or delivered, kept for
-- the retention; set by take_batch.lua, which the delivery rate bounds, so that ingest
-- pays only a read). Without an occurred time, Redis's clock at arrival stands in; equal
-- times: the later arrival wins. An older change is dropped, counted as stale and told in
-- the history; an accepted one replaces the pending one (whose "enqueued" and
-- "superseded" the history then gets; a pending change's own "enqueued" is written when it
-- is taken into a batch, with its arrival time). A field that an in-flight batch locks is
-- not made due: that batch's end makes it due (finish_batch.lua), so an identifier is
-- never in two batches at once. Due times are Redis server time plus the delay. A
-- dead-lettered change for the same field is superseded: replay will skip it. A coalescer
-- waiting for work is woken in the same step (no extra round trip). Lanes: a change is
-- live if it says so, or if it replaces a pending live change (the newer state keeps the
-- older one's place in the queue, whatever lane it came by); a live field is due in
-- KEYS[9], a bulk one in KEYS[3], never both. Lanes change nothing about which change
-- wins. Returns {last sequence number, changes dropped as stale}.
--
-- Cost (bench/enqueue_cost.py): what a change needs alone is done per change — its
-- comparison, and the watermark read when nothing is pending for it; everything else is
-- done once per call: one HMGET reads the pending changes of every field (and, only when
-- those hashes hold anything, their locks and dead letters), and one HSET, one ZADD per
-- lane, one HDEL and one SADD write what the call accepted, each field's last accepted
-- change (a later change of the same field in the call compares with the one before it,
-- held here). Measured with callgrind, each argument costs Redis ~850 instructions to
-- parse and hand to Lua, and so does each call of a C function from Lua (string.find,
-- tonumber, string.format): a change comes in five arguments that need no parsing for
-- the common case. The producer formats the members of the pending JSON it knows; the
-- script adds what only Redis knows (the sequence number, the due time, "x", "l") in one
-- concatenation. What a call's changes share is worked out once per call: the groups
-- (sent once, for one SADD), the due time and lane of each profile, integers formatted
-- as integers (never cjson's floats), and the sequence numbers' text without a sprintf
-- each; the occurred time read by arithmetic, not tonumber() (two strtod). History
-- written here is only what no later step can write: a change dropped as stale, one
-- replaced while pending (its "enqueued" and "superseded") or replacing a dead letter; a
-- change that is accepted gets its "enqueued", "batched" and the watermark when taken
-- into a batch (take_batch.lua), at the rate Braze accepts.
local GROUPS = tonumber(ARGV[5])
local FIRST = 6 + GROUPS
local WIDTH = 5
local n = (#ARGV - FIRST + 1) / WIDTH
local last = redis.call('INCRBY', KEYS[1], n)
local seq = last - n
local now = now_ms()
local prefix = key_prefix(KEYS[2])
local horizon = now - tonumber(ARGV[1])
local keep, most = tonumber(ARGV[2]), tonumber(ARGV[3])
local default_live = ARGV[4] == 'live'
local stale, old = 0, 0
local any_live = false

local function group_of(field)
  return string.sub(field, 1, string.find(field, SEP, 1, true) - 1)
end

-- Reads, one per call: every field's pending change, and, only where those hashes hold
-- anything, the batch that locks it and its dead letter; and whether any field with no
-- pending change has a subject key at all (one EXISTS): an identifier changed within the
-- watermark retention has one, a new identifier (most of an import) has none, and then
-- its watermark needs no read.
local distinct, digests, seen, count = {}, {}, {}, 0
for i = FIRST, #ARGV, WIDTH do
  local field = ARGV[i]
  if not seen[field] then
    seen[field] = true
    count = count + 1
    distinct[count] = field
    digests[count] = ARGV[i + 1]
  end
end
local function present(key, often_empty)
  local found = {}
  if not often_empty or redis.call('EXISTS', key) == 1 then
    for k, value in ipairs((call_in_slices('HMGET', key, distinct))) do
      if value then
        found[distinct[k]] = value
      end
    end
  end
  return found
end
local before = present(KEYS[2], false)  -- field -> its pending change's JSON before this call
local locked = present(KEYS[4], true)   -- field -> the batch in flight that locks it
local dead = present(KEYS[6], true)     -- field -> the dead letter holding it
local subjects, unread = {}, 0
local subject_prefix = prefix .. 'subject:'
for k = 1, count do
  if not before[distinct[k]] then
    unread = unread + 1
    subjects[unread] = subject_prefix .. digests[k]
  end
end
-- (for one field the EXISTS would only add a call to its HGET)
local any_marks = unread == 1
if unread > 1 then
  local _, marked = call_in_slices('EXISTS', nil, subjects)
  any_marks = marked > 0
end

-- profile ("l", "b" or "-", then the delay in ms) -> {due time text, named live (or
-- none with a live default), delay}: worked out once per call for each profile
local profiles = {}
local function profile_of(text)
  local delay = tonumber(string.sub(text, 2))
  local mark = string.sub(text, 1, 1)
  local found = {string.format('%d', now + delay), mark == 'l' or (mark == '-' and default_live)}
  profiles[text] = found
  return found
end

-- The sequence numbers as text without formatting each (Lua writes a number through
-- sprintf "%.14g", ~2,250 instructions, 6 % of an import's change; issue 26): the
-- thousands formatted once per thousand, then the tens and the units looked up
-- (DIGITS are constants of this script; its 100 pairs are made once per call). Below
-- 1,000 (a fresh Redis) the number is written whole, as JSON wants it (no leading zeros).
local DIGITS = {[0] = '0', '1', '2', '3', '4', '5', '6', '7', '8', '9'}
local PAIRS = {}
for a = 0, 9 do
  for b = 0, 9 do
    PAIRS[a * 10 + b] = DIGITS[a] .. DIGITS[b]
  end
end
local thousands = math.floor(seq / 1000)
local pair = math.floor((seq - thousands * 1000) / 10)
local unit = seq - thousands * 1000 - pair * 10
local high = thousands > 0 and string.format('%d', thousands) or nil

-- Only a call that names a field twice needs the change it accepted last for a field
-- (a later change of it compares with that one); most calls name each once.
local repeats = count < n
local accepted = {}  -- field -> JSON of its change this call accepted last (`repeats`)
local writes, bulk, live_dues, left_bulk, dead_gone = {}, {}, {}, {}, {}
local written, bulk_count, live_count = 0, 0, 0
for i = FIRST, #ARGV, WIDTH do
  seq = seq + 1
  unit = unit + 1
  if unit == 10 then
    unit = 0
    pair = pair + 1
    if pair == 100 then
      pair = 0
      thousands = thousands + 1
      high = string.format('%d', thousands)
    end
  end
  local field = ARGV[i]
  local occurred_text = ARGV[i + 2]
  local given = nil
  if occurred_text ~= '' then
    -- The producer's integer text made a number by arithmetic: one conversion, where
    -- tonumber() makes two (lua_isnumber, then lua_tonumber: strtod twice) and a call.
    given = occurred_text + 0
  end
  local occurred = given or now
  local text = before[field]
  if repeats then
    text = accepted[field] or text
  end
  local pending, mark = nil, nil
  if text then
    pending = cjson.decode(text)
    mark = occurred_of(pending)
  elseif any_marks then
    mark = tonumber(redis.call('HGET', subject_prefix .. ARGV[i + 1],
      'w' .. SEP .. group_of(field)))
  end
  if mark and occurred < mark then
    stale = stale + 1
    local change = cjson.decode('{' .. ARGV[i + 4] .. '}')
    remember(prefix .. 'history:' .. ARGV[i + 1], now, {e = 'stale', g = group_of(field),
      s = change.s, o = given, c = change.c, m = mark, q = seq}, keep, most)
  else
    local profile = profiles[ARGV[i + 3]] or profile_of(ARGV[i + 3])
    local due = profile[1]
    local live = profile[2] or (pending and pending.l == 1)
    local beyond = ''
    if given and given < horizon then
      beyond = ',"x":1'
      old = old + 1
    end
    local lane_member = ''
    if live then
      lane_member = ',"l":1'
      any_live = true
    end
    local json
    if high then
      json = '{' .. ARGV[i + 4] .. ',"q":' .. high .. PAIRS[pair] .. DIGITS[unit]
        .. ',"t":' .. due .. beyond
        .. lane_member .. '}'
    else
      json = '{' .. ARGV[i + 4] .. ',"q":' .. seq .. ',"t":' .. due .. beyond .. lane_member
        .. '}'
    end
    if repeats then
      accepted[field] = json
    end
    writes[written + 1] = field
    writes[written + 2] = json
    written = written + 2
    if not locked[field] then
      if live then
        if pending then
          left_bulk[#left_bulk + 1] = field
        end
        live_dues[live_count + 1] = due
        live_dues[live_count + 2] = field
        live_count = live_count + 2
      else
        bulk[bulk_count + 1] = due
        bulk[bulk_count + 2] = field
        bulk_count = bulk_count + 2
      end
    end
    if pending or dead[field] then
      local history = prefix .. 'history:' .. ARGV[i + 1]
      local group = group_of(field)
      if pending then
        if not pending.p then
          remember_enqueued(history, group, pending, keep, most)
        end
        remember(history, now, {e = 'superseded', g = group, at = 'pending', q = seq}, keep,
          most)
      end
      if dead[field] then
        dead[field] = nil
        dead_gone[#dead_gone + 1] = field
        remember(history, now, {e = 'superseded', g = group, at = 'dead_letter', q = seq},
          keep, most)
      end
    end
  end
end

-- Writes, one command per call (per slice), in argument order, so a field written twice
-- keeps its last change: HSET and ZADD apply their pairs in order. A field that turned
-- live leaves the bulk due set after every bulk ZADD; live never turns back to bulk.
call_in_slices('HSET', KEYS[2], writes)
call_in_slices('ZADD', KEYS[3], bulk)
call_in_slices('ZREM', KEYS[3], left_bulk)
call_in_slices('ZADD', KEYS[9], live_dues)
call_in_slices('HDEL', KEYS[6], dead_gone)
call_in_slices('SADD', KEYS[7], {unpack(ARGV, 6, FIRST - 1)})
redis.call('HINCRBY', KEYS[5], 'enqueued', n)
if stale > 0 then
  redis.call('HINCRBY', KEYS[5], 'stale', stale)
end
if old > 0 then
  redis.call('HINCRBY', KEYS[5], 'beyond_retention', old)
end
nudge(KEYS[8])
if any_live then
  nudge(KEYS[10])
end
return {last, stale}

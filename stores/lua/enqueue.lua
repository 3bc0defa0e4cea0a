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
-- ARGV[5..] groups of nine (stores/buffer.py `encode_change` owns the format): field,
--         state, double opt-in (0|1), delay in ms, occurred at in ms ("" = now), source
--         (may be ""), respect opt-out (0|1), lane ("live" | "bulk" | "" = ARGV[4]), the
--         identifier's digest (SHA-1 of "kind SEP value", as identity_keys computes it:
--         names its subject and history keys)
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
-- held here). Pending changes are written as text built here rather than by cjson, so
-- no number is formatted as a float: the due time once per delay, the sequence number as
-- an integer, the rest copied from the arguments. History written here is only what no
-- later step can write: a change dropped as stale, one replaced while pending (its
-- "enqueued" and "superseded") or replacing a dead letter; a change that is accepted
-- gets its "enqueued", "batched" and the watermark when taken into a batch
-- (take_batch.lua), at the rate Braze accepts.
local FIRST = 5
local WIDTH = 9
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
local STATES = {subscribed = '"subscribed"', unsubscribed = '"unsubscribed"'}

-- Reads, one per call: every field's pending change, and, only where those hashes hold
-- anything, the batch that locks it and its dead letter; and whether any field with no
-- pending change has a subject key at all (one EXISTS): an identifier changed within the
-- watermark retention has one, a new identifier (most of an import) has none, and then
-- its watermark needs no read.
local distinct, digests, seen = {}, {}, {}
for i = FIRST, #ARGV, WIDTH do
  local field = ARGV[i]
  if not seen[field] then
    seen[field] = true
    distinct[#distinct + 1] = field
    digests[#digests + 1] = ARGV[i + 8]
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
local subjects = {}
for k, field in ipairs(distinct) do
  if not before[field] then
    subjects[#subjects + 1] = prefix .. 'subject:' .. digests[k]
  end
end
-- (for one field the EXISTS would only add a call to its HGET)
local any_marks = #subjects == 1
if #subjects > 1 then
  local _, marked = call_in_slices('EXISTS', nil, subjects)
  any_marks = marked > 0
end

local accepted = {}  -- field -> JSON of its change this call accepted last
local dues = {}      -- delay text -> due time text
local writes, bulk, live_dues, left_bulk, dead_gone = {}, {}, {}, {}, {}
local groups, new_groups = {}, {}
for i = FIRST, #ARGV, WIDTH do
  seq = seq + 1
  local field = ARGV[i]
  local group = string.sub(field, 1, string.find(field, SEP, 1, true) - 1)
  local digest = ARGV[i + 8]
  local given = tonumber(ARGV[i + 4])
  local occurred = given or now
  local source = ARGV[i + 5]
  if source == '' then
    source = nil
  end
  local text = accepted[field] or before[field]
  local pending, mark = nil, nil
  if text then
    pending = cjson.decode(text)
    mark = occurred_of(pending)
  elseif any_marks then
    mark = tonumber(redis.call('HGET', prefix .. 'subject:' .. digest, 'w' .. SEP .. group))
  end
  if mark and occurred < mark then
    stale = stale + 1
    remember(prefix .. 'history:' .. digest, now, {e = 'stale', g = group, s = ARGV[i + 1], o = given, c = source,
      m = mark, q = seq}, keep, most)
  else
    if not pending and not groups[group] then
      groups[group] = true
      new_groups[#new_groups + 1] = group
    end
    local delay = ARGV[i + 3]
    local due = dues[delay]
    if not due then
      due = string.format('%d', now + tonumber(delay))
      dues[delay] = due
    end
    local named = ARGV[i + 7]
    local live = named == 'live' or (named == '' and default_live) or (pending and pending.l == 1)
    local json = '{"s":' .. (STATES[ARGV[i + 1]] or cjson.encode(ARGV[i + 1])) .. ',"o":'
      .. (ARGV[i + 2] == '1' and '1' or '0') .. ',"q":' .. string.format('%d', seq)
      .. ',"t":' .. due
    if given then
      json = json .. ',"w":' .. string.format('%d', given)
      if given < horizon then
        json = json .. ',"x":1'
        old = old + 1
      end
    end
    if delay ~= '0' and tonumber(delay) > 0 then
      json = json .. ',"d":' .. string.format('%d', tonumber(delay))
    end
    if ARGV[i + 6] == '1' then
      json = json .. ',"r":1'
    end
    if source then
      json = json .. ',"c":' .. cjson.encode(source)
    end
    if live then
      json = json .. ',"l":1'
      any_live = true
    end
    json = json .. '}'
    accepted[field] = json
    writes[#writes + 1] = field
    writes[#writes + 1] = json
    if not locked[field] then
      if live then
        if pending then
          left_bulk[#left_bulk + 1] = field
        end
        live_dues[#live_dues + 1] = due
        live_dues[#live_dues + 1] = field
      else
        bulk[#bulk + 1] = due
        bulk[#bulk + 1] = field
      end
    end
    if pending or dead[field] then
      local history = prefix .. 'history:' .. digest
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
call_in_slices('SADD', KEYS[7], new_groups)
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

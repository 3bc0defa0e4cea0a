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
-- Per identifier (see _prelude.lua): subject (read: watermark per group), history (written
-- only for a change dropped as stale, or replacing a pending one)
-- ARGV[1] watermark retention (ms)   ARGV[2] history retention (ms)
-- ARGV[3] most history events kept per identifier
-- ARGV[4] lane of the changes that name none: "live" | "bulk"
-- ARGV[5..] groups of eight (stores/buffer.py `encode_change` owns the format): field,
--         state, double opt-in (0|1), delay in ms, occurred at in ms ("" = now), source
--         (may be ""), respect opt-out (0|1), lane ("live" | "bulk" | "" = ARGV[4])
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
local FIRST = 5
local n = (#ARGV - FIRST + 1) / 8
local last = redis.call('INCRBY', KEYS[1], n)
local seq = last - n
local now = now_ms()
local prefix = key_prefix(KEYS[2])
local horizon = now - tonumber(ARGV[1])
local keep, most = tonumber(ARGV[2]), tonumber(ARGV[3])
local stale, old = 0, 0
local groups = {}
-- Empty hashes need no look-up per change (an import into an idle pipeline).
local any_inflight = redis.call('EXISTS', KEYS[4]) == 1
local any_dead = redis.call('EXISTS', KEYS[6]) == 1
local default_live = ARGV[4] == 'live'
local any_live = false
for i = FIRST, #ARGV, 8 do
  seq = seq + 1
  local field = ARGV[i]
  local group, ident = split_field(field)
  local given = tonumber(ARGV[i + 4])
  local occurred = given or now
  local source = ARGV[i + 5]
  if source == '' then
    source = nil
  end
  local current = redis.call('HGET', KEYS[2], field)
  local pending, mark, history = nil, nil, nil
  if current then
    pending = cjson.decode(current)
    mark = occurred_of(pending)
  else
    local subject
    subject, history = identity_keys(prefix, ident)
    mark = tonumber(redis.call('HGET', subject, 'w' .. SEP .. group))
  end
  if mark and occurred < mark then
    stale = stale + 1
    if not history then
      local _
      _, history = identity_keys(prefix, ident)
    end
    remember(history, now, {e = 'stale', g = group, s = ARGV[i + 1], o = given, c = source,
      m = mark, q = seq}, keep, most)
  else
    if not pending then
      groups[group] = true
    end
    local delay = tonumber(ARGV[i + 3])
    local due = now + delay
    local beyond = nil
    if given and given < horizon then
      beyond = 1
      old = old + 1
    end
    local respect, delayed = nil, nil
    if ARGV[i + 6] == '1' then
      respect = 1
    end
    if delay > 0 then
      delayed = delay
    end
    local named = ARGV[i + 7]
    local live = nil
    if named == 'live' or (named == '' and default_live) or (pending and pending.l == 1) then
      live = 1
      any_live = true
    end
    redis.call('HSET', KEYS[2], field, cjson.encode({
      s = ARGV[i + 1], o = tonumber(ARGV[i + 2]), q = seq, t = due, w = given, d = delayed,
      r = respect, c = source, x = beyond, l = live}))
    if pending then
      local _
      _, history = identity_keys(prefix, ident)
      if not pending.p then
        remember_enqueued(history, group, pending, keep, most)
      end
      remember(history, now, {e = 'superseded', g = group, at = 'pending', q = seq}, keep, most)
    end
    if not any_inflight or redis.call('HEXISTS', KEYS[4], field) == 0 then
      if live then
        if pending then
          redis.call('ZREM', KEYS[3], field)
        end
        redis.call('ZADD', KEYS[9], due, field)
      else
        redis.call('ZADD', KEYS[3], due, field)
      end
    end
    if any_dead and redis.call('HDEL', KEYS[6], field) == 1 then
      if not history then
        local _
        _, history = identity_keys(prefix, ident)
      end
      remember(history, now, {e = 'superseded', g = group, at = 'dead_letter', q = seq},
        keep, most)
    end
  end
end
local names = {}
for group in pairs(groups) do
  names[#names + 1] = group
end
if #names > 0 then
  redis.call('SADD', KEYS[7], unpack(names))
end
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

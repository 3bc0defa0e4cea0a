-- _prelude.lua: prepended to every script in this folder when it is loaded
-- (stores/scripts.py), as BullMQ's includes are. It defines only constants and helpers.
--
-- SEP             the byte between group, kind and value in a buffer field (stores/keys.py
--                 owns the format: "group \31 kind \31 value")
-- now_ms()        Redis's clock in whole milliseconds (every record's timestamps)
-- now_ms_exact()  Redis's clock in fractional milliseconds (the rate limiter's arithmetic)
local SEP = '\31'

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function now_ms_exact()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
end


-- Per identifier (kind + value, across groups) two keys hold what outlives the buffer.
-- Their names carry a SHA-1 of "kind \31 value", never the identifier itself, and the
-- hash tag of the declared keys, so they live in the same slot (Redis Cluster) although
-- they are not declared in KEYS by the scripts that touch one pair per member of a batch
-- (up to 50 pairs: Python would hash every member for names the script derives anyway);
-- forget.lua, which touches one identifier, declares them:
--   P .. "subject:" .. sha1   HASH  "w" SEP group -> occurred at ms of the latest change
--                                   accepted (the watermark); "d" SEP dead-letter entry id
--                                   -> group, for every entry holding the identifier
--   P .. "history:" .. sha1   LIST  "ms" SEP JSON event, oldest first (consent history)
-- P (the prefix with its hash tag, "{braze-subs}:") is read off a declared key's name.
--
-- key_prefix(key)          "{prefix}:" of a declared key name
-- split_field(field)       group, "kind SEP value" of a buffer field
-- identity_keys(P, ident)  the subject and history keys of "kind SEP value"
-- EXPIRY_SLACK_MS         every expiry of a subject or history key is its retention and
--                          this minute more (issue 26: so the take's expiries cover the
--                          finish's, which then sets none; see `member_covered`)
-- touch_subject(k, ms)     let the subject key live `ms` (and the slack) more; every caller
--                          passes the same lifetime (at least the watermark and dead-letter
--                          retentions) counted from now, so this never shortens it
--                          (`touch_subject(k, ms, at)`: at `at`, `expiry_at`'s text)
-- expiry_at(now, ms)       the text of the expiry a key kept `ms` after `now` gets
-- occurred_of(change)      occurred at of a pending change (its JSON decoded): "w", or
--                          its arrival (due time less its delay)
-- remember_enqueued(h, group, change, keep_ms, max_events)
--                          append the "enqueued" event of a pending change (its JSON
--                          decoded), at its arrival time
-- remember(h, now, event, keep_ms, max_events)
--                          append an event (a table; cjson-encoded) to a history, drop
--                          the events beyond `max_events` or older than `keep_ms`, and
--                          let the history expire `keep_ms` after its newest event
-- remember_entries(h, now, entries, keep_ms, max_events, first_ms, expire_at, head_ms)
--                          the same for entries already encoded ("ms" SEP JSON, oldest
--                          first), appended in one RPUSH, the cutoff `now` - `keep_ms`;
--                          `first_ms` (optional), the time of entries[1]: a list that
--                          holds no entry but these is not looked at again for its oldest;
--                          `expire_at` (optional), `expiry_at(now, keep_ms)` (`expire`);
--                          false: no expiry set (the caller knows the key's covers it);
--                          `head_ms` (optional), a time no later than the oldest event's
--                          of the list before this append (a batch record's member holds
--                          the one its take learnt, `member_head`): not past the
--                          retention, the list is not looked at for its oldest either.
--                          Returns a time no later than the oldest event's now (nil when
--                          not known without reading), for the caller to keep as such
-- member_keys(P, kind, member)
--                          the subject and history keys of a batch record's member: by
--                          the digest its take stored (member[5]), else (a record a
--                          previous release wrote) by SHA-1 of "kind SEP value"
-- member_digest(kind, member)
--                          that digest alone (the finish names the subject key only where
--                          it writes it)
-- member_head(member)      the time no later than its history's oldest event that the
--                          member's take stored (member[6]; nil when none)
-- member_covered(member)   the least of the expiries the member's take gave its subject
--                          and history keys (member[7]; nil when none)
-- enqueued_entry(group, change, arrival, occurred, seq, texts)
--                          the encoded "enqueued" entry of a pending change (its JSON
--                          decoded), at its arrival time; the optional texts (`digits`
--                          of its arrival, its "w", its "q"; `texts`: the group's JSON as
--                          .group, and filled as met the entry's opening with the group
--                          as .head and each state's member `,"s":JSON` in .states)
--                          spare formatting them again
-- digits(n)                the text of number `n` as cjson writes it (%.14g), integers
--                          by integer formatting
--
-- (Issue 26: Redis 7.0 formats a number passed to redis.call with %.17g, and cjson and
-- Lua's `..` theirs with %.14g, each through libc's floating-point printf: a fifth of the
-- cut's instructions went there. The per-member scripts pass texts instead: the ARGV
-- strings as given, a time formatted once, an integer through `digits`.)
local function key_prefix(key)
  return string.match(key, '^(.-}:)')
end

local function split_field(field)
  local at = string.find(field, SEP, 1, true)
  return string.sub(field, 1, at - 1), string.sub(field, at + 1)
end

local function identity_keys(prefix, ident)
  local digest = redis.sha1hex(ident)
  return prefix .. 'subject:' .. digest, prefix .. 'history:' .. digest, digest
end

-- A batch record's member is [value, seq, respect opt-out 0|1, occurred at ms, digest,
-- head, covered]: the digest of "kind SEP value" and a time no later than the oldest event
-- of the identifier's history (null when not learnt), both as its take learnt them (issue
-- 26: the finish spares a SHA-1 and a LINDEX a member), and the least of the expiries the
-- take gave the identifier's subject and history keys (issue 26: the finish spares its
-- watermark read and its expiries while they cover its own, see finish_batch.lua). A
-- record written by a previous release holds the first four (or six) only, and that
-- release reads the first four (or six) only (a rolling upgrade in either direction
-- finishes every record). The covered time stays true while the record lives: an expiry
-- only moves later (every writer sets now + retention + EXPIRY_SLACK_MS; erasure, which
-- deletes the keys, takes the member out of the record), and a member moves between
-- records (absorb, split) with its own. The head stays a lower bound while the record lives:
-- events are appended at the end and dropped from the head only, and the list expires
-- only `keep` after its newest event, which is after the take's "batched" (later, the head
-- is past the retention and is read again); erasure takes the member out of the record.
local function member_digest(kind, member)
  local digest = member[5]
  if type(digest) ~= 'string' or #digest ~= 40 then
    digest = redis.sha1hex(kind .. SEP .. member[1])
  end
  return digest
end

local function member_keys(prefix, kind, member)
  local digest = member_digest(kind, member)
  return prefix .. 'subject:' .. digest, prefix .. 'history:' .. digest
end

-- record_head(text)        a batch record's JSON read without its members (issue 26: the
--                          claim decoded every member, ~10,500 instructions each with its
--                          13-digit numbers through strtod, to name their buffer fields):
--                          the record decoded without "members", and the members' values
--                          in order; nil when the text is not of the layout take_batch.lua
--                          writes (the members last, no backslash anywhere: so no text
--                          holds a quote, `"` ends the value, and `":` past the members'
--                          start would be another key), for the caller to cjson.decode it
--                          whole. Four plain finds a member (Lua's patterns cost ~250
--                          instructions a character: a gmatch would cost more than cjson).
--                          `respects` (optional): also whether a member of a "subscribed"
--                          record asks to respect Braze's opt-out (its third element not
--                          a plain 0; unsure: true), a third answer (issue 26: the claim
--                          that fences, claim_batch.lua); false for any other record.
--                          One plain find and three bytes a member more.
local MEMBERS_AT = ',"members":['

local function record_head(text, respects)
  if string.find(text, '\\', 1, true) then
    return nil
  end
  local at = string.find(text, MEMBERS_AT, 1, true)
  local last = #text - 2  -- `]]}`: the last member's end, the members' end, the record's
  if not at or string.sub(text, last) ~= ']]}'
      or string.find(text, '":', at + #MEMBERS_AT, true) then
    return nil
  end
  local record = cjson.decode(string.sub(text, 1, at - 1) .. '}')
  if record.members ~= nil then
    return nil
  end
  local asks = false
  respects = respects and record.state == 'subscribed'
  local values = {}
  local pos = at + #MEMBERS_AT
  while true do
    if string.find(text, '["', pos, true) ~= pos then
      return nil
    end
    local close = string.find(text, '"', pos + 2, true)
    local stop = close and string.find(text, ']', close, true)
    if not stop then
      return nil
    end
    values[#values + 1] = string.sub(text, pos + 2, close - 1)
    if respects and not asks then
      -- `"value",seq,respect,`: a number's text (it begins with a digit) holds no comma.
      local first = string.byte(text, close + 2)
      local comma = string.find(text, ',', close + 2, true)
      local after = comma and string.byte(text, comma + 2)
      asks = not first or first < 48 or first > 57 or not comma or comma > stop
        or string.byte(text, comma + 1) ~= 48 or (after ~= 44 and after ~= 93)
    end
    if stop == last then
      break
    end
    pos = stop + 2  -- past "],"
  end
  return record, values, asks
end

local function member_head(member)
  local head = member[6]
  if type(head) == 'number' then
    return head
  end
  return nil
end

local function member_covered(member)
  local covered = member[7]
  if type(covered) == 'number' then
    return covered
  end
  return nil
end

-- Every subject and history key expires its retention and a minute after its last write
-- (issue 26): a take's expiries then cover a finish within that minute, whose own would
-- set a time no later (finish_batch.lua: a PEXPIREAT of each key and the watermark's read
-- spared, per member). So a key lives at most a minute longer than its retention says.
local EXPIRY_SLACK_MS = 60000

local function digits(n)
  if n % 1 == 0 and n > -1e15 and n < 1e15 then
    return string.format('%d', n)
  end
  return string.format('%.14g', n)
end

local function expiry_at(now, keep_ms)
  return digits(now + tonumber(keep_ms) + EXPIRY_SLACK_MS)
end

-- Let `key` live `keep_ms` (and the slack) more: at `expire_at` when the caller gives it
-- (`expiry_at`'s text, formatted once a script), which spares Redis 7.0 rewriting each
-- PEXPIRE into a PEXPIREAT for its replicas (issue 26: ~1,400 instructions a call).
local function expire(key, keep_ms, expire_at)
  if expire_at then
    redis.call('PEXPIREAT', key, expire_at)
  elseif expire_at == nil then
    redis.call('PEXPIRE', key, tonumber(keep_ms) + EXPIRY_SLACK_MS)
  end
end

local function touch_subject(key, keep_ms, expire_at)
  expire(key, keep_ms, expire_at)
end

local function remember_entries(key, now, entries, keep_ms, max_events, first_ms, expire_at,
                                 head_ms)
  local length
  if #entries == 1 then
    length = redis.call('RPUSH', key, entries[1])  -- (no unpack: every finish's member)
  elseif #entries == 2 then
    length = redis.call('RPUSH', key, entries[1], entries[2])  -- (every take's member)
  else
    length = redis.call('RPUSH', key, unpack(entries))
  end
  local head = nil
  if length <= #entries then
    head = first_ms  -- the list holds these entries only: the oldest is entries[1]
  end
  if length > 1 then
    if length > max_events then
      redis.call('LTRIM', key, length - max_events, -1)
      length = max_events
    end
    local cutoff = now - keep_ms
    -- What is left is these entries only (the RPUSH created the list, or the trim left
    -- no older one): its oldest is known, no LINDEX (issue 26: every identifier's first
    -- batch). Or the caller knows a time no later than the oldest, within the retention
    -- (a member's take learnt it): no LINDEX either (issue 26: every finish).
    local known = first_ms and length <= #entries and first_ms >= cutoff
    if not known and head_ms and length > #entries and head_ms >= cutoff then
      known, head = true, head_ms
    end
    for _ = 1, known and 0 or length - 1 do
      local oldest = redis.call('LINDEX', key, 0)
      local at = tonumber(string.sub(oldest, 1, string.find(oldest, SEP, 1, true) - 1))
      if at >= cutoff then
        head = at
        break
      end
      redis.call('LPOP', key)
    end
  end
  expire(key, keep_ms, expire_at)
  return head
end

local function remember(key, now, event, keep_ms, max_events)
  remember_entries(key, now, {now .. SEP .. cjson.encode(event)}, keep_ms, max_events)
end

-- lane_due(due, change)   the due set of a pending change's lane (its JSON decoded): `due`
--                          itself for bulk, `due` .. ":live" for live ("l" = 1;
--                          stores/keys.py `due_live`), for the scripts given only `due`
local function lane_due(due, change)
  if change.l == 1 then
    return due .. ':live'
  end
  return due
end

local function occurred_of(change)
  return change.w or (change.t - (change.d or 0))
end

-- JSON text of a value from a decoded change: numbers by `digits`, the rest by cjson.
local function json_value(v)
  if type(v) == 'number' then
    return digits(v)
  end
  return cjson.encode(v)
end

-- The same object cjson.encode({e = 'enqueued', g = group, s, o = w, c, q, r = 1 or nil,
-- d, x}) writes, its numbers formatted as `digits` does (issue 26: by hand, once a member;
-- in one concatenation: a table of parts and table.concat cost ~10,000 instructions a
-- member against ~5,000 for the concatenation, callgrind of take_batch.lua).
local function enqueued_entry(group, change, arrival, occurred, seq, texts)
  local head, state = nil, ''
  if texts then
    head = texts.head
    if not head then
      head = '{"e":"enqueued","g":' .. texts.group
      texts.head = head
    end
  else
    head = '{"e":"enqueued","g":' .. cjson.encode(group)
  end
  if change.s ~= nil then
    state = texts and texts.states[change.s]
    if not state then
      state = ',"s":' .. json_value(change.s)
      if texts then
        texts.states[change.s] = state
      end
    end
  end
  local observed, source, sequence, respect, delay, old = '', '', '', '', '', ''
  if change.w ~= nil then
    observed = ',"o":' .. (occurred or json_value(change.w))
  end
  if change.c ~= nil then
    source = ',"c":' .. json_value(change.c)
  end
  if change.q ~= nil then
    sequence = seq or json_value(change.q)
  end
  if change.r == 1 then
    respect = ',"r":1'
  end
  if change.d ~= nil then
    delay = ',"d":' .. json_value(change.d)
  end
  if change.x ~= nil then
    old = ',"x":' .. json_value(change.x)
  end
  return (arrival or digits(change.t - (change.d or 0))) .. SEP .. head .. state .. observed
    .. source .. (change.q ~= nil and ',"q":' or '') .. sequence .. respect .. delay .. old
    .. '}'
end

local function remember_enqueued(key, group, change, keep_ms, max_events)
  remember_entries(key, change.t - (change.d or 0), {enqueued_entry(group, change)}, keep_ms,
    max_events)
end

-- Taking a pending change into a batch: one owner for the coalescer's cut (take_batch.lua)
-- and a claim's top-up (claim_batch.lua), so both take a change exactly alike.
--
-- take_change(at, id, group, kind, value, change, seq, field)
--                          move the pending change of `group SEP kind SEP value` (its JSON
--                          decoded) into batch `id`, where `at` holds the declared keys and
--                          the bookkeeping's arguments: {prefix = "{prefix}:", pending,
--                          due, due_live, inflight, keep (history ms), most (events),
--                          subject_keep (ms), now}. The change leaves the buffer (pending
--                          and both lanes' due sets), its field is locked to `id` in
--                          inflight, the subject's watermark for the group becomes the
--                          change's occurred time (enqueue.lua accepted it against the one
--                          before, so it only rises; it outlives the batch), and the history
--                          gets its "enqueued" (at its arrival; not for a replayed change,
--                          whose "replayed" is there) and "batched". The caller has checked
--                          that the buffer holds this change and that no batch locks the
--                          field. Returns the record's member {value, seq, respect opt-out
--                          0|1, occurred at ms}. `seq` (optional): the text of change.q;
--                          `field` (optional): the buffer field, when the caller has it.
--                          With `at.taken` (a list), the buffer's part is left to
--                          `flush_taken` (one HDEL, two ZREMs, one HSET for all the members
--                          of a take, issue 26), and the member's JSON text is appended to
--                          `at.texts`: the caller must flush before it reads the buffer or
--                          the locks again.
local function take_change(at, id, group, kind, value, change, seq, field)
  field = field or group .. SEP .. kind .. SEP .. value
  if at.taken then
    at.taken[#at.taken + 1] = field
  else
    redis.call('HDEL', at.pending, field)
    redis.call('ZREM', at.due, field)
    redis.call('ZREM', at.due_live, field)
    redis.call('HSET', at.inflight, field, id)
  end
  local occurred = occurred_of(change)
  local occurred_text = digits(occurred)
  seq = seq or json_value(change.q)
  local subject, history, digest = identity_keys(at.prefix, kind .. SEP .. value)
  -- The group's texts once a take, not once a member (issue 26): its watermark's field
  -- name, its JSON, the states' JSON (`enqueued_entry`'s `texts`).
  if at.texts_of ~= group then
    at.group_texts = {group = cjson.encode(group), mark = 'w' .. SEP .. group, states = {}}
    at.texts_of = group
  end
  local texts = at.group_texts
  redis.call('HSET', subject, texts.mark, occurred_text)
  touch_subject(subject, at.subject_keep, at.subject_at)
  -- Both events in one append (issue 26: one RPUSH, one look at the oldest, one PEXPIRE a
  -- change, not two): the same list as appending them one by one, since the later
  -- event's cutoff (now) is the stricter one and the trim keeps the newest events either way.
  -- The "batched" event's text is the same for every member but its "q": written once a
  -- take (`at.batched`), not encoded once a member.
  if at.batched_id ~= id then
    at.now_text = at.now_text or digits(at.now)
    at.batched = at.now_text .. SEP .. '{"e":"batched","g":' .. texts.group
      .. ',"b":' .. cjson.encode(id) .. ',"q":'
    at.batched_id = id
  end
  local entries, first = {}, at.now
  local first_text = nil
  if not change.p then
    first = change.t - (change.d or 0)
    local arrival = occurred_text
    if change.w ~= nil then
      arrival = digits(first)
    end
    first_text = arrival
    entries[1] = enqueued_entry(group, change, arrival, occurred_text, seq, texts)
  end
  entries[#entries + 1] = at.batched .. seq .. '}'
  local head = remember_entries(history, at.now, entries, at.keep, at.most, first, at.keep_at)
  local respect = change.r or 0
  -- The least of the expiries given above (both at least now + retention + the slack),
  -- once a take: the finish sets none that this covers (`member_covered`, issue 26).
  if not at.covered then
    at.covered = at.now + EXPIRY_SLACK_MS
      + math.min(tonumber(at.keep), tonumber(at.subject_keep))
    at.covered_text = digits(at.covered)
  end
  -- The record's member carries the digest, the history's head and the expiries' time
  -- (`member_keys`, `member_head`, `member_covered`), so the finish names the keys without
  -- a SHA-1, trims without LINDEX and, while covered, reads no watermark and sets no expiry.
  if at.texts then
    local head_text = ',null'
    if head then
      if head == first and first_text then
        head_text = ',' .. first_text
      else
        at.now_text = at.now_text or digits(at.now)
        head_text = ',' .. (head == at.now and at.now_text or digits(head))
      end
    end
    at.texts[#at.texts + 1] = '[' .. cjson.encode(value) .. ',' .. seq .. ','
      .. (respect == 0 and '0' or respect == 1 and '1' or json_value(respect)) .. ','
      .. occurred_text .. ',"' .. digest .. '"' .. head_text .. ',' .. at.covered_text .. ']'
  end
  return {value, change.q, respect, occurred, digest, head == nil and cjson.null or head,
    at.covered}
end

-- Step of the top-up's read of a due set (entries per ZRANGEBYSCORE).
local TOP_UP_STEP = 100

-- Topping a short batch up (issue 26): one owner for the claim's top-up (claim_batch.lua)
-- and the one right before the request (top_up_batch.lua), so both take alike.
--
-- top_up(record_key, record, kept, at, max_members, look_at)
--                          take due changes of the batch's group, state, identifier kind
--                          and double opt-in into `record` (stored at `record_key`; its
--                          kept members `kept`, appended to), oldest due first, until it
--                          holds `max_members` (for a v2 pack: until the pack holds that
--                          many distinct identifiers, the siblings' records read as they
--                          are now), looking at most at `look_at` due entries. A live
--                          batch looks at live's due set, then bulk's; a bulk batch at
--                          bulk's only. Each change is taken by `take_change` (`at` as
--                          there), only if the buffer holds it, it is due, and no batch
--                          locks its field. The caller writes the record back. Returns
--                          how many were taken.
local function top_up(record_key, record, kept, at, max_members, look_at)
  local values, distinct = {}, 0
  local function count(value)
    if not values[value] then
      values[value] = true
      distinct = distinct + 1
    end
  end
  for _, member in ipairs(kept) do
    count(member[1])
  end
  -- The siblings' records are named like this one's (stores/keys.py `batch`: the id last).
  local named = string.sub(record_key, 1, #record_key - #record.id)
  for _, sibling in ipairs(record.pack or {}) do
    if sibling ~= record.id then
      if string.sub(record_key, -#record.id) ~= record.id then
        return 0  -- cannot name the siblings: no top-up rather than an oversized request
      end
      local other = redis.call('GET', named .. sibling)
      if other then
        for _, member in ipairs(cjson.decode(other).members) do
          count(member[1])
        end
      end
    end
  end
  local lanes = {at.due}
  if string.sub(record.id, 1, 5) == 'live-' then  -- core/planning.py LIVE_BATCH_PREFIX
    lanes = {at.due_live, at.due}
  end
  local prefix = record.group .. SEP .. record.kind .. SEP
  local taken, looked = 0, 0
  for _, lane in ipairs(lanes) do
    local offset = 0
    while #kept < max_members and looked < look_at do
      local fields = redis.call('ZRANGEBYSCORE', lane, '-inf', at.now, 'LIMIT', offset,
        math.min(TOP_UP_STEP, look_at - looked))
      if #fields == 0 then
        break
      end
      looked = looked + #fields
      local left = #fields
      -- The changes of the fields of its group and kind in one HMGET a step (issue 26: one
      -- HGET each was ~0.44 calls an identifier in bench.ceiling's drain, mostly other
      -- states' changes): taking one changes no other field's change (the fields differ).
      -- Each field's prefix compared once (issue 26: a string.sub ~1,250 instructions, and
      -- a short batch's top-up looks at up to TOP_UP_LOOK_AT fields, mostly other keys').
      local mine, at_read = {}, {}
      for k, field in ipairs(fields) do
        if string.sub(field, 1, #prefix) == prefix then
          mine[#mine + 1] = field
          at_read[k] = #mine
        end
      end
      local currents = #mine > 0 and redis.call('HMGET', at.pending, unpack(mine)) or {}
      for k, field in ipairs(fields) do
        if #kept >= max_members then
          break
        end
        local read = at_read[k]
        if read then
          local value = string.sub(field, #prefix + 1)
          local current = currents[read]
          local change = current and cjson.decode(current)
          if change and change.s == record.state and tonumber(change.o) == record.doi
              and (values[value] or distinct < max_members)
              and redis.call('HEXISTS', at.inflight, field) == 0 then
            kept[#kept + 1] = take_change(at, record.id, record.group, record.kind, value,
              change, nil, field)
            count(value)
            taken = taken + 1
            left = left - 1  -- it left this due set: the next read starts one earlier
          end
        end
      end
      offset = offset + left
    end
  end
  return taken
end

-- The schedule (stores/keys.py `schedule`, `schedule_reasons`): every batch that waits
-- for its next try waits there, with a due time and a reason (core/waiting.py).
--
-- wait_in_schedule(schedule, reasons, id, due_ms, reason)
--                          put batch `id` into the schedule, due at `due_ms`
-- nudge(list)              wake one coalescer waiting for work (BLPOP on the one-item list
--                          `coalesce_nudge`), so a batch due now is not left to the beat
-- end_claim(claims, tokens, fences, id)
--                          the claim on batch `id` ends: its lease, holder and "sent" mark
--                          go; returns 1 if its request had been sent (outcome unknown)
local function end_claim(claims, tokens, fences, id)
  redis.call('ZREM', claims, id)
  redis.call('HDEL', tokens, id)
  return redis.call('HDEL', fences, id)
end

local function wait_in_schedule(schedule, reasons, id, due_ms, reason)
  redis.call('ZADD', schedule, due_ms, id)
  redis.call('HSET', reasons, id, reason)
end

local function nudge(list)
  redis.call('LPUSH', list, 1)
  redis.call('LTRIM', list, 0, 0)
end

-- call_in_slices(command, key, items)
--                          `command key item...` (`command item...` when key is nil) once
--                          per SLICE items (Lua's C stack bounds unpack), so a script that
--                          writes or reads many fields pays one call for them rather than
--                          one each; nothing for no items. Keep pairs (HSET field value,
--                          ZADD score member) whole: SLICE is even. Returns the array
--                          replies concatenated in order (HMGET's values, false for a
--                          missing field) and the integer replies added up (EXISTS)
local SLICE = 1000

local function call_in_slices(command, key, items)
  local replies, sum = {}, 0
  for start = 1, #items, SLICE do
    local stop = math.min(start + SLICE - 1, #items)
    local reply
    if key then
      reply = redis.call(command, key, unpack(items, start, stop))
    else
      reply = redis.call(command, unpack(items, start, stop))
    end
    if type(reply) == 'table' then
      if stop == #items and start == 1 then
        return reply, sum  -- one slice: its reply as it is (no copy of each item)
      end
      local at = #replies
      for k, value in ipairs(reply) do
        replies[at + k] = value
      end
    elseif type(reply) == 'number' then
      sum = sum + reply
    end
  end
  return replies, sum
end

-- flush_taken(at, id)      the buffer's part of the changes `take_change` took into batch
--                          `id` with `at.taken`: they leave pending and both due sets and
--                          their fields are locked to `id`, in one call each (issue 26)
local function flush_taken(at, id)
  local fields = at.taken
  if #fields == 0 then
    return
  end
  call_in_slices('HDEL', at.pending, fields)
  call_in_slices('ZREM', at.due, fields)
  call_in_slices('ZREM', at.due_live, fields)
  local locks = {}
  for n, field in ipairs(fields) do
    locks[2 * n - 1] = field
    locks[2 * n] = id
  end
  call_in_slices('HSET', at.inflight, locks)
  at.taken = {}
end

-- Batches not yet claimed, by kind (issue 26): stores/keys.py `short_batches`, a ZSET of
-- "group SEP state SEP kind SEP doi SEP cut at ms SEP batch id", all scored 0 and read by
-- prefix (within a kind, in the order they were cut: the cut time has 13 digits until
-- 2286). take_batch.lua adds every batch that travels alone (short or full); its claim
-- takes it out (claim_batch.lua), whatever the claim finds; an entry whose batch is gone
-- or was claimed is dropped where a look finds it. (An entry written before the cut time
-- was in it, "... doi SEP batch id", is read alike: the id is what follows the last SEP.)
--
-- short_entry(record)      the entry of a batch record (decoded)
-- absorb(at, record, kept, max_members)
--                          move into `record` (being claimed or about to be sent; its kept
--                          members `kept`, appended to) members of other batches of its
--                          group, state, kind and double opt-in that no one has claimed,
--                          the last cut first, until it holds `max_members`: a batch
--                          claimed now goes out now, and those members would have gone
--                          out after it anyway. Under flips a batch cut full loses members
--                          at its claim while later batches of its key wait their turns;
--                          taking from the last of them leaves the places empty in the
--                          last request of the key, not in each (the floor counts one short
--                          request a key). Only a batch travelling alone (so no v2 pack's
--                          distinct identifiers to count), never attempted, never split,
--                          neither claimed nor waiting in the schedule, of the same lane
--                          or, for a live `record`, bulk's; and only its members not
--                          superseded (the buffer holds no newer change for them: a
--                          superseded one stays, to leave at its own batch's claim, which
--                          releases its lock for the newer change). Each member moves with
--                          its lock (inflight -> `record`), so its identifier is still in
--                          one batch only and the newest change of it; its history gets
--                          "batched" in `record`. An emptied batch ends (its record and
--                          sweep entry go: its message finds it gone); a partly taken one
--                          is rewritten. `at` as for `take_change`, with short, tokens,
--                          schedule and batches. Returns the members moved.
local ABSORB_LOOK = 20

local function short_entry(record)
  return record.group .. SEP .. record.state .. SEP .. record.kind .. SEP .. record.doi
    .. SEP .. digits(record.created or 0) .. SEP .. record.id
end

local function absorb(at, record_key, record, kept, max_members)
  if #(record.pack or {}) > 1 or string.sub(record_key, -#record.id) ~= record.id then
    return 0
  end
  local named = string.sub(record_key, 1, #record_key - #record.id)
  local live = string.sub(record.id, 1, 5) == 'live-'  -- core/planning.py LIVE_BATCH_PREFIX
  local key = record.group .. SEP .. record.state .. SEP .. record.kind .. SEP .. record.doi
    .. SEP
  -- The last cut first: the places taken are left empty in the key's last batch.
  local entries = redis.call('ZREVRANGEBYLEX', at.short, '[' .. key .. '\255', '[' .. key,
    'LIMIT', 0, ABSORB_LOOK)
  local moved = 0
  local field_prefix = record.group .. SEP .. record.kind .. SEP
  for _, entry in ipairs(entries) do
    if #kept >= max_members then
      break
    end
    local other_id = string.match(entry, '([^' .. SEP .. ']*)$')
    if other_id ~= record.id then
      local raw = redis.call('GET', named .. other_id)
      local other = raw and cjson.decode(raw)
      if not other or redis.call('HEXISTS', at.tokens, other_id) == 1
          or redis.call('ZSCORE', at.schedule, other_id) then
        redis.call('ZREM', at.short, entry)  -- ended, or claimed: no longer a candidate
      elseif other.attempts == 0 and not other.split and not other.sibling
          and #(other.pack or {}) <= 1
          and (live or string.sub(other_id, 1, 5) ~= 'live-') then
        local fields = {}
        for n, member in ipairs(other.members) do
          fields[n] = field_prefix .. member[1]
        end
        -- A member with a newer change in the buffer stays (its own claim drops it).
        local newers = call_in_slices('HMGET', at.pending, fields)
        local left = {}
        for n, member in ipairs(other.members) do
          if #kept < max_members and not newers[n] then
            kept[#kept + 1] = member
            redis.call('HSET', at.inflight, fields[n], record.id)
            local _, history = member_keys(at.prefix, record.kind, member)
            remember(history, at.now, {e = 'batched', g = record.group, b = record.id,
              q = member[2]}, at.keep, at.most)
            moved = moved + 1
          else
            left[#left + 1] = member
          end
        end
        if #left == 0 then
          redis.call('DEL', named .. other_id)
          redis.call('ZREM', at.batches, other_id)
          redis.call('ZREM', at.short, entry)
        elseif #left < #other.members then
          other.members = left
          redis.call('SET', named .. other_id, cjson.encode(other))
        end
      end
    end
  end
  return moved
end

-- count_post(totals, metrics_prefix, identifiers, throttled, field, keep_seconds, now)
--                          count one post's request (stores/counters.py owns the names):
--                          in the per-second hash `metrics_prefix` .. second of `now`
--                          (Redis's clock, so every worker counts on one), "requests" +1
--                          and "throttled" +1 if `throttled` is "1", else "identifiers" +=
--                          `identifiers`, kept `keep_seconds`; and the HASH `totals`'s
--                          `field` +1 ("<endpoint> <status>"; "" counts per second only).
--                          count_request.lua's operation, and the finish's when it is
--                          told the request (finish_batch.lua; issue 26: one call a post)
local function count_post(totals, metrics_prefix, identifiers, throttled, field,
    keep_seconds, now)
  local second = math.floor(now / 1000)
  local key = metrics_prefix .. second
  redis.call('HINCRBY', key, 'requests', 1)
  if throttled == '1' then
    redis.call('HINCRBY', key, 'throttled', 1)
  else
    redis.call('HINCRBY', key, 'identifiers', identifiers)
  end
  redis.call('EXPIRE', key, keep_seconds)
  if field ~= '' then
    redis.call('HINCRBY', totals, field, 1)
  end
  return second
end

-- take_turn(limiter, credentials, a, o)
--                          acquire_token.lua's operation (its opening comment has the
--                          keys, the arguments and the reply): one turn of the workspace's
--                          rate budget, its arguments a[o + 1] .. a[o + 9] (acquire_token's
--                          ARGV[1..9]); acquire_token.lua's and, for a claim told to take
--                          the batch's turn, claim_batch.lua's (issue 26: one call a post)
local function take_turn(limiter, credentials, a, o)
  local now = now_ms_exact()
  local interval = tonumber(a[o + 1])
  local tolerance = tonumber(a[o + 2])
  local paused = tonumber(redis.call('HGET', limiter, 'paused_until') or '0')
  if paused > now then
    return {0, math.ceil(paused - now), '', '', 'paused'}
  end
  local refused = redis.call('HMGET', credentials, 'workspace', 'probe_at')
  local check = ''
  if refused[1] then
    if refused[1] == a[o + 6] then
      local probe_at = tonumber(refused[2] or '0')
      if probe_at > now then
        return {0, math.ceil(probe_at - now), '', '', 'credentials'}
      end
      redis.call('HSET', credentials, 'probe_at',
        string.format('%.3f', now + tonumber(a[o + 5])))
      return {1, 0, string.format('%.3f', now), 'probe', ''}
    end
    check = 'check'
  end
  local tat = tonumber(redis.call('HGET', limiter, 'tat') or '0')
  if tat < now then
    tat = now
  end
  local wait = tat - tolerance - now
  local live_interval = tonumber(a[o + 7])
  local live_tat = 0
  local floor_applies = false
  if live_interval > 0 then
    -- Live keeps to its share only while bulk is asking for turns: alone, it may have all.
    local bulk_at = tonumber(redis.call('HGET', limiter, 'bulk_at') or '0')
    floor_applies = now - bulk_at <= tonumber(a[o + 8])
    if floor_applies then
      live_tat = math.max(tonumber(redis.call('HGET', limiter, 'live_tat') or '0'), now)
      local own = live_tat - tolerance - now
      local horizon = tonumber(a[o + 9])
      if own > horizon then
        -- Live's own share is reserved that far already: ask again when it is within reach,
        -- the refused live callers one live interval apart.
        local queued = math.max(
          tonumber(redis.call('HGET', limiter, 'live_queue_tat') or '0'), live_tat)
        redis.call('HSET', limiter, 'live_queue_tat',
          string.format('%.3f', queued + live_interval))
        local back = math.max(queued - tolerance - horizon / 2 - now, own - horizon)
        return {0, math.ceil(back), '', '', 'budget'}
      end
      wait = math.max(wait, own)
    end
  else
    redis.call('HSET', limiter, 'bulk_at', string.format('%.3f', now))
  end
  if wait < 0 then
    wait = 0
  end
  local reach = tonumber(a[o + 3])
  if wait > reach then
    -- Not granted: say when a turn will be within reach, counting the callers refused
    -- before this one ("queue_tat": one interval each), so refused batches come back one
    -- interval apart, each when its turn is half its reach away, rather than all at once
    -- to be refused again (a backfill's batches in flight churning through the schedule).
    local queued = math.max(tonumber(redis.call('HGET', limiter, 'queue_tat') or '0'), tat)
    redis.call('HSET', limiter, 'queue_tat', string.format('%.3f', queued + interval))
    local back = math.max(queued - tolerance - reach / 2 - now, wait - reach)
    return {0, math.ceil(back), '', '', 'budget'}
  end
  -- A live turn pushed later by live's own limit moves the shared one on with it: no two
  -- sends closer than the interval, whatever the lanes.
  redis.call('HSET', limiter, 'tat',
    string.format('%.3f', math.max(tat, now + wait) + interval))
  if live_interval > 0 then
    -- Without bulk, live's own limit follows its sends, so it holds nothing back from live
    -- when bulk comes.
    local base = live_tat
    if not floor_applies then
      base = now + wait
    end
    redis.call('HSET', limiter, 'live_tat', string.format('%.3f', base + live_interval))
  end
  redis.call('PEXPIRE', limiter, a[o + 4])
  return {1, math.ceil(wait), string.format('%.3f', now + wait), check, ''}
end

-- latest_accepted.lua: for identifiers of one group and kind, the latest change accepted
-- here (the watermark) and the state it set, read in one step (verify --repair asks
-- whether a row is older than a change braze-subs accepted since).
--
-- KEYS[1] pending   HASH   declared for its name only: the key prefix and hash slot of
--                          the per-identifier keys below (nothing is read from it)
-- Per identifier (see _prelude.lua), read only: subject ("w" SEP group: the watermark),
-- history (the "enqueued" events: state "s", occurred "o" or, without one, the event's
-- own time, which is the change's arrival)
-- ARGV[1] group   ARGV[2] kind   ARGV[3..] values
--
-- Guarantees: nothing is written. The watermark and the state come from one moment: the
-- state is that of the latest "enqueued" event of the group whose occurred time is the
-- watermark (the change the watermark was set from; history is written in the same step
-- as the watermark). Returns, per value in order, two strings: the watermark in ms ("":
-- none retained) and its change's state ("": not found in the history: trimmed to
-- HISTORY_MAX_EVENTS or past HISTORY_RETENTION_DAYS; the caller must then assume the
-- worst).
local prefix = key_prefix(KEYS[1])
local group = ARGV[1]
local mark_field = 'w' .. SEP .. group
local out = {}
for i = 3, #ARGV do
  local subject, history = identity_keys(prefix, ARGV[2] .. SEP .. ARGV[i])
  local mark = redis.call('HGET', subject, mark_field)
  local state = ''
  if mark then
    local wanted = tonumber(mark)
    local events = redis.call('LRANGE', history, 0, -1)
    for j = #events, 1, -1 do
      local raw = events[j]
      local at = string.find(raw, SEP, 1, true)
      local event = cjson.decode(string.sub(raw, at + 1))
      if event.e == 'enqueued' and event.g == group
          and (event.o or tonumber(string.sub(raw, 1, at - 1))) == wanted then
        state = event.s
        break
      end
    end
  else
    mark = ''
  end
  out[#out + 1] = mark
  out[#out + 1] = state
end
return out

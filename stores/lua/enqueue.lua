-- enqueue.lua: add changes to the buffer; the last one per group + identifier wins.
--
-- KEYS[1] seq       STRING counter; each change gets the next sequence number
-- KEYS[2] pending   HASH   field -> {"s": state, "o": double opt-in 0|1, "q": seq, "t": due ms,
--                          "w": occurred at ms (Redis's clock when not given), "r": respect
--                          opt-out 0|1, "c": source (absent when empty)}
-- KEYS[3] due       ZSET   field -> due ms; holds the pending fields that no batch locks
-- KEYS[4] inflight  HASH   field -> batch id (read only here)
-- KEYS[5] stats     HASH   "enqueued" += number of changes
-- KEYS[6] dlq fields HASH  field -> dead-letter entry id; a newer change removes the field
-- ARGV    groups of seven (stores/buffer.py `encode_change` owns the format): field, state,
--         double opt-in (0|1), delay in ms, occurred at in ms ("" = now), source (may be
--         ""), respect opt-out (0|1)
--
-- Guarantees: the changes are applied in argument order, with increasing sequence numbers
-- and no other command in between, so a later change for a field replaces an earlier one,
-- from this call or any before it. A field that an in-flight batch locks is not made due:
-- that batch's end makes it due (finish_batch.lua), so an identifier is never in two
-- batches at once. Due times are Redis server time plus the delay. Returns the last
-- sequence number given. A dead-lettered change for the same field is superseded: replay
-- will skip it.
local n = #ARGV / 7
local last = redis.call('INCRBY', KEYS[1], n)
local seq = last - n
local now = now_ms()
for i = 1, #ARGV, 7 do
  seq = seq + 1
  local field = ARGV[i]
  local due = now + tonumber(ARGV[i + 3])
  local occurred = tonumber(ARGV[i + 4]) or now
  local source = ARGV[i + 5]
  if source == '' then
    source = nil
  end
  redis.call('HSET', KEYS[2], field, cjson.encode({
    s = ARGV[i + 1], o = tonumber(ARGV[i + 2]), q = seq, t = due, w = occurred,
    r = tonumber(ARGV[i + 6]), c = source}))
  if redis.call('HEXISTS', KEYS[4], field) == 0 then
    redis.call('ZADD', KEYS[3], due, field)
  end
  redis.call('HDEL', KEYS[6], field)
end
redis.call('HINCRBY', KEYS[5], 'enqueued', n)
return last

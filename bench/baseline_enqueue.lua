-- bench/history_cost.py's baseline: stores/lua/enqueue.lua as it was before event time and
-- history (issue 13), run with the same prelude. Not loaded by the product.
-- enqueue.lua: record changes in the buffer; for each buffer field the last write wins.
--
-- KEYS[1] seq       STRING counter; each change gets the next sequence number
-- KEYS[2] pending   HASH   field -> {"s": state, "o": double opt-in 0|1, "q": seq, "t": due ms}
-- KEYS[3] due       ZSET   field -> due ms; holds the pending fields that no batch locks
-- KEYS[4] inflight  HASH   field -> batch id (read only here)
-- KEYS[5] stats     HASH   "enqueued" += number of changes
-- KEYS[6] dlq fields HASH  field -> dead-letter entry id; a newer change removes the field
-- ARGV    groups of four: field, state, double opt-in (0|1), delay in ms
--
-- Guarantees: the changes are applied in argument order, with increasing sequence numbers
-- and no other command in between, so a later change for a field replaces an earlier one,
-- from this call or any before it. A field that an in-flight batch locks is not made due:
-- that batch's end makes it due (finish_batch.lua), so an identifier is never in two
-- batches at once. Due times are Redis server time plus the delay. Returns the last
-- sequence number given. A dead-lettered change for the same field is superseded: replay
-- will skip it.
local n = #ARGV / 4
local last = redis.call('INCRBY', KEYS[1], n)
local seq = last - n
local now = now_ms()
for i = 1, #ARGV, 4 do
  seq = seq + 1
  local field = ARGV[i]
  local due = now + tonumber(ARGV[i + 3])
  redis.call('HSET', KEYS[2], field,
    cjson.encode({s = ARGV[i + 1], o = tonumber(ARGV[i + 2]), q = seq, t = due}))
  if redis.call('HEXISTS', KEYS[4], field) == 0 then
    redis.call('ZADD', KEYS[3], due, field)
  end
  redis.call('HDEL', KEYS[6], field)
end
redis.call('HINCRBY', KEYS[5], 'enqueued', n)
return last

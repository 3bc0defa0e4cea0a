-- dispatch_due.lua: take the batches whose time has come out of the schedule.
--
-- KEYS[1] schedule  ZSET   batch id -> due ms; the due entries leave it
-- KEYS[2] reasons   HASH   batch id -> what it waited for; removed with the entry
-- KEYS[3] batches   ZSET   batch id -> sweep deadline; pushed to now + grace
-- KEYS[4] handed    STRING this call's answer (JSON list of ids), kept ARGV[3] ms
-- ARGV[1] most batches to take   ARGV[2] sweep grace (ms)
-- ARGV[3] how long the answer is kept (ms)
--
-- Guarantees: each schedule entry is taken once, so each due batch gets one message (two
-- ticks running side by side split the entries between them), oldest due first. A batch
-- that ended meanwhile is dropped from the schedule. Returns the ids to send a message
-- for. Run again (KEYS[4] names one call: redis-py sends a command again when the
-- connection dropped before its reply, e.g. a master killed after running it, whose
-- replica had the writes), it answers the ids it took the first time: answered {} then,
-- the batches, out of the schedule, waited for the sweep (BATCH_REDISPATCH_SECONDS).
local kept = redis.call('GET', KEYS[4])
if kept then
  return cjson.decode(kept)
end
local now = now_ms()
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))
local out = {}
for _, id in ipairs(ids) do
  redis.call('ZREM', KEYS[1], id)
  redis.call('HDEL', KEYS[2], id)
  if redis.call('ZSCORE', KEYS[3], id) then
    redis.call('ZADD', KEYS[3], now + tonumber(ARGV[2]), id)
    out[#out + 1] = id
  end
end
if #out > 0 then
  redis.call('SET', KEYS[4], cjson.encode(out), 'PX', ARGV[3])
end
return out

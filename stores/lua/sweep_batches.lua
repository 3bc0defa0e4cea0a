-- sweep_batches.lua: find batches whose message was lost (the backstop of the tick).
--
-- KEYS[1] batches   ZSET   batch id -> sweep deadline ms; pushed on by the grace
-- KEYS[2] claims    ZSET   batch id -> lease end (read: a claimed batch is not lost)
-- KEYS[3] schedule  ZSET   batch id -> due ms (read: a waiting batch is not lost)
-- KEYS[4] handed    STRING this call's answer (JSON list of ids), kept ARGV[3] ms
-- ARGV[1] most batches to look at   ARGV[2] sweep grace (ms)
-- ARGV[3] how long the answer is kept (ms)
--
-- A batch neither claimed nor scheduled is between its message and its claim. If that has
-- lasted past its deadline, the message was lost (a Redis failover, a crash between
-- cutting a batch and sending its message): it gets another. A duplicate is harmless:
-- claim_batch.lua lets one message claim it. Messages held by a dead worker are found
-- sooner, by take_back.lua. Returns the ids to send a message for; run again (KEYS[4]
-- names one call, sent again by redis-py after its reply was lost), the same ids, not
-- none (which left them another grace).
local kept = redis.call('GET', KEYS[4])
if kept then
  return cjson.decode(kept)
end
local now = now_ms()
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))
local out = {}
for _, id in ipairs(ids) do
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), id)
  if not redis.call('ZSCORE', KEYS[2], id) and not redis.call('ZSCORE', KEYS[3], id) then
    out[#out + 1] = id
  end
end
if #out > 0 then
  redis.call('SET', KEYS[4], cjson.encode(out), 'PX', ARGV[3])
end
return out

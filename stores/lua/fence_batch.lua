-- fence_batch.lua: the check right before a request goes to Braze: are these batches still
-- claimed by this sender, with lease enough left for the whole exchange? If so, record
-- that they are being sent (from now on their outcome is unknown until the answer).
--
-- KEYS[1] claims  ZSET  batch id -> lease end ms (read)
-- KEYS[2] tokens  HASH  batch id -> holder's token (read)
-- KEYS[3] fences  HASH  batch id -> sent at ms; set for every batch of the request
-- ARGV[1] claim token   ARGV[2] lease that must remain, in ms (the HTTP timeout)
-- ARGV[3..] the ids of the batches in the one request
--
-- Guarantees: a request is sent only while its sender holds every batch in it, with more
-- lease left than the request may take. A worker frozen past its lease (a paused
-- container, a long GC) whose batch was taken back finds its claim gone here and does not
-- send, so an older state never reaches Braze after the newer one the next holder sent.
-- The "sent at" mark tells take_back.lua that a request may be on the wire: a dead
-- holder's batch is taken back only once that request has timed out, and a re-post of a
-- double opt-in batch happens only when the outcome of the earlier one is unknown.
-- Returns 1 (send) or 0 (a claim is gone, someone else's, or too short: do not send;
-- nothing written).
local now = now_ms()
local need = tonumber(ARGV[2])
for i = 3, #ARGV do
  if redis.call('HGET', KEYS[2], ARGV[i]) ~= ARGV[1] then
    return 0
  end
  local lease_end = tonumber(redis.call('ZSCORE', KEYS[1], ARGV[i]) or '0')
  if lease_end - now <= need then
    return 0
  end
end
for i = 3, #ARGV do
  redis.call('HSET', KEYS[3], ARGV[i], now)
end
return 1

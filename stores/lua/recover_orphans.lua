-- recover_orphans.lua: batches a holder let go of that nobody will send again (a claim or
-- an end lost with a failed-over master): they wait in the schedule, due now.
--
-- KEYS[1] batches   ZSET   batch id -> sweep deadline (read: the batch is unfinished; set)
-- KEYS[2] claims    ZSET   batch id -> lease end; a lingering claim leaves it
-- KEYS[3] tokens    HASH   batch id -> holder's token; a lingering claim's goes
-- KEYS[4] fences    HASH   batch id -> sent at ms; a lingering claim's goes
-- KEYS[5] schedule  ZSET   batch id -> due ms; a recovered batch is due now
-- KEYS[6] reasons   HASH   batch id -> "recovered"
-- KEYS[7] nudge     LIST   wakes a coalescer when something was recovered
-- ARGV[1] sweep grace (ms)   ARGV[2..] pairs: batch id, token ("" or the holder's own)
--
-- Redis replication is asynchronous: a master killed before its replica had its last
-- writes takes them along, and the new master holds the state before them.
-- - A claim lost so (pair with ""): a poster found at its fence or its end that it did
--   not hold the batch. A take-over also does that (another holder has it, or it waits in
--   the schedule: nothing to do), but after a failover nobody holds it and its message is
--   consumed: only the sweep (BATCH_REDISPATCH_SECONDS) would send it again.
-- - An end lost so (pair with the token that ended it: the heartbeat's check after Redis
--   failed to answer it): the batch is still claimed in that token's name, which no post
--   holds any more; only the lease (BATCH_CLAIM_SECONDS) would free it.
-- Guarantees: a batch is scheduled only if it is unfinished, held by nobody else and not
-- waiting, so a holder's post is never run beside, and a finished batch is never revived;
-- a batch between a message and its claim may get a second message (claim_batch.lua lets
-- one claim win). Its locks never lapsed: re-posting a state already delivered keeps each
-- identifier's order. Returns the ids scheduled.
local now = now_ms()
local out = {}
for i = 2, #ARGV, 2 do
  local id, token = ARGV[i], ARGV[i + 1]
  if redis.call('ZSCORE', KEYS[1], id) and not redis.call('ZSCORE', KEYS[5], id) then
    local holder = redis.call('HGET', KEYS[3], id)
    if token ~= '' and holder == token then
      end_claim(KEYS[2], KEYS[3], KEYS[4], id)
      holder = false
    end
    if not holder and not redis.call('ZSCORE', KEYS[2], id) then
      wait_in_schedule(KEYS[5], KEYS[6], id, now, 'recovered')
      redis.call('ZADD', KEYS[1], now + tonumber(ARGV[1]), id)
      out[#out + 1] = id
    end
  end
end
if #out > 0 then
  nudge(KEYS[7])
end
return out

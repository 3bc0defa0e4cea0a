-- recover_orphans.lua: batches a poster found it no longer held, which nobody holds and
-- nothing will send again: they wait in the schedule, due now.
--
-- KEYS[1] batches   ZSET   batch id -> sweep deadline (read: the batch is unfinished; set)
-- KEYS[2] claims    ZSET   batch id -> lease end (read: a claimed batch is someone's)
-- KEYS[3] tokens    HASH   batch id -> holder's token (read)
-- KEYS[4] schedule  ZSET   batch id -> due ms; an orphan is due now
-- KEYS[5] reasons   HASH   batch id -> "recovered"
-- KEYS[6] nudge     LIST   wakes a coalescer when something was recovered
-- ARGV[1] sweep grace (ms)   ARGV[2..] the batch ids the caller lost
--
-- A poster loses its claim to a take-over (another holder has it, or it waits in the
-- schedule: nothing to do here) or to a Redis failover: the master that took the claim
-- died before its replica had it, so on the new master the batch is unclaimed and its
-- message already consumed; only the sweep (BATCH_REDISPATCH_SECONDS) would send it again.
-- Guarantees: a batch is scheduled only if it is unfinished, unclaimed and not waiting,
-- so a holder's post is never run beside, and a finished batch is never revived; a batch
-- between a message and its claim may get a second message (claim_batch.lua lets one
-- claim win). Its locks never lapsed: the re-post of a state already delivered keeps the
-- identifiers' order. Returns the ids scheduled.
local now = now_ms()
local out = {}
for i = 2, #ARGV do
  local id = ARGV[i]
  if redis.call('ZSCORE', KEYS[1], id) and not redis.call('ZSCORE', KEYS[2], id)
      and redis.call('HEXISTS', KEYS[3], id) == 0 and not redis.call('ZSCORE', KEYS[4], id) then
    wait_in_schedule(KEYS[4], KEYS[5], id, now, 'recovered')
    redis.call('ZADD', KEYS[1], now + tonumber(ARGV[1]), id)
    out[#out + 1] = id
  end
end
if #out > 0 then
  nudge(KEYS[6])
end
return out

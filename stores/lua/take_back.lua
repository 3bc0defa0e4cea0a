-- take_back.lua: take batches back from workers that died (or froze), and from claims whose
-- lease ran out; they wait in the schedule, due now.
--
-- KEYS[1] claims    ZSET   batch id -> lease end ms; taken-back claims leave it
-- KEYS[2] tokens    HASH   batch id -> holder's token ("<worker id>/<random>")
-- KEYS[3] fences    HASH   batch id -> sent at ms (a request may be on the wire)
-- KEYS[4] schedule  ZSET   batch id -> due ms; taken-back batches are due now
-- KEYS[5] reasons   HASH   batch id -> "recovered"
-- KEYS[6] batches   ZSET   batch id -> sweep deadline (read: every unfinished batch; set)
-- KEYS[7] workers   ZSET   worker id -> last beat ms; -1 once its death was handled; a dead
--                          worker holding nothing leaves it
-- KEYS[8] nudge     LIST   wakes a coalescer when something was taken back
-- KEYS[9..] the heartbeat keys of the workers the caller suspects dead
-- ARGV[1] how long after its send a dead holder's request may still be on the wire (ms:
-- the HTTP timeout)   ARGV[2] sweep grace (ms)   ARGV[3..] the suspects' worker ids, in
-- the order of KEYS[9..]
--
-- Guarantees: a claim is taken only from a holder whose heartbeat is gone (checked here,
-- in the same step) or whose lease has ended. A live holder's lease is extended by its
-- heartbeat while it posts, and it sends only after fence_batch.lua found lease enough
-- left, so no take-over runs beside a live request. A dead holder's batch whose request
-- was sent is taken back only once that request has timed out, so the re-post cannot
-- overtake it at Braze. (A v1 claim may fence its batch itself, claim_batch.lua: the mark
-- is written by the claim, with the same lease check, and that request's deadline counts
-- from before the claim, so it too has ended by the mark plus ARGV[1].) The first time a worker is found dead, every batch between its
-- message and its claim is scheduled too: the dead worker may have taken its message off
-- the queue (a message fetched is gone from the broker before the worker reads it, and
-- dies with it), and no one can tell which; a message still queued then finds its batch
-- waiting and posts nothing. Each batch taken back gets exactly one schedule entry
-- (dispatch_due.lua sends it one message); its lock on its identifiers never lapses.
-- Returns {batch ids taken back, how many of them had been sent (outcome unknown),
-- suspects found alive}.
local now = now_ms()
local dead = {}
local newly_dead = false
local alive = 0
for i = 3, #ARGV do
  if redis.call('EXISTS', KEYS[6 + i]) == 0 then
    dead[ARGV[i]] = true
    if tonumber(redis.call('ZSCORE', KEYS[7], ARGV[i]) or '-1') >= 0 then
      newly_dead = true
      redis.call('ZADD', KEYS[7], -1, ARGV[i])
    end
  else
    alive = alive + 1
  end
end
local on_wire_ms = tonumber(ARGV[1])
local grace = tonumber(ARGV[2])
local taken = {}
local unknown = 0
local holding = {}
local function reschedule(id)
  wait_in_schedule(KEYS[4], KEYS[5], id, now, 'recovered')
  redis.call('ZADD', KEYS[6], now + grace, id)
  taken[#taken + 1] = id
end
local function take(id)
  if end_claim(KEYS[1], KEYS[2], KEYS[3], id) == 1 then
    unknown = unknown + 1
  end
  if redis.call('ZSCORE', KEYS[6], id) then
    reschedule(id)
  end
end
local function holder_of(token)
  return token and string.match(token, '^(.*)/[^/]*$')
end
-- Leases that ran out, whoever holds them (a live holder's are extended while it posts).
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)) do
  take(id)
end
if next(dead) then
  for _, id in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
    local token = redis.call('HGET', KEYS[2], id)
    local holder = holder_of(token)
    if not token then
      take(id)
    elseif dead[holder] then
      local sent = tonumber(redis.call('HGET', KEYS[3], id) or '0')
      if sent > 0 and sent + on_wire_ms > now then
        holding[holder] = true
      else
        take(id)
      end
    end
  end
  if newly_dead then
    for _, id in ipairs(redis.call('ZRANGE', KEYS[6], 0, -1)) do
      if not redis.call('ZSCORE', KEYS[1], id) and not redis.call('ZSCORE', KEYS[4], id) then
        reschedule(id)
      end
    end
  end
  for worker in pairs(dead) do
    if not holding[worker] then
      redis.call('ZREM', KEYS[7], worker)
    end
  end
end
if #taken > 0 then
  nudge(KEYS[8])
end
return {taken, unknown, alive}

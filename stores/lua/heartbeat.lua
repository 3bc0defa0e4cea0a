-- heartbeat.lua: one worker process says it is alive, and extends the leases of the
-- claims it is posting.
--
-- KEYS[1] heartbeat STRING this worker's heartbeat; set with the TTL as expiry
-- KEYS[2] workers   ZSET   worker id -> last beat ms (take_back.lua finds the dead here)
-- KEYS[3] claims    ZSET   batch id -> lease end; extended for the claims still ours
-- KEYS[4] tokens    HASH   batch id -> holder's token (read)
-- ARGV[1] worker id  ARGV[2] TTL (ms)  ARGV[3] lease (ms)  ARGV[4..] pairs: batch id, token
--
-- Guarantees: a claim's lease is extended only while the claim is still this token's (a
-- claim taken back is never revived), so a live worker keeps what it posts however long
-- its turn or Braze's answer takes, and a dead or frozen one stops extending at once.
-- Returns the number of leases extended.
local now = now_ms()
redis.call('SET', KEYS[1], now, 'PX', ARGV[2])
redis.call('ZADD', KEYS[2], now, ARGV[1])
local extended = 0
for i = 4, #ARGV, 2 do
  if redis.call('HGET', KEYS[4], ARGV[i]) == ARGV[i + 1] then
    redis.call('ZADD', KEYS[3], 'XX', now + tonumber(ARGV[3]), ARGV[i])
    extended = extended + 1
  end
end
return extended

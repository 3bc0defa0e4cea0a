-- count_request.lua: count one post's request in the per-second counters and the totals
-- by endpoint and HTTP status, on Redis's clock.
--
-- KEYS[1] request totals  HASH  "<endpoint> <status>" -> requests since start (monotonic)
-- ARGV[1] the per-second counters' key name without the second (Keys.metrics(s) is
--         ARGV[1] .. s: a HASH requests / identifiers / throttled, same hash tag as KEYS[1])
-- ARGV[2] identifiers   ARGV[3] "1" if Braze throttled it (429), else "0"
-- ARGV[4] totals field ("" to count only per second)   ARGV[5] seconds a per-second hash
--         is kept
--
-- Guarantees: the second is Redis's, so every worker counts on one clock, as
-- stores/counters.py's record did with a TIME and then a pipeline; one round trip instead
-- of two (issue 26, ceiling). Returns the second counted in.
local second = math.floor(now_ms() / 1000)
local key = ARGV[1] .. second
redis.call('HINCRBY', key, 'requests', 1)
if ARGV[3] == '1' then
  redis.call('HINCRBY', key, 'throttled', 1)
else
  redis.call('HINCRBY', key, 'identifiers', tonumber(ARGV[2]))
end
redis.call('EXPIRE', key, tonumber(ARGV[5]))
if ARGV[4] ~= '' then
  redis.call('HINCRBY', KEYS[1], ARGV[4], 1)
end
return second

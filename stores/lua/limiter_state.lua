-- limiter_state.lua: one budget's state and the credentials circuit, read at one instant
-- of the clock of the Redis holding them (RateLimiter.state / pause_after_turn).
--
-- KEYS[1] limiter      HASH  the budget (acquire_token.lua's layout), read only
-- KEYS[2] credentials  HASH  the credentials circuit (circuit.lua's layout), read only
-- ARGV[1..] field names of KEYS[1] to read; then "|"; then field names of KEYS[2]
--
-- Guarantees: nothing is written; the clock and both hashes are read in one step, on the
-- node that holds them (a Redis Cluster runs a script on its keys' master, where TIME in
-- a pipeline would be sent to another node: redis-py refuses it there).
-- Returns {seconds, microseconds (TIME), {KEYS[1] values}, {KEYS[2] values}}, a missing
-- field as nil.
local clock = redis.call('TIME')
local first, second = {}, {}
local into = first
for i = 1, #ARGV do
  if ARGV[i] == '|' then
    into = second
  else
    into[#into + 1] = ARGV[i]
  end
end
return {
  clock[1], clock[2],
  redis.call('HMGET', KEYS[1], unpack(first)),
  redis.call('HMGET', KEYS[2], unpack(second)),
}

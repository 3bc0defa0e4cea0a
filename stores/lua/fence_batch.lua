-- fence_batch.lua: the check right before a request goes to Braze: are these batches still
-- claimed by this sender, with lease enough left for the whole exchange?
--
-- KEYS[1..n] claim  STRING token of the worker posting each batch of the one request
--                   (claim_batch.lua sets it, with the lease as its expiry)
-- ARGV[1] claim token   ARGV[2] lease that must remain, in ms (the HTTP timeout)
--
-- Guarantees: a request is sent only while its sender holds every batch in it, with more
-- lease left than the request may take. A worker frozen past its lease (a paused
-- container, a long GC) whose batch was taken over finds its claim gone here and does not
-- send, so an older state never reaches Braze after the newer one the new holder sent.
-- Returns 1 (send) or 0 (a claim is gone, someone else's, or too short: do not send).
local need = tonumber(ARGV[2])
for i = 1, #KEYS do
  if redis.call('GET', KEYS[i]) ~= ARGV[1] then
    return 0
  end
  if redis.call('PTTL', KEYS[i]) <= need then
    return 0
  end
end
return 1

-- split_batch.lua: replace a batch Braze refused (400) by two halves, to isolate the bad
-- identifiers.
--
-- KEYS[1] batch      STRING the refused record; deleted
-- KEYS[2] batches    ZSET   batch id -> sweep deadline; the halves replace the batch
-- KEYS[3] claims     ZSET   batch id -> lease end; the claim ends
-- KEYS[4] tokens     HASH   batch id -> holder's token; must be ARGV[2]; removed
-- KEYS[5] fences     HASH   batch id -> sent at ms; removed
-- KEYS[6] inflight   HASH   field -> batch id; each member's lock moves to its half
-- KEYS[7] first half STRING new record    KEYS[8] second half STRING new record
-- KEYS[9] schedule   ZSET   batch id -> due ms; both halves are due now
-- KEYS[10] reasons   HASH   batch id -> "ready"
-- KEYS[11] nudge     LIST   wakes a coalescer to send the halves their messages
-- ARGV[1] batch id  ARGV[2] claim token  ARGV[3] first half id  ARGV[4] second half id
-- ARGV[5] sweep grace (ms)   ARGV[6] a member to isolate (named by Braze's message), or ""
--
-- The first half is the named member alone when it is in the batch, else the first half of
-- the members. Guarantees: the members are moved, not copied: each is in exactly one half
-- and stays locked (no newer change can overtake it while it is being isolated); the
-- halves carry the attempts so far (not the last error text: it may quote members that go
-- to the other half, and an identifier is stored only in its own records), belong to no
-- v2 pack, are marked `split` (never topped up: a bisection keeps to the refused batch's
-- members), and wait in the schedule, due now (no message is left to the splitting
-- worker); halves of a split that
-- named nobody (ARGV[6] "") each carry the other's id as `sibling`, so that if both are
-- refused the whole batch is condemned (core/refusal.py). Returns the size of the first
-- half, or -1 if the batch is gone, has a single member, or the caller lost its claim.
local record_json = redis.call('GET', KEYS[1])
if not record_json then
  return -1
end
if redis.call('HGET', KEYS[4], ARGV[1]) ~= ARGV[2] then
  return -1
end
local record = cjson.decode(record_json)
local count = #record.members
if count < 2 then
  return -1
end
local prefix = record.group .. SEP .. record.kind .. SEP
local now = now_ms()
local named = 0
for i, member in ipairs(record.members) do
  if ARGV[6] ~= '' and member[1] == ARGV[6] then
    named = i
  end
end
local middle = math.floor(count / 2)
if named > 0 then
  middle = 1
end
local halves = {{}, {}}
record.error = nil
for i, member in ipairs(record.members) do
  local first = i <= middle
  if named > 0 then
    first = i == named
  end
  local half = 2
  local id = ARGV[4]
  if first then
    half = 1
    id = ARGV[3]
  end
  halves[half][#halves[half] + 1] = member
  local field = prefix .. member[1]
  if redis.call('HGET', KEYS[6], field) == ARGV[1] then
    redis.call('HSET', KEYS[6], field, id)
  end
end
for half = 1, 2 do
  local id = ARGV[2 + half]
  record.id = id
  record.members = halves[half]
  record.pack = {id}
  record.split = 1  -- a half is never topped up at its claim (claim_batch.lua)
  record.sibling = nil
  if named == 0 then
    record.sibling = ARGV[5 - half]
  end
  redis.call('SET', KEYS[6 + half], cjson.encode(record))
  redis.call('ZADD', KEYS[2], now + tonumber(ARGV[5]), id)
  wait_in_schedule(KEYS[9], KEYS[10], id, now, 'ready')
end
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[1])
end_claim(KEYS[3], KEYS[4], KEYS[5], ARGV[1])
nudge(KEYS[11])
return middle

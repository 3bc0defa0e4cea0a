-- split_batch.lua: replace a batch Braze refused (400) by two halves, to isolate the bad
-- identifiers.
--
-- KEYS[1] batch      STRING the refused record; deleted
-- KEYS[2] claim      STRING its claim; must be ours or expired; deleted
-- KEYS[3] batches    ZSET   batch id -> redispatch time; the halves replace the batch
-- KEYS[4] inflight   HASH   field -> batch id; each member's lock moves to its half
-- KEYS[5] first half STRING new record    KEYS[6] second half STRING new record
-- ARGV[1] batch id  ARGV[2] claim token  ARGV[3] first half id  ARGV[4] second half id
-- ARGV[5] redispatch after (ms)   ARGV[6] a member to isolate (named by Braze's message), or ""
--
-- The first half is the named member alone when it is in the batch, else the first half of
-- the members. Guarantees: the members are moved, not copied: each is in exactly one half and stays
-- locked (no newer change can overtake it while it is being isolated); the halves carry
-- the attempts and the error so far and belong to no v2 pack; halves of a split that named
-- nobody (ARGV[6] "") each carry the other's id as `sibling`, so that if both are refused
-- the whole batch is condemned (core/refusal.py). Returns the size of the
-- first half, or -1 if the batch is gone, has a single member, or another worker holds it.
local record_json = redis.call('GET', KEYS[1])
if not record_json then
  return -1
end
local holder = redis.call('GET', KEYS[2])
if holder and holder ~= ARGV[2] then
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
  if redis.call('HGET', KEYS[4], field) == ARGV[1] then
    redis.call('HSET', KEYS[4], field, id)
  end
end
for half = 1, 2 do
  record.id = ARGV[2 + half]
  record.members = halves[half]
  record.pack = {ARGV[2 + half]}
  record.sibling = nil
  if named == 0 then
    record.sibling = ARGV[5 - half]
  end
  redis.call('SET', KEYS[4 + half], cjson.encode(record))
  redis.call('ZADD', KEYS[3], now + tonumber(ARGV[5]), ARGV[2 + half])
end
redis.call('DEL', KEYS[1], KEYS[2])
redis.call('ZREM', KEYS[3], ARGV[1])
return middle

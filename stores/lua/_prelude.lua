-- _prelude.lua: prepended to every script in this folder when it is loaded
-- (stores/scripts.py), as BullMQ's includes are. It defines only constants and pure helpers.
--
-- SEP             the byte between group, kind and value in a buffer field (stores/keys.py
--                 owns the format: "group \31 kind \31 value")
-- now_ms()        Redis's clock in whole milliseconds (every record's timestamps)
-- now_ms_exact()  Redis's clock in fractional milliseconds (the rate limiter's arithmetic)
local SEP = '\31'

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function now_ms_exact()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
end


-- Drop expired requests from the listings; returns how many.
local expiries_key, requests_key = KEYS[1], KEYS[2]
local flow_index_prefix, limit = ARGV[1], tonumber(ARGV[2]) -- P:flow:

local t = math.floor(now() * 1000)
local gone = redis.call('ZRANGEBYSCORE', expiries_key, '-inf', t, 'LIMIT', 0, limit)
for _, member in ipairs(gone) do
  local sep = string.find(member, '\0', 1, true)
  local flow, id = string.sub(member, 1, sep - 1), string.sub(member, sep + 1)
  redis.call('ZREM', requests_key, id)
  redis.call('ZREM', flow_index_prefix .. '{' .. flow .. '}', id)
end
chunked('ZREM', expiries_key, gone)
return #gone

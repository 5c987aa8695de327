-- Drop expired requests from the listings; returns how many expiry entries went.
-- An id reused by a live request (created after the old one expired) stays listed.
local expiries_key, requests_key = KEYS[1], KEYS[2]
local flow_index_prefix, request_prefix, limit = ARGV[1], ARGV[2], tonumber(ARGV[3])
-- P:flow: and P:r:

local t = math.floor(now() * 1000)
local gone = redis.call('ZRANGEBYSCORE', expiries_key, '-inf', t, 'LIMIT', 0, limit)
for _, member in ipairs(gone) do
  local sep = string.find(member, '\0', 1, true)
  local flow, id = string.sub(member, 1, sep - 1), string.sub(member, sep + 1)
  -- the id names another request now if its key exists, of another flow or not ended
  -- (no TTL); else it is this one (its key may outlive its entry here by a millisecond)
  local key = request_prefix .. '{' .. id .. '}'
  local live = redis.call('HGET', key, 'flow')
  local reused = live and (live ~= flow or redis.call('PTTL', key) == -1)
  if not reused then
    redis.call('ZREM', requests_key, id)
  end
  if not (reused and live == flow) then
    redis.call('ZREM', flow_index_prefix .. '{' .. flow .. '}', id)
  end
end
chunked('ZREM', expiries_key, gone)
return #gone

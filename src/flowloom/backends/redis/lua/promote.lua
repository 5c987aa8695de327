-- Move due delayed tasks to the stream. Returns the number moved and the next due
-- time (ms from now) or -1.
local delayed_key, tasks_key = KEYS[1], KEYS[2]
local limit = tonumber(ARGV[1])

local t = math.floor(now() * 1000)
local due = redis.call('ZRANGEBYSCORE', delayed_key, '-inf', t, 'LIMIT', 0, limit)
for _, blob in ipairs(due) do
  redis.call('XADD', tasks_key, '*', 't', blob)
end
chunked('ZREM', delayed_key, due)
local nxt = redis.call('ZRANGE', delayed_key, 0, 0, 'WITHSCORES')
return { #due, nxt[2] and (tonumber(nxt[2]) - t) or -1 }

-- Take over tasks idle for longer than the visibility timeout (their worker died or
-- froze). Returns the next scan start, the entries, and how often each was delivered.
local tasks_key = KEYS[1]
local group, consumer, idle_ms, start, count = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]

local res = redis.call('XAUTOCLAIM', tasks_key, group, consumer, idle_ms, start, 'COUNT', count)
local entries, deliveries = res[2], {}
for j, entry in ipairs(entries) do
  local p = redis.call('XPENDING', tasks_key, group, entry[1], entry[1], 1)
  deliveries[j] = p[1] and p[1][4] or 1
end
return { res[1], entries, deliveries }

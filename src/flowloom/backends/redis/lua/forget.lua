-- Drop consumers that hold no task and have been idle for `idle_ms` (workers gone) from
-- the group; atomic, so that a live consumer cannot claim a task in between.
local tasks_key = KEYS[1]
local group, me, idle_ms = ARGV[1], ARGV[2], tonumber(ARGV[3])

local n = 0
for _, info in ipairs(redis.call('XINFO', 'CONSUMERS', tasks_key, group)) do
  local f = {}
  for j = 1, #info, 2 do
    f[info[j]] = info[j + 1]
  end
  if f['name'] ~= me and f['pending'] == 0 and f['idle'] > idle_ms then
    redis.call('XGROUP', 'DELCONSUMER', tasks_key, group, f['name'])
    n = n + 1
  end
end
return n

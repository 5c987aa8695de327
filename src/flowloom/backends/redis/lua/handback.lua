-- Put tasks this consumer holds back on the stream for others. ARGV: group, receipts...
local tasks_key = KEYS[1]
local group = ARGV[1]
local RECEIPTS = 2 -- receipts follow in ARGV from here on

local n = 0
for j = RECEIPTS, #ARGV do
  local entry = redis.call('XRANGE', tasks_key, ARGV[j], ARGV[j])
  if entry[1] then
    redis.call('XADD', tasks_key, '*', 't', entry[1][2][2])
    n = n + 1
  end
  redis.call('XACK', tasks_key, group, ARGV[j])
  redis.call('XDEL', tasks_key, ARGV[j])
end
return n

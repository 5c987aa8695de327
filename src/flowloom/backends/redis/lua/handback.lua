-- Put tasks this consumer holds back on the stream for others. ARGV: group, consumer,
-- receipts... A task no longer pending for this consumer is left alone: another worker
-- took it over (this process was frozen past the visibility timeout) and may be running
-- it; handing it back would run it once more and drop that worker's receipt.
local tasks_key = KEYS[1]
local group, consumer = ARGV[1], ARGV[2]
local RECEIPTS = 3 -- receipts follow in ARGV from here on

local n = 0
for j = RECEIPTS, #ARGV do
  local pending = redis.call('XPENDING', tasks_key, group, ARGV[j], ARGV[j], 1)
  if pending[1] and pending[1][2] == consumer then
    local entry = redis.call('XRANGE', tasks_key, ARGV[j], ARGV[j])
    if entry[1] then
      redis.call('XADD', tasks_key, '*', 't', entry[1][2][2])
      n = n + 1
    end
    redis.call('XACK', tasks_key, group, ARGV[j])
    redis.call('XDEL', tasks_key, ARGV[j])
  end
end
return n

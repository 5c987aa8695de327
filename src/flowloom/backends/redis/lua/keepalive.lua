-- Reset the idle time of the tasks this consumer still holds, so that no one reclaims
-- them. ARGV: group, consumer, receipts... Returns the receipts still ours.
local tasks_key = KEYS[1]
local group, consumer = ARGV[1], ARGV[2]
local RECEIPTS = 3 -- receipts follow in ARGV from here on

local mine = {}
for j = RECEIPTS, #ARGV do
  local p = redis.call('XPENDING', tasks_key, group, ARGV[j], ARGV[j], 1)
  if p[1] and p[1][2] == consumer then
    mine[#mine + 1] = ARGV[j]
  end
end
for first = 1, #mine, 500 do
  local args = {}
  for j = first, math.min(first + 499, #mine) do
    args[#args + 1] = mine[j]
  end
  args[#args + 1] = 'JUSTID'
  redis.call('XCLAIM', tasks_key, group, consumer, 0, unpack(args))
end
return mine

-- A consumer leaves the group, unless tasks are still pending for it (deleting it would
-- drop their entries for good); atomic, so that none is claimed for it in between.
-- ARGV: group, consumer. Returns how many are pending (0: it left).
local tasks_key = KEYS[1]
local group, consumer = ARGV[1], ARGV[2]

local pending = redis.call('XPENDING', tasks_key, group, '-', '+', 1, consumer)
if #pending > 0 then
  return #pending
end
redis.call('XGROUP', 'DELCONSUMER', tasks_key, group, consumer)
return 0

-- Give a task back unrun (its worker lacks the definition its request runs on), to the
-- delayed set for `delay_ms`, as `blob` (the task as it was). ARGV: group, consumer,
-- receipt, delay_ms, blob. A task no longer pending for this consumer is left alone:
-- another worker took it over (see handback.lua). Returns 1 if given back, else 0.
local tasks_key, delayed_key = KEYS[1], KEYS[2]
local group, consumer, receipt, delay_ms, blob =
  ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4]), ARGV[5]

local pending = redis.call('XPENDING', tasks_key, group, receipt, receipt, 1)
if not (pending[1] and pending[1][2] == consumer) then
  return 0
end
redis.call('ZADD', delayed_key, math.floor(now() * 1000) + delay_ms, blob)
redis.call('XACK', tasks_key, group, receipt)
redis.call('XDEL', tasks_key, receipt)
return 1

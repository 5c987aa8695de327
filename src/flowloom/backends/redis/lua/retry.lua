-- An attempt failed: queue the next one (`blob`) after `delay_ms`, ack this one.
local id, group, receipt, address, delay_ms, err, blob =
  ARGV[1], ARGV[2], ARGV[3], ARGV[4], tonumber(ARGV[5]), ARGV[6], ARGV[7]

local req = load_request(id)
if req and not FINISHED[req.status] then
  redis.call('HSET', vertices_key, 's|' .. address, 'queued', 'x|' .. address, err)
  if delay_ms <= 0 then
    queue(req, blob)
  else
    redis.call('ZADD', delayed_key, math.floor(now() * 1000) + delay_ms, blob)
  end
end
ack(group, receipt)
return 1

-- An attempt failed: queue the next one (`blob`) after `delay_ms`, ack this one. A no-op
-- but the ack if the request has ended or the instance is done (another worker took the
-- task over and completed it); set aside for a retry if the request failed or stopped.
local id, group, receipt, inst, address, delay_ms, err, blob =
  ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], tonumber(ARGV[6]), ARGV[7], ARGV[8]

local req = load_request(id)
ack(group, receipt) -- after the read, before the next attempt is queued (as in complete.lua)
if req and HALTED[req.status] and redis.call('HEXISTS', instances_key, 'd|' .. inst) == 0 then
  set_aside(request_key, blob)
elseif req and not FINISHED[req.status] and redis.call('HEXISTS', instances_key, 'd|' .. inst) == 0 then
  redis.call('HSET', vertices_key, 's|' .. address, 'queued', 'x|' .. address, err)
  if delay_ms <= 0 then
    queue(req, blob, nil) -- begun by its worker, with its attempt
  else
    redis.call('ZADD', delayed_key, math.floor(now() * 1000) + delay_ms, blob)
  end
end
return 1

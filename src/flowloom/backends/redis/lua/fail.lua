-- A task failed for good: the vertex and the request fail with `err`; ack the task, and
-- set it (`blob`) aside for a retry of the request. Only the ack and the setting aside
-- (and the vertex's error) if the request has failed or stopped meanwhile; only the ack
-- if it completed or the instance is done.
local id, group, receipt, inst, address, err, retention_ms, blob =
  ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], tonumber(ARGV[7]), ARGV[8]

local req = load_request(id)
if req and req.status ~= 'completed' and redis.call('HEXISTS', instances_key, 'd|' .. inst) == 0 then
  redis.call('HSET', vertices_key, 's|' .. address, 'failed', 'x|' .. address, err,
    'e|' .. address, fmt(now()))
  if HALTED[req.status] then
    set_aside(request_key, blob)
  else
    redis.call('RPUSH', lost_key, blob)
    finish(req, 'failed', retention_ms, nil, err)
  end
end
ack(group, receipt)
return 1

-- A task failed for good: the vertex and the request fail with `err`; ack the task. A
-- no-op but the ack if the request has ended or the instance is done.
local id, group, receipt, inst, address, err, retention_ms =
  ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], tonumber(ARGV[7])

local req = load_request(id)
if req and not FINISHED[req.status] and redis.call('HEXISTS', instances_key, 'd|' .. inst) == 0 then
  redis.call('HSET', vertices_key, 's|' .. address, 'failed', 'x|' .. address, err,
    'e|' .. address, fmt(now()))
  finish(req, 'failed', retention_ms, nil, err)
end
ack(group, receipt)
return 1

-- A task failed for good: the vertex and the request fail with `err`; ack the task.
local id, group, receipt, address, err, retention_ms =
  ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], tonumber(ARGV[6])

local req = load_request(id)
if req and not FINISHED[req.status] then
  redis.call('HSET', vertices_key, 's|' .. address, 'failed', 'x|' .. address, err,
    'e|' .. address, fmt(now()))
  finish(req, 'failed', retention_ms, nil, err)
end
ack(group, receipt)
return 1

-- A task failed for good: the vertex and the request fail with `err`; ack the task, and
-- set it (`blob`) aside for a retry of the request. Only the ack and the setting aside
-- (and the vertex's error) if the request has failed or stopped meanwhile; only the ack
-- if it completed or the instance is done. An attempt that began before a retry of the
-- request (a vertex ``r|`` mark) does not fail it: it is queued again, attempt 1.
local id, group, receipt, inst, address, err, retention_ms, blob =
  ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], tonumber(ARGV[7]), ARGV[8]

local req = load_request(id)
if req and not FINISHED[req.status] and redis.call('HDEL', instances_key, 'r|' .. address) == 1 then
  -- an attempt begun before a retry of the request: it runs again instead
  redis.call('XADD', tasks_key, '*', 't', (fresh(blob)))
elseif req and req.status ~= 'completed' and redis.call('HEXISTS', instances_key, 'd|' .. inst) == 0 then
  redis.call('HSET', vertices_key, 's|' .. address, 'failed', 'x|' .. address, err,
    'e|' .. address, now_text())
  if HALTED[req.status] then
    set_aside(request_key, blob)
  else
    redis.call('RPUSH', lost_key, blob)
    finish(req, 'failed', retention_ms, nil, err)
  end
end
ack(group, receipt)
return 1

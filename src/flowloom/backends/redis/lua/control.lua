-- Pause, resume or stop a request. Returns {'missing'}, {'ended', status} or {'ok', status}.
local id, action, retention_ms = ARGV[1], ARGV[2], tonumber(ARGV[3])

local req = load_request(id)
if not req then
  return { 'missing' }
end
if FINISHED[req.status] then
  return { 'ended', req.status }
end
if action == 'paused' then
  redis.call('HSET', request_key, 'status', 'paused')
  return { 'ok', 'paused' }
elseif action == 'running' then
  if req.status ~= 'paused' then
    return { 'ok', req.status }
  end
  redis.call('HSET', request_key, 'status', 'running')
  local held = redis.call('LRANGE', held_key, 0, -1)
  for _, blob in ipairs(held) do
    redis.call('XADD', tasks_key, '*', 't', blob)
  end
  if #held > 0 then
    redis.call('DECRBY', held_count_key, #held)
  end
  redis.call('DEL', held_key)
  return { 'ok', 'running' }
end
finish(req, 'stopped', retention_ms, nil, nil)
return { 'ok', 'stopped' }

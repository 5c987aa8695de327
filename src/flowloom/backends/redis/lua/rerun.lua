-- Take a failed or stopped request back to running (a retry): keep what completed, queue
-- the tasks it set aside again (once per step instance, attempt 1), record the time.
-- Returns {'missing'}, {'not', status} or {'ok', 'running'}.
local id = ARGV[1]

local req = load_request(id)
if not req then
  return { 'missing' }
end
if not HALTED[req.status] or redis.call('HGET', request_key, 'retryable') ~= '1' then
  return { 'not', req.status }
end
local t = now()
local retries = redis.call('HGET', request_key, 'retries')
retries = (retries and retries ~= '') and (retries .. ',' .. fmt(t)) or fmt(t)
redis.call('HSET', request_key, 'status', 'running', 'retries', retries)
redis.call('HDEL', request_key, 'ended', 'error', 'retryable')
redis.call('DEL', ended_key)
for _, key in ipairs({ request_key, vertices_key, context_key, outputs_key, instances_key,
  inputs_key }) do
  redis.call('PERSIST', key)
end
redis.call('ZREM', expiries_key, req.flow .. '\0' .. id)

-- vertices that failed, or ran when it ended, are queued again
local cursor = '0'
repeat
  local res = redis.call('HSCAN', vertices_key, cursor, 'MATCH', 's|*', 'COUNT', 1000)
  cursor = res[1]
  for j = 1, #res[2], 2 do
    local state = res[2][j + 1]
    if state == 'failed' or state == 'running' then
      redis.call('HSET', vertices_key, res[2][j], 'queued')
    end
  end
until cursor == '0'

-- a task blob: id, flow, version, step, keys, attempt, inputs...: the instance is the
-- step and the keys; the attempt starts again at 1
local seen = {}
for _, blob in ipairs(redis.call('LRANGE', lost_key, 0, -1)) do
  local pos, parts = 1, {}
  for n = 1, 6 do
    local colon = string.find(blob, ':', pos, true)
    local len = tonumber(string.sub(blob, pos, colon - 1))
    parts[n] = string.sub(blob, colon + 1, colon + len)
    pos = colon + 1 + len
  end
  local instance = parts[4] .. '\0' .. parts[5]
  if parts[4] ~= '!hooks' and not seen[instance] then
    seen[instance] = true
    local fresh = ns(parts[1]) .. ns(parts[2]) .. ns(parts[3]) .. ns(parts[4]) .. ns(parts[5])
      .. ns('1') .. string.sub(blob, pos)
    redis.call('XADD', tasks_key, '*', 't', fresh)
  end
end
redis.call('DEL', lost_key)
return { 'ok', 'running' }

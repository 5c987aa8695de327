-- Take a failed or stopped request back to running (a retry): keep what completed, queue
-- the tasks it set aside again (once per step instance, attempt 1), record the time and
-- the retry's trace (ARGV[2], when given: its root span).
-- Returns {'missing'}, {'not', status}, {'kept-nothing', status} (it ended before this
-- version of flowloom kept what a retry needs) or {'ok', 'running'}.
local id = ARGV[1]

local req = load_request(id)
if not req then
  return { 'missing' }
end
if not HALTED[req.status] then
  return { 'not', req.status }
end
if redis.call('HGET', request_key, 'retryable') ~= '1' then
  return { 'kept-nothing', req.status } -- ended before retries were possible
end
local retries = redis.call('HGET', request_key, 'retries')
retries = (retries and retries ~= '') and (retries .. ',' .. now_text()) or now_text()
redis.call('HSET', request_key, 'status', 'running', 'retries', retries)
if ARGV[2] and ARGV[2] ~= '' then
  redis.call('HSET', request_key, 'trace', ARGV[2]) -- the retry's root span
end
redis.call('HDEL', request_key, 'ended', 'error', 'retryable')
redis.call('DEL', ended_key)
for _, key in ipairs({ request_key, vertices_key, context_key, outputs_key, instances_key,
  inputs_key }) do
  redis.call('PERSIST', key)
end
each_inputs('PERSIST')
redis.call('ZREM', expiries_key, req.flow .. '\0' .. id)

-- vertices that failed, or ran when it ended, are queued again
local cursor = '0'
repeat
  local res = redis.call('HSCAN', vertices_key, cursor, 'MATCH', 's|*', 'COUNT', 1000)
  cursor = res[1]
  for j = 1, #res[2], 2 do
    local state = res[2][j + 1]
    if state == 'running' then -- an attempt begun before the retry: marked stale
      redis.call('HSET', instances_key, 'r|' .. string.sub(res[2][j], 3), '1')
    end
    if state == 'failed' or state == 'running' then -- its last error goes (complete.lua)
      redis.call('HSET', vertices_key, res[2][j], 'queued')
      redis.call('HDEL', vertices_key, 'x|' .. string.sub(res[2][j], 3))
    end
  end
until cursor == '0'

-- each set-aside task once per step instance (its step and keys), with attempt 1
local seen = {}
for _, blob in ipairs(redis.call('LRANGE', lost_key, 0, -1)) do
  local task, step, keys = fresh(blob)
  local instance = step .. '\0' .. keys
  if step ~= '!hooks' and not seen[instance] then
    seen[instance] = true
    redis.call('XADD', tasks_key, '*', 't', task)
  end
end
redis.call('DEL', lost_key)
return { 'ok', 'running' }

-- Mark a claimed task running (see begin_task); 1 if it may run.
local id, group, receipt, inst, address, attempt =
  ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]

local blob = ''
local status = redis.call('HGET', request_key, 'status')
if status == 'paused' or HALTED[status] then
  local entry = redis.call('XRANGE', tasks_key, receipt, receipt)
  if entry[1] then
    blob = entry[1][2][2]
  end
end
return begin_task(request_key, group, receipt, blob, inst, attempt)

-- Mark a claimed task running (see begin_task): what its worker needs of the request's
-- record (see facts) if it may run, else 0.
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
if begin_task(request_key, group, receipt, blob, inst, attempt, status) == 1 then
  return facts(request_key)
end
return 0

-- Create a request and queue its first tasks; 0 if the id exists already. Then read up
-- to `claim` new tasks for `consumer` (the submitting process's, for its idle worker
-- threads) and begin those that say their instance, as complete.lua's claim does: they
-- are pending for that consumer as any task it reads, so a process that dies or
-- freezes loses none. Returns 1 (created, nothing claimed) or {entries, began}.
-- KEYS: the request's keys, then P:requests and P:flow:{name} (the listings)
local requests_key, flow_index_key = KEYS[12], KEYS[13]
local id, flow, version, body, query, headers, created, hooks, trace, group, consumer, claim,
  ndeliveries = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7], ARGV[8],
  ARGV[9], ARGV[10], ARGV[11], tonumber(ARGV[12]), tonumber(ARGV[13])
local DELIVERIES = 14 -- deliveries follow in ARGV from here on (see apply)

if redis.call('EXISTS', request_key) == 1 then
  return 0
end
redis.call('HSET', request_key, 'flow', flow, 'version', version, 'body', body, 'query', query,
  'headers', headers, 'created', created, 'hooks', hooks, 'trace', trace, 'status', 'queued')
local score = tonumber(created)
redis.call('ZADD', requests_key, score, id)
redis.call('ZADD', flow_index_key, score, id)
local req = { status = 'queued', flow = flow, version = version, hooks = hooks, id = id }
apply(req, DELIVERIES, ndeliveries)
if claim == 0 then
  return 1
end
local res = redis.call('XREADGROUP', 'GROUP', group, consumer, 'COUNT', claim, 'STREAMS', tasks_key, '>')
if not res then
  return 1
end
local entries, began = res[1][2], {}
local base = string.sub(request_key, 1, #request_key - #id - 1)
local known = 'queued' -- this request's status, as this script left it
for j, entry in ipairs(entries) do
  local fields = entry[2]
  began[j] = -1
  if fields and fields[3] == 'i' then
    local blob = fields[2]
    local colon = string.find(blob, ':', 1, true)
    local rid = string.sub(blob, colon + 1, colon + tonumber(string.sub(blob, 1, colon - 1)))
    local mine = rid == id
    began[j] = begin_task(base .. rid .. '}', group, entry[1], blob, fields[4], '1',
      mine and known or nil, mine and fired_here[fields[4]])
    if mine and began[j] == 1 then
      known = 'running'
    end
  end
end
return { entries, began }

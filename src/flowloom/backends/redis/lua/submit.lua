-- Create a request and queue its first tasks; 0 if the id exists already. Then read up
-- to `claim` new tasks for `consumer` (the submitting process's, for its idle worker
-- threads) and begin those that say their instance, as complete.lua's claim does: they
-- are pending for that consumer as any task it reads, so a process that dies or
-- freezes loses none. Returns 1 (created, nothing claimed) or what claim_tasks does.
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
return claim_tasks(id, group, consumer, claim, 'queued') or 1

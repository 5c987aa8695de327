-- Create a request and queue its first tasks; 0 if the id exists already.
-- KEYS: the request's keys, then P:requests and P:flow:{name} (the listings)
local requests_key, flow_index_key = KEYS[12], KEYS[13]
local id, flow, version, body, query, headers, created, hooks, trace, ndeliveries =
  ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7], ARGV[8], ARGV[9],
  tonumber(ARGV[10])
local DELIVERIES = 11 -- deliveries follow in ARGV from here on (see apply)

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
return 1

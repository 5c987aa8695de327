-- Set a key of the request's context store (expiring with the request); 0 if no request.
local id, key, value = ARGV[1], ARGV[2], ARGV[3]

if redis.call('EXISTS', request_key) == 0 then
  return 0
end
redis.call('HSET', context_key, key, value)
local ttl = redis.call('PTTL', request_key)
if ttl > 0 then
  redis.call('PEXPIRE', context_key, ttl)
end
return 1

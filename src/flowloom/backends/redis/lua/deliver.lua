-- Apply a part of a large transition (a big foreach's items) ahead of the completion
-- that carries its last part, so that no call carries more than a bounded number of
-- bytes. Applying is idempotent (once per instance and slot): a task run again after its
-- worker died applies its parts again harmlessly. Nothing if the request completed or
-- the instance is done already.
local id, inst, ndeliveries = ARGV[1], ARGV[2], tonumber(ARGV[3])
local DELIVERIES = 4 -- deliveries follow in ARGV from here on (see apply)

local req = load_request(id)
if req and req.status ~= 'completed' and redis.call('HEXISTS', instances_key, 'd|' .. inst) == 0 then
  apply(req, DELIVERIES, ndeliveries)
  if HALTED[req.status] then -- kept for a retry, as long as the request
    local ttl = redis.call('PTTL', request_key)
    if ttl > 0 then
      for _, key in ipairs({ instances_key, inputs_key }) do
        redis.call('PEXPIRE', key, ttl)
      end
    end
  end
end
return 1

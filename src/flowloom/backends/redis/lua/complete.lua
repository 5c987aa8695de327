-- A task succeeded: ack the task, record its output, apply its deliveries (once per
-- instance), end the request if it is finished; then read up to `claim` new tasks for
-- `consumer` and begin those that say their instance. Returns what claim_tasks does (per
-- task read: id, blob, began, facts) or false: facts is what the worker needs of the
-- record of the request of a task begun here (see facts), or 0 for a task of this request
-- (its worker has just run one).
local id, group, receipt, inst, address, output, finished, result, retention_ms, consumer, claim,
  flags, ndeliveries = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7], ARGV[8],
  tonumber(ARGV[9]), ARGV[10], tonumber(ARGV[11]), ARGV[12], tonumber(ARGV[13])
local DELIVERIES = 14 -- deliveries follow in ARGV from here on (see apply)
-- output is '' (a split: no output of its own), 'n' (completed, output not kept), 'r'
-- (its output is the request's result, kept once, as the result) or 'd' .. bytes;
-- flags has 'p' if the task's inputs wait in their hash (a large fan-in: see gather), the
-- only case where inputs are still stored for an instance that ran, and 'x' if an earlier
-- attempt of the vertex may have left its error (x|ADDR): a first attempt writes no HDEL
-- (a retry of the request clears the errors of the vertices it queues again)

-- Redis keeps a small hash as a listpack, which every lookup and insert scans: cheap for
-- a few fields, dear once a long chain or a wide foreach has written hundreds (a hop
-- writes two instance marks and up to four vertex fields). Once a completion that fires
-- something finds TABLE_AT instance marks, the marks, the vertex states and the outputs
-- become hash tables for good: a value longer than `hash-max-listpack-value` (64)
-- converts a hash, and it stays converted when the value goes. The request's `table`
-- field is the sign that it was done (read with the request: no call per hop after it). A
-- small request keeps its listpacks (less memory, and as quick at that size).
local TABLE_AT, TABLE_MARK = 32, '!table'

-- a request that failed or stopped meanwhile records the completion too (for a retry),
-- setting aside what it makes ready
local req = load_request(id)

-- acked before anything is written (a script that fails reading the request leaves its
-- task pending, to be delivered again), and before anything this completion makes ready
-- is added: a chain's task is then the only one in its stream node, which XDEL frees at
-- once; acked after the XADD of the next hop, it stayed, deleted, in a node that filled
-- up over a hundred hops, and the XDEL (finding the stream's new first entry) and the
-- claim's XREADGROUP walked its deleted entries at every hop
ack(group, receipt)
local vertex = {} -- the completed vertex's fields: written with the next task's (claim_tasks)
if req and req.status ~= 'completed' and redis.call('HSETNX', instances_key, 'd|' .. inst, '1') == 1 then
  if string.find(flags, 'p', 1, true) then
    forget_inputs(inst)
  end
  if ndeliveries > 0 and not req.table and redis.call('HLEN', instances_key) >= TABLE_AT then
    local long = string.rep('-', 80)
    for _, key in ipairs({ instances_key, vertices_key, outputs_key }) do
      redis.call('HSET', key, TABLE_MARK, long)
      redis.call('HDEL', key, TABLE_MARK)
    end
    redis.call('HSET', request_key, 'table', '1')
  end
  if output ~= '' then
    vertex = { 's|' .. address, 'completed', 'e|' .. address, now_text() }
    if string.find(flags, 'x', 1, true) then
      redis.call('HDEL', vertices_key, 'x|' .. address)
    end
    local kind = string.sub(output, 1, 1)
    if kind == 'd' then
      redis.call('HSET', outputs_key, address, string.sub(output, 2))
    elseif kind == 'r' then
      if finished == '1' and not HALTED[req.status] then
        redis.call('HSET', request_key, 'result_of', address) -- output() reads the result
      else
        redis.call('HSET', outputs_key, address, result)
      end
    end
  end
  apply(req, DELIVERIES, ndeliveries)
  if HALTED[req.status] then
    local ttl = redis.call('PTTL', request_key)
    if ttl > 0 then
      for _, key in ipairs({ vertices_key, instances_key, inputs_key, outputs_key }) do
        redis.call('PEXPIRE', key, ttl)
      end
    end
  elseif finished == '1' then
    finish(req, 'completed', retention_ms, result, nil)
  end
end
-- read up to `claim` new tasks for this consumer, and begin those that say their
-- instance; this request's status as read above, unless this script ended the request
-- (a chain's next hop is nearly always of the same request: no second read)
if claim > 0 then
  return claim_tasks(id, group, consumer, claim, req and finished ~= '1' and req.status or nil,
    vertex)
end
if #vertex > 0 then
  redis.call('HSET', vertices_key, unpack(vertex))
end
return false

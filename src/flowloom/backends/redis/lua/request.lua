-- Prepended to every script about one request (after common.lua). Such a script gets
-- the request's keys first, in the order of RequestKeys.script_keys():
local request_key = KEYS[1]    -- P:r:{id}      hash   the request
local vertices_key = KEYS[2]   -- P:r:{id}:v    hash   vertex states
local instances_key = KEYS[3]  -- P:r:{id}:i    hash   instance marks (f| d| n| c|)
local inputs_key = KEYS[4]     -- P:r:{id}:s    set    instances with inputs waiting, each
                               -- in a hash P:r:{id}:s:INST of its own (slot -> value)
local held_key = KEYS[5]       -- P:r:{id}:h    list   tasks held while paused
local context_key = KEYS[6]    -- P:r:{id}:c    hash   the context store
local ended_key = KEYS[7]      -- P:r:{id}:e    list   end notification
local outputs_key = KEYS[8]    -- P:r:{id}:o    hash   outputs of completed instances
local tasks_key = KEYS[9]      -- P:tasks       stream ready tasks
local expiries_key = KEYS[10]  -- P:expiries    zset   when ended requests leave listings
local delayed_key = KEYS[11]   -- P:delayed     zset   retries waiting for their time
-- P:held (string): tasks held over all paused requests, for the queue-depth metric
local held_count_key = string.sub(tasks_key, 1, -6) .. 'held'
-- P:ended (channel): "<id> <status>[ <result>]" published when a request ends, with
-- the result of a completed request up to PUSHED_RESULT bytes (see ends.py)
local ended_channel = string.sub(tasks_key, 1, -6) .. 'ended'
local PUSHED_RESULT = 4096
-- P:r:{id}:l (list): tasks a failed or stopped request set aside, for a retry
local lost_key = request_key .. ':l'
--
-- A task is one binary-safe blob of netstrings ("<len>:<bytes>"): request id, flow,
-- version, step, keys (each followed by "\0"), attempt, then (slot, value) pairs where
-- a value is "d" .. data or "n" (an ordering-only input).

-- the request's identity and status, read once per script; `table`: its instance marks,
-- vertex states and outputs are hash tables already (complete.lua)
local function load_request(id)
  local f = redis.call('HMGET', request_key, 'status', 'flow', 'version', 'hooks', 'table')
  if not f[1] then
    return nil
  end
  return { status = f[1], flow = f[2], version = f[3], hooks = f[4], table = f[5], id = id }
end

local function ack(group, receipt)
  if receipt ~= '' then
    redis.call('XACK', tasks_key, group, receipt)
    redis.call('XDEL', tasks_key, receipt)
  end
end

-- keep a task of the failed or stopped request `r` (its hash key) for a retry; the list
-- expires with the request
local function set_aside(r, blob)
  redis.call('RPUSH', r .. ':l', blob)
  local ttl = redis.call('PTTL', r)
  if ttl > 0 then
    redis.call('PEXPIRE', r .. ':l', ttl)
  end
end

-- what a worker running a task of the request `r` (its hash key) needs of its record,
-- beyond the task itself: its query, when it was created, its trace. Sent with the task's
-- begin, so that a request submitted from another process costs its worker no read of
-- its own (see Consumer.facts_of)
local function facts(r)
  return redis.call('HMGET', r, 'query', 'created', 'trace')
end

-- a ready task: on the stream, aside while the request is paused, or set aside for a
-- retry once it failed or stopped. A first attempt goes with its instance (`inst`), so
-- that a completion's claim can begin it; a later one (`inst` nil) is begun by its
-- worker, which knows its attempt.
local function queue(req, blob, inst)
  if HALTED[req.status] then
    set_aside(request_key, blob)
  elseif req.status == 'paused' then
    redis.call('RPUSH', held_key, blob)
    redis.call('INCR', held_count_key)
  elseif inst then
    redis.call('XADD', tasks_key, '*', 't', blob, 'i', inst)
  else
    redis.call('XADD', tasks_key, '*', 't', blob)
  end
end

-- mark a claimed task running, unless it must not run: its request ended or the
-- instance is done (acked: dropped), or the request is paused (acked: held).
-- `r` is the request's hash key (of this request or another one: the complete script
-- begins the tasks it reads); the other keys are derived from it. `status` is the
-- request's, if the caller knows it already (else read); `fired` says the instance
-- fired in this very script, so it cannot be done yet (else read). `vertex`: a list the
-- vertex fields of a task of this request go to, for the caller to write with its own
-- (nil: written here). 1 if begun.
local function begin_task(r, group, receipt, blob, inst, attempt, status, fired, vertex)
  status = status or redis.call('HGET', r, 'status')
  local done = not fired and redis.call('HEXISTS', r .. ':i', 'd|' .. inst) == 1
  if not status or FINISHED[status] or done then
    if HALTED[status] and blob ~= '' and not done then
      set_aside(r, blob)
    end
    ack(group, receipt)
    return 0
  end
  if status == 'paused' then
    if blob ~= '' then
      redis.call('RPUSH', r .. ':h', blob)
      redis.call('INCR', held_count_key)
    end
    ack(group, receipt)
    return 0
  end
  if status ~= 'running' then
    redis.call('HSET', r, 'status', 'running')
  end
  local address = string.gsub(inst, ':[a-z]+$', '')
  local fields = vertex or {}
  local n = #fields
  fields[n + 1], fields[n + 2], fields[n + 3], fields[n + 4] =
    's|' .. address, 'running', 'a|' .. address, attempt
  if fired and address == inst then
    -- fired here (an instance fires once) and its vertex's only instance (no split or
    -- join shares its address): never begun before, no earlier begin time to keep
    fields[n + 5], fields[n + 6] = 'b|' .. address, now_text()
  else
    redis.call('HSETNX', r .. ':v', 'b|' .. address, now_text())
  end
  if not vertex then
    redis.call('HSET', r .. ':v', unpack(fields))
  end
  return 1
end

-- `blob` with its attempt set back to 1; also its step and keys (which name its instance)
local function fresh(blob)
  local pos, parts = 1, {}
  for n = 1, 6 do
    local colon = string.find(blob, ':', pos, true)
    local len = tonumber(string.sub(blob, pos, colon - 1))
    parts[n] = string.sub(blob, colon + 1, colon + len)
    pos = colon + 1 + len
  end
  return ns(parts[1]) .. ns(parts[2]) .. ns(parts[3]) .. ns(parts[4]) .. ns(parts[5]) .. ns('1')
    .. string.sub(blob, pos), parts[4], parts[5]
end

-- the hash of inputs waiting for the instance `inst`
local function inputs_of(inst)
  return inputs_key .. ':' .. inst
end

-- a fan-in of at most this many inputs and bytes travels inside its task; a larger one
-- (a big foreach's join) leaves its inputs in their hash, for the worker to read in pages
local INLINE_INPUTS, INLINE_BYTES = 100, 1048576
local PAGED = '!paged' -- the slot of a task whose inputs wait in their hash

-- the inputs stored for `inst`, encoded as slot/value netstrings for its task: the
-- inputs themselves (their hash forgotten), or a reference to their hash if too large
local function gather(inst, count)
  local key = inputs_of(inst)
  if count <= INLINE_INPUTS then
    local kv = redis.call('HGETALL', key)
    local parts, size = {}, 0
    for j = 1, #kv, 2 do
      parts[#parts + 1] = ns(kv[j]) .. ns(kv[j + 1])
      size = size + #kv[j + 1]
    end
    if count <= 1 or size <= INLINE_BYTES then
      redis.call('DEL', key)
      redis.call('SREM', inputs_key, inst)
      return table.concat(parts)
    end
  end
  return ns(PAGED) .. ns('d' .. inst) -- the hash goes once the instance is done
end

-- the instance `inst` is done: its inputs are not needed any more
local function forget_inputs(inst)
  if redis.call('SREM', inputs_key, inst) == 1 then
    redis.call('UNLINK', inputs_of(inst))
  end
end

-- call `cmd KEY ...` on the inputs hash of every instance with inputs waiting
local function each_inputs(cmd, ...)
  local members = redis.call('SMEMBERS', inputs_key)
  for _, inst in ipairs(members) do
    redis.call(cmd, inputs_of(inst), ...)
  end
end

-- the instances this script fired (an instance fires once: none of them is done)
local fired_here = {}

local function fire(req, inst, step, keys, inputs)
  fired_here[inst] = true
  local blob = ns(req.id) .. ns(req.flow) .. ns(req.version) .. ns(step) .. ns(keys) .. ns('1')
  queue(req, blob .. inputs, inst)
end

-- apply `count` deliveries found in ARGV from index `first` on, six values each:
-- instance, step, keys, slot, value, needed (-1: as an earlier delivery said)
local function apply(req, first, count)
  local a = first
  for _ = 1, count do
    local inst, step, keys, slot, value = ARGV[a], ARGV[a + 1], ARGV[a + 2], ARGV[a + 3], ARGV[a + 4]
    local needed = tonumber(ARGV[a + 5])
    a = a + 6
    if needed == 1 then -- its only input: it fires now, unless it fired already
      if redis.call('HSETNX', instances_key, 'f|' .. inst, '1') == 1 then
        fire(req, inst, step, keys, ns(slot) .. ns(value))
      end
    elseif redis.call('HEXISTS', instances_key, 'f|' .. inst) == 0 then
      if redis.call('HSETNX', inputs_of(inst), slot, value) == 1 then
        if needed < 0 then
          needed = tonumber(redis.call('HGET', instances_key, 'n|' .. inst)) or -1
        else
          redis.call('HSET', instances_key, 'n|' .. inst, needed)
        end
        local have = redis.call('HINCRBY', instances_key, 'c|' .. inst, 1)
        if have == 1 then
          redis.call('SADD', inputs_key, inst)
          local ttl = HALTED[req.status] and redis.call('PTTL', request_key) or -1
          if ttl > 0 then -- kept for a retry, as long as the request
            redis.call('PEXPIRE', inputs_of(inst), ttl)
          end
        end
        if needed >= 0 and have >= needed then
          redis.call('HDEL', instances_key, 'n|' .. inst, 'c|' .. inst)
          redis.call('HSET', instances_key, 'f|' .. inst, '1')
          fire(req, inst, step, keys, gather(inst, have))
        end
      end
    end
  end
  return a
end

-- end the request: record how, forget its bookkeeping, start the retention clock
local function finish(req, status, retention_ms, result, err)
  local t = now()
  redis.call('HSET', request_key, 'status', status, 'ended', now_text())
  if result then
    redis.call('HSET', request_key, 'result', result)
  end
  if err then
    redis.call('HSET', request_key, 'error', err)
  end
  local held = redis.call('LRANGE', held_key, 0, -1)
  if #held > 0 then
    redis.call('DECRBY', held_count_key, #held)
  end
  local kept = { request_key, vertices_key, context_key, ended_key, outputs_key }
  if HALTED[status] then
    -- kept for a retry: what fired and completed, the inputs waiting, the held tasks
    chunked('RPUSH', lost_key, held)
    redis.call('HSET', request_key, 'retryable', '1')
    for _, key in ipairs({ instances_key, inputs_key, lost_key }) do
      kept[#kept + 1] = key
    end
    each_inputs('PEXPIRE', retention_ms)
    redis.call('DEL', held_key)
  else
    each_inputs('UNLINK')
    -- a long request's instance marks are a hash table (complete.lua): freed in the
    -- background, not in the call that ends the request
    redis.call('UNLINK', instances_key, inputs_key, held_key, lost_key)
  end
  redis.call('RPUSH', ended_key, status)
  if result and #result <= PUSHED_RESULT then
    redis.call('PUBLISH', ended_channel, req.id .. ' ' .. status .. ' ' .. result)
  else
    redis.call('PUBLISH', ended_channel, req.id .. ' ' .. status)
  end
  for _, key in ipairs(kept) do
    redis.call('PEXPIRE', key, retention_ms)
  end
  -- the index sweep drops the request from the listings once it has expired
  redis.call('ZADD', expiries_key, math.floor(t * 1000) + retention_ms, req.flow .. '\0' .. req.id)
  if req.hooks == '1' then
    local blob = ns(req.id) .. ns(req.flow) .. ns(req.version) .. ns('!hooks') .. ns('') .. ns('1')
    redis.call('XADD', tasks_key, '*', 't', blob .. ns('status') .. ns('d' .. status))
  end
end

-- read up to `count` new tasks for `consumer` and begin those that say their instance,
-- of any request (their keys derive from this request's key prefix). `known`: the status
-- of this request (`id`) as the caller left it (nil: read). A task begun of another request
-- brings what its worker needs of that request's record (see facts); one of this
-- request needs none (its worker has just run or submitted one). Returns, flat, four
-- values a task read: its entry's id, its blob ('' if its entry is gone), began (1 begun,
-- 0 dropped, -1 to be begun by its worker) and facts (0 or the record's); or false if
-- nothing was there (one table, not one per entry and field: Redis converts each table
-- of a script's reply with seven lookups of its own). A completion's claim and a
-- submit's. `vertex`: fields of this request's vertices the caller has yet to write
-- (or nil), written here with those of the tasks of this request begun here, in one
-- HSET (a chain's hop: the completed vertex and the next one).
local function claim_tasks(id, group, consumer, count, known, vertex)
  vertex = vertex or {}
  local res = redis.call('XREADGROUP', 'GROUP', group, consumer, 'COUNT', count, 'STREAMS', tasks_key, '>')
  if not res then
    if #vertex > 0 then
      redis.call('HSET', vertices_key, unpack(vertex))
    end
    return false
  end
  local claimed = {}
  local base = string.sub(request_key, 1, #request_key - #id - 1)
  for _, entry in ipairs(res[1][2]) do
    local fields = entry[2]
    local began, known_facts = -1, 0
    if fields and fields[3] == 'i' then
      local blob = fields[2]
      local colon = string.find(blob, ':', 1, true)
      local rid = string.sub(blob, colon + 1, colon + tonumber(string.sub(blob, 1, colon - 1)))
      local mine = rid == id
      began = begin_task(base .. rid .. '}', group, entry[1], blob, fields[4], '1',
        mine and known or nil, mine and fired_here[fields[4]], mine and vertex or nil)
      if mine and began == 1 then
        known = 'running'
      elseif began == 1 then
        known_facts = facts(base .. rid .. '}')
      end
    end
    local n = #claimed
    claimed[n + 1], claimed[n + 2], claimed[n + 3], claimed[n + 4] =
      entry[1], fields and fields[2] or '', began, known_facts
  end
  if #vertex > 0 then
    redis.call('HSET', vertices_key, unpack(vertex))
  end
  return claimed
end

-- flowloom's Redis transitions. Each "@script NAME" marker line below starts one script;
-- the code before the first marker (helpers) is prepended to every script.
-- The key layout is documented in flowloom/backends/redis.py.
--
-- Request scripts take the request's keys in this order:
--   KEYS[1] r  request hash      KEYS[5] h  held tasks (paused)
--   KEYS[2] v  vertex states     KEYS[6] c  context store
--   KEYS[3] i  instance marks    KEYS[7] e  end notification list
--   KEYS[4] s  waiting inputs    KEYS[8] tasks stream
--   KEYS[9] expiries (zset)      KEYS[10] delayed tasks (zset)
--   KEYS[11] o  vertex outputs
-- A task is one binary-safe blob of netstrings ("<len>:<bytes>"): request id, flow,
-- version, step, keys (each followed by "\0"), attempt, then (slot, value) pairs where
-- a value is "d" .. data or "n" (an ordering-only input).

local FINISHED = { completed = true, failed = true, stopped = true }

local function now()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end

local function fmt(x)
  return string.format('%.6f', x)
end

local function ns(s)
  return #s .. ':' .. s
end

-- call `cmd key a b c ...` in chunks, so long lists stay under Lua's unpack limit
local function chunked(cmd, key, items, prefix)
  for first = 1, #items, 1000 do
    local args = {}
    for j = first, math.min(first + 999, #items) do
      args[#args + 1] = items[j]
    end
    if prefix then
      redis.call(cmd, key, prefix, unpack(args))
    else
      redis.call(cmd, key, unpack(args))
    end
  end
end

-- the request's identity and status, read once per script
local function request()
  local f = redis.call('HMGET', KEYS[1], 'status', 'flow', 'version', 'hooks')
  if not f[1] then
    return nil
  end
  return { status = f[1], flow = f[2], version = f[3], hooks = f[4], id = ARGV[1] }
end

local function ack(group, receipt)
  if receipt ~= '' then
    redis.call('XACK', KEYS[8], group, receipt)
    redis.call('XDEL', KEYS[8], receipt)
  end
end

-- a ready task: on the stream (with its instance, so that it can be begun on claim),
-- or aside while the request is paused
local function queue(req, blob, inst)
  if req.status == 'paused' then
    redis.call('RPUSH', KEYS[5], blob)
  else
    redis.call('XADD', KEYS[8], '*', 't', blob, 'i', inst)
  end
end

-- mark a claimed task running, unless it must not run: its request ended or the
-- instance is done (acked: dropped), or the request is paused (acked: held).
-- `r` is the request's hash key; the others are derived from it. 1 if begun.
local function begin_task(r, group, receipt, blob, inst, attempt)
  local f = redis.call('HMGET', r, 'status')
  local status = f[1]
  if not status or FINISHED[status] or redis.call('HEXISTS', r .. ':i', 'd|' .. inst) == 1 then
    ack(group, receipt)
    return 0
  end
  if status == 'paused' then
    if blob ~= '' then
      redis.call('RPUSH', r .. ':h', blob)
    end
    ack(group, receipt)
    return 0
  end
  if status ~= 'running' then
    redis.call('HSET', r, 'status', 'running')
  end
  local address = string.gsub(inst, ':[a-z]+$', '')
  redis.call('HSET', r .. ':v', 's|' .. address, 'running', 'a|' .. address, attempt)
  redis.call('HSETNX', r .. ':v', 'b|' .. address, fmt(now()))
  return 1
end

local function glob_escape(s)
  return (string.gsub(s, '[%*%?%[%]\\]', '\\%0'))
end

-- collect (and forget) the inputs stored for `inst`, encoded as slot/value netstrings
local function gather(inst)
  local prefix = inst .. '\0'
  local pattern = glob_escape(prefix) .. '*'
  local parts, fields, seen = {}, {}, {}
  local cursor = '0'
  repeat
    local res = redis.call('HSCAN', KEYS[4], cursor, 'MATCH', pattern, 'COUNT', 1000)
    cursor = res[1]
    local kv = res[2]
    for j = 1, #kv, 2 do
      local field = kv[j]
      if not seen[field] then
        seen[field] = true
        fields[#fields + 1] = field
        parts[#parts + 1] = ns(string.sub(field, #prefix + 1)) .. ns(kv[j + 1])
      end
    end
  until cursor == '0'
  chunked('HDEL', KEYS[4], fields)
  return table.concat(parts)
end

local function fire(req, inst, step, keys, inputs)
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
    if redis.call('HEXISTS', KEYS[3], 'f|' .. inst) == 0 then
      if needed == 1 then
        redis.call('HSET', KEYS[3], 'f|' .. inst, '1')
        fire(req, inst, step, keys, ns(slot) .. ns(value))
      elseif redis.call('HSETNX', KEYS[4], inst .. '\0' .. slot, value) == 1 then
        if needed < 0 then
          needed = tonumber(redis.call('HGET', KEYS[3], 'n|' .. inst)) or -1
        else
          redis.call('HSET', KEYS[3], 'n|' .. inst, needed)
        end
        local have = redis.call('HINCRBY', KEYS[3], 'c|' .. inst, 1)
        if needed >= 0 and have >= needed then
          redis.call('HDEL', KEYS[3], 'n|' .. inst, 'c|' .. inst)
          redis.call('HSET', KEYS[3], 'f|' .. inst, '1')
          fire(req, inst, step, keys, gather(inst))
        end
      end
    end
  end
  return a
end

-- end the request: record how, forget its bookkeeping, start the retention clock
local function finish(req, status, retention_ms, result, err)
  local t = now()
  redis.call('HSET', KEYS[1], 'status', status, 'ended', fmt(t))
  if result then
    redis.call('HSET', KEYS[1], 'result', result)
  end
  if err then
    redis.call('HSET', KEYS[1], 'error', err)
  end
  redis.call('DEL', KEYS[3], KEYS[4], KEYS[5])
  redis.call('RPUSH', KEYS[7], status)
  for k = 1, 11 do
    if k <= 2 or k == 6 or k == 7 or k == 11 then
      redis.call('PEXPIRE', KEYS[k], retention_ms)
    end
  end
  -- the index sweep drops the request from the listings once it has expired
  redis.call('ZADD', KEYS[9], math.floor(t * 1000) + retention_ms, req.flow .. '\0' .. req.id)
  if req.hooks == '1' then
    local blob = ns(req.id) .. ns(req.flow) .. ns(req.version) .. ns('!hooks') .. ns('') .. ns('1')
    redis.call('XADD', KEYS[8], '*', 't', blob .. ns('status') .. ns('d' .. status))
  end
end

-- @script submit
-- KEYS[12] all requests index, KEYS[13] the flow's request index
-- ARGV: id, flow, version, body, query, headers, created, hooks, ndeliveries, deliveries...
if redis.call('EXISTS', KEYS[1]) == 1 then
  return 0
end
redis.call('HSET', KEYS[1], 'flow', ARGV[2], 'version', ARGV[3], 'body', ARGV[4], 'query', ARGV[5],
  'headers', ARGV[6], 'created', ARGV[7], 'hooks', ARGV[8], 'status', 'queued')
local score = tonumber(ARGV[7])
redis.call('ZADD', KEYS[12], score, ARGV[1])
redis.call('ZADD', KEYS[13], score, ARGV[1])
local req = { status = 'queued', flow = ARGV[2], version = ARGV[3], hooks = ARGV[8], id = ARGV[1] }
apply(req, 10, tonumber(ARGV[9]))
return 1

-- @script begin
-- ARGV: id, group, receipt, instance, address, attempt
local blob = ''
if redis.call('HGET', KEYS[1], 'status') == 'paused' then
  local entry = redis.call('XRANGE', KEYS[8], ARGV[3], ARGV[3])
  if entry[1] then
    blob = entry[1][2][2]
  end
end
return begin_task(KEYS[1], ARGV[2], ARGV[3], blob, ARGV[4], ARGV[6])

-- @script complete
-- ARGV: id, group, receipt, instance, address, output ('' or 'd' .. bytes), finished, result,
--       retention_ms,
--       consumer, claim (how many new tasks to read for this consumer), ndeliveries, deliveries...
local req = request()
if req and not FINISHED[req.status] and redis.call('HEXISTS', KEYS[3], 'd|' .. ARGV[4]) == 0 then
  redis.call('HSET', KEYS[3], 'd|' .. ARGV[4], '1')
  local address = ARGV[5]
  if ARGV[6] ~= '' then
    redis.call('HSET', KEYS[2], 's|' .. address, 'completed', 'e|' .. address, fmt(now()))
    redis.call('HDEL', KEYS[2], 'x|' .. address)
    redis.call('HSET', KEYS[11], address, string.sub(ARGV[6], 2))
  end
  apply(req, 13, tonumber(ARGV[12]))
  if ARGV[7] == '1' then
    finish(req, 'completed', tonumber(ARGV[9]), ARGV[8], nil)
  end
end
ack(ARGV[2], ARGV[3])
-- read up to `claim` new tasks for this consumer, and begin those that say their
-- instance (any request's: their keys are derived from this request's key prefix)
local claim = tonumber(ARGV[11])
if claim > 0 then
  local res = redis.call('XREADGROUP', 'GROUP', ARGV[2], ARGV[10], 'COUNT', claim, 'STREAMS', KEYS[8], '>')
  if not res then
    return false
  end
  local entries, began = res[1][2], {}
  local base = string.sub(KEYS[1], 1, #KEYS[1] - #ARGV[1] - 1)
  for j, entry in ipairs(entries) do
    local fields = entry[2]
    began[j] = -1
    if fields and fields[3] == 'i' then
      local blob = fields[2]
      local colon = string.find(blob, ':', 1, true)
      local rid = string.sub(blob, colon + 1, colon + tonumber(string.sub(blob, 1, colon - 1)))
      began[j] = begin_task(base .. rid .. '}', ARGV[2], entry[1], blob, fields[4], '1')
    end
  end
  return { entries, began }
end
return false

-- @script retry
-- ARGV: id, group, receipt, address, delay_ms, error, next attempt's task blob
local req = request()
if req and not FINISHED[req.status] then
  redis.call('HSET', KEYS[2], 's|' .. ARGV[4], 'queued', 'x|' .. ARGV[4], ARGV[6])
  local delay = tonumber(ARGV[5])
  if delay <= 0 then
    queue(req, ARGV[7])
  else
    redis.call('ZADD', KEYS[10], math.floor(now() * 1000) + delay, ARGV[7])
  end
end
ack(ARGV[2], ARGV[3])
return 1

-- @script fail
-- ARGV: id, group, receipt, address, error, retention_ms
local req = request()
if req and not FINISHED[req.status] then
  local address = ARGV[4]
  redis.call('HSET', KEYS[2], 's|' .. address, 'failed', 'x|' .. address, ARGV[5],
    'e|' .. address, fmt(now()))
  finish(req, 'failed', tonumber(ARGV[6]), nil, ARGV[5])
end
ack(ARGV[2], ARGV[3])
return 1

-- @script control
-- ARGV: id, action (paused|running|stopped), retention_ms
local req = request()
if not req then
  return { 'missing' }
end
if FINISHED[req.status] then
  return { 'ended', req.status }
end
local action = ARGV[2]
if action == 'paused' then
  redis.call('HSET', KEYS[1], 'status', 'paused')
  return { 'ok', 'paused' }
elseif action == 'running' then
  if req.status ~= 'paused' then
    return { 'ok', req.status }
  end
  redis.call('HSET', KEYS[1], 'status', 'running')
  local held = redis.call('LRANGE', KEYS[5], 0, -1)
  for _, blob in ipairs(held) do
    redis.call('XADD', KEYS[8], '*', 't', blob)
  end
  redis.call('DEL', KEYS[5])
  return { 'ok', 'running' }
end
finish(req, 'stopped', tonumber(ARGV[3]), nil, nil)
return { 'ok', 'stopped' }

-- @script context_set
-- ARGV: id, key, value
if redis.call('EXISTS', KEYS[1]) == 0 then
  return 0
end
redis.call('HSET', KEYS[6], ARGV[2], ARGV[3])
local ttl = redis.call('PTTL', KEYS[1])
if ttl > 0 then
  redis.call('PEXPIRE', KEYS[6], ttl)
end
return 1

-- @script promote
-- Move due delayed tasks to the stream. KEYS[1] delayed, KEYS[2] tasks stream
-- ARGV: how many at most. Returns the number moved and the next due time (ms) or -1.
local t = math.floor(now() * 1000)
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', t, 'LIMIT', 0, tonumber(ARGV[1]))
for _, blob in ipairs(due) do
  redis.call('XADD', KEYS[2], '*', 't', blob)
end
chunked('ZREM', KEYS[1], due)
local nxt = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
return { #due, nxt[2] and (tonumber(nxt[2]) - t) or -1 }

-- @script keepalive
-- Reset the idle time of the tasks this consumer still holds, so that no one reclaims
-- them. KEYS[1] tasks stream; ARGV: group, consumer, receipts... Returns those still ours.
local mine = {}
for j = 3, #ARGV do
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[j], ARGV[j], 1)
  if p[1] and p[1][2] == ARGV[2] then
    mine[#mine + 1] = ARGV[j]
  end
end
if #mine > 0 then
  for first = 1, #mine, 500 do
    local args = {}
    for j = first, math.min(first + 499, #mine) do
      args[#args + 1] = mine[j]
    end
    args[#args + 1] = 'JUSTID'
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, unpack(args))
  end
end
return mine

-- @script handback
-- Put tasks this consumer holds back on the stream for others. KEYS[1] tasks stream;
-- ARGV: group, receipts...
local n = 0
for j = 2, #ARGV do
  local entry = redis.call('XRANGE', KEYS[1], ARGV[j], ARGV[j])
  if entry[1] then
    redis.call('XADD', KEYS[1], '*', 't', entry[1][2][2])
    n = n + 1
  end
  redis.call('XACK', KEYS[1], ARGV[1], ARGV[j])
  redis.call('XDEL', KEYS[1], ARGV[j])
end
return n

-- @script sweep
-- Drop expired requests from the listings. KEYS[1] expiries, KEYS[2] all requests index;
-- ARGV: prefix of the per-flow indexes, how many at most
local t = math.floor(now() * 1000)
local gone = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', t, 'LIMIT', 0, tonumber(ARGV[2]))
for _, member in ipairs(gone) do
  local sep = string.find(member, '\0', 1, true)
  local flow, id = string.sub(member, 1, sep - 1), string.sub(member, sep + 1)
  redis.call('ZREM', KEYS[2], id)
  redis.call('ZREM', ARGV[1] .. '{' .. flow .. '}', id)
end
chunked('ZREM', KEYS[1], gone)
return #gone

-- Prepended to every script: clock, number format, netstrings, chunked calls.
-- The key layout is documented in flowloom/backends/redis/keys.py.

local FINISHED = { completed = true, failed = true, stopped = true }
local HALTED = { failed = true, stopped = true } -- ended, but may be retried

-- the server's clock, read once per script: as a number, and as the text stored in the
-- hashes (seconds with six decimals, built from TIME's own digits: no float formatting)
local clock, stamp
local function now()
  if not clock then
    local t = redis.call('TIME')
    clock = tonumber(t[1]) + tonumber(t[2]) / 1000000
    stamp = t[1] .. '.' .. string.rep('0', 6 - #t[2]) .. t[2]
  end
  return clock
end

local function now_text()
  now()
  return stamp
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

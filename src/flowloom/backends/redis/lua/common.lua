-- Prepended to every script: clock, number format, netstrings, chunked calls.
-- The key layout is documented in flowloom/backends/redis/keys.py.

local FINISHED = { completed = true, failed = true, stopped = true }
local HALTED = { failed = true, stopped = true } -- ended, but may be retried

-- the server's clock, read once per script: as the text stored in the hashes (seconds
-- with six decimals, built from TIME's own digits: no float formatting), and as a number
-- only for the scripts that compute with it
local seconds, micros, clock, stamp
local function read_clock()
  if not seconds then
    local t = redis.call('TIME')
    seconds, micros = t[1], t[2]
  end
end

local function now()
  if not clock then
    read_clock()
    clock = tonumber(seconds) + tonumber(micros) / 1000000
  end
  return clock
end

local function now_text()
  if not stamp then
    read_clock()
    stamp = seconds .. '.' .. string.rep('0', 6 - #micros) .. micros
  end
  return stamp
end

-- "<length>:<s>"; a length under 100 written with string.char, not tostring (Lua formats
-- a number with sprintf("%.14g"): a hop's task blob has eight netstrings)
local char = string.char
local function ns(s)
  local n = #s
  if n < 10 then
    return char(48 + n) .. ':' .. s
  elseif n < 100 then
    local ones = n % 10
    return char(48 + (n - ones) / 10, 48 + ones) .. ':' .. s
  end
  return n .. ':' .. s
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

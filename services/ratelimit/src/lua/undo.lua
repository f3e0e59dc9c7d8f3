-- mesh rate limit: give back, exactly once, the hits one call wrote in one
-- slot group (see the protocol in src/store.rs). Safe to run any number of
-- times, and before the call's check script: it only ever acts on the
-- call's own records.
--
-- KEYS     n counter keys, then their n record keys (as for check.lua).
-- ARGV[1]  the call id.
-- ARGV[2]  record lifetime (ms): a record older than this is final, not
--          given back (check.lua drops it the same way).
-- ARGV[3]  now (ms since the epoch) for tests; "" takes the server's clock.
-- ARGV[4…] 3 values per descriptor: algorithm, period_ms, emission_ms
--          (token_bucket: ms per hit), and the hits the call asked for.
--
-- Per key: the call's record gone → nothing to do; present → remove it and
-- take the hits back from the window the record's time falls in (still
-- current or, for a sliding window, now the previous one), or for a token bucket move the
-- theoretical arrival time back by hits × emission. Where the call has no
-- record yet a tombstone `<id>:x` is left, so a check that arrives later
-- writes nothing. Returns the hits given back.
local now
if ARGV[3] ~= '' then
  now = tonumber(ARGV[3])
else
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
end
local SPAN = 4294967296
local WRAP = 1024
local id = ARGV[1]
local ttl = tonumber(ARGV[2])
local n = #KEYS / 2
local given = 0
for i = 1, n do
  local b = 3 + (i - 1) * 4
  local alg = tonumber(ARGV[b + 1])
  local period = tonumber(ARGV[b + 2])
  local emission = tonumber(ARGV[b + 3])
  local hits = tonumber(ARGV[b + 4])
  local r = KEYS[n + i]
  redis.call('ZREMRANGEBYSCORE', r, '-inf', now - ttl)
  local at = redis.call('ZSCORE', r, id)
  if at then
    redis.call('ZREM', r, id)
    given = given + hits
    at = tonumber(at)
    if alg == 3 then
      local tat = tonumber(redis.call('GET', KEYS[i]))
      if tat then
        redis.call('SET', KEYS[i], string.format('%.3f', tat - hits * emission), 'KEEPTTL')
      end
    elseif alg == 1 then
      -- tag * SPAN + count (check.lua): only the record's own window gives back.
      local v = tonumber(redis.call('GET', KEYS[i]) or '0')
      local sw = math.floor(v / SPAN)
      if sw == math.floor(at / period) % WRAP then
        local back = math.min(hits, v - sw * SPAN)
        if back > 0 then redis.call('DECRBY', KEYS[i], back) end
      end
    else
      local marker = math.floor(at / period)
      local h = redis.call('HMGET', KEYS[i], 'w', 'c', 'p')
      local w = tonumber(h[1])
      if w == marker then
        local c = tonumber(h[2]) or 0
        redis.call('HSET', KEYS[i], 'c', math.max(0, c - hits))
      elseif w == marker + 1 then
        local p = tonumber(h[3]) or 0
        redis.call('HSET', KEYS[i], 'p', math.max(0, p - hits))
      end
    end
  elseif not redis.call('ZSCORE', r, id .. ':x') then
    redis.call('ZADD', r, math.floor(now), id .. ':x')
    redis.call('PEXPIRE', r, ttl + 1000)
  end
end
return given

-- mesh rate limit: decide every descriptor of one slot group atomically.
--
-- KEYS     n counter keys (one per descriptor), then, when the call records
--          (ARGV[1] not empty), n record keys (`<counter>:r`, a sorted set
--          of call ids scored by the time they wrote). All in one hash slot;
--          nothing else is touched.
-- ARGV[1]  call id: record this call's hits so `undo.lua` can give back
--          exactly them, once ("" for a single-group call: nothing to undo).
-- ARGV[2]  record lifetime (ms): older records are dropped, their hits final.
-- ARGV[3]  now (ms since the epoch) for tests; "" takes the server's clock.
-- ARGV[4…] 6 values per descriptor: algorithm (1 fixed_window, 2
--          sliding_window, 3 token_bucket), limit, period_ms, burst, hits,
--          shadow (0/1).
--
-- Storage per algorithm: a fixed window is one integer, the window's tag
-- (its number mod WRAP) times SPAN plus its count, expiring a second after
-- the window ends; so a decision is GET, then INCRBY (or one SET … PX for
-- a window's first hit). A sliding window is a hash {w, c, p}; a token
-- bucket a string holding its theoretical arrival time.
--
-- Decides every descriptor first; writes only when every enforced (non-shadow)
-- descriptor fits, so a refused group consumes nothing. A shadow descriptor
-- that is over is reported but neither blocks nor consumes (as it would if
-- it were enforced). Time is the Redis server's, so every instance agrees.
-- A call whose give-back already ran (a tombstone `<id>:x` in a record key:
-- its reply was lost and the caller gave up) writes nothing.
--
-- Returns {applied, then 7 integers per descriptor: over, remaining,
-- reset_ms, retry_ms (-1: never, the hits exceed the capacity), retry1_ms
-- (until a single hit fits), and remaining and reset_ms without this call's
-- hits (what the call reports once they are given back)}.

-- A fixed-window counter: tag * SPAN + count. The count stays below SPAN (a
-- limit is a u32 and only hits that fit are written); WRAP tags tell a
-- window from its predecessor exactly (a key outlives its window by 1 s),
-- and the value stays far below 2^53, exact in Lua's numbers.
local SPAN = 4294967296
local WRAP = 1024

-- The helpers are top-level functions, not closures made per descriptor:
-- Lua allocates a closure each time one is created, on every call.

-- Token bucket (GCRA): ms until `h` hits fit (0 now, -1 never).
local function tb_wait(h, burst, tat, T, dvt, now)
  if h > burst then return -1 end
  local at = tat + h * T - dvt
  if at <= now + 0.001 then return 0 end
  return at - now
end

-- Fixed (alg 1) or sliding (alg 2) window: ms until `h` hits fit.
local function win_wait(h, alg, limit, period, est, c, prev, left)
  if h > limit then return -1 end
  if est + h <= limit + 1e-9 then return 0 end
  if c + h <= limit then
    -- The previous window's weight has to decay far enough.
    return left - (limit - c - h) * period / prev
  end
  -- Only the next window, where this window's count is the previous one.
  if alg == 1 then return left end
  local into = period - (limit - h) * period / c
  if into < 0 then into = 0 end
  return left + into
end

-- A sliding window is fully recovered once neither this window's count nor
-- the previous one's weighs any more (a fixed window: at its end, `left`).
local function sliding_reset(count, period, prev, left)
  if count > 0 then return left + period end
  if prev > 0 then return left end
  return 0
end

local now
if ARGV[3] ~= '' then
  now = tonumber(ARGV[3])
else
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
end
local id = ARGV[1]
local ttl = tonumber(ARGV[2])
local H = 3
local n = #KEYS
if id ~= '' then n = n / 2 end
local plans = {}
local all_fit = true
if id ~= '' then
  for i = 1, n do
    local r = KEYS[n + i]
    redis.call('ZREMRANGEBYSCORE', r, '-inf', now - ttl)
    if redis.call('ZSCORE', r, id .. ':x') or redis.call('ZSCORE', r, id) then
      all_fit = false
    end
  end
end

for i = 1, n do
  local b = H + (i - 1) * 6
  local alg = tonumber(ARGV[b + 1])
  local limit = tonumber(ARGV[b + 2])
  local period = tonumber(ARGV[b + 3])
  local burst = tonumber(ARGV[b + 4])
  local hits = tonumber(ARGV[b + 5])
  local shadow = ARGV[b + 6] == '1'
  local need = hits
  if need == 0 then need = 1 end
  local p = { alg = alg, hits = hits, shadow = shadow, period = period }

  if alg == 3 then
    local T = period / limit
    local dvt = T * burst
    local tat = tonumber(redis.call('GET', KEYS[i]) or '0')
    if tat < now then tat = now end
    p.wait = tb_wait(need, burst, tat, T, dvt, now)
    p.retry1 = tb_wait(1, burst, tat, T, dvt, now)
    p.new_tat = tat + hits * T
    p.rem_now = math.floor((dvt - (tat - now)) / T + 1e-9)
    p.reset_now = tat - now
    p.rem_after = math.floor((dvt - (p.new_tat - now)) / T + 1e-9)
    p.reset_after = p.new_tat - now
  elseif alg == 1 then
    local w = math.floor(now / period)
    local tag = w % WRAP
    local v = tonumber(redis.call('GET', KEYS[i]) or '0')
    local sw = math.floor(v / SPAN)
    local c = 0
    if sw == tag then c = v - sw * SPAN end
    local left = (w + 1) * period - now
    p.wait = win_wait(need, alg, limit, period, c, c, 0, left)
    p.retry1 = win_wait(1, alg, limit, period, c, c, 0, left)
    p.w, p.c, p.prev, p.tag = w, c, 0, tag
    p.rem_now = math.floor(limit - c + 1e-9)
    p.rem_after = math.floor(limit - c - hits + 1e-9)
    p.reset_now = left
    p.reset_after = left
  else
    local w = math.floor(now / period)
    local h = redis.call('HMGET', KEYS[i], 'w', 'c', 'p')
    local sw, c, prev = tonumber(h[1]), tonumber(h[2]) or 0, tonumber(h[3]) or 0
    if sw == nil then
      c, prev = 0, 0
    elseif sw == w - 1 then
      prev, c = c, 0
    elseif sw ~= w then
      c, prev = 0, 0
    end
    local left = (w + 1) * period - now
    local est = prev * left / period + c
    p.wait = win_wait(need, alg, limit, period, est, c, prev, left)
    p.retry1 = win_wait(1, alg, limit, period, est, c, prev, left)
    p.w, p.c, p.prev = w, c, prev
    p.rem_now = math.floor(limit - est + 1e-9)
    p.rem_after = math.floor(limit - est - hits + 1e-9)
    p.reset_now = sliding_reset(c, period, prev, left)
    p.reset_after = sliding_reset(c + hits, period, prev, left)
  end
  if p.wait ~= 0 and not shadow then all_fit = false end
  plans[i] = p
end

local out = { all_fit and 1 or 0 }
for i = 1, n do
  local p = plans[i]
  local applied = all_fit and p.wait == 0
  local remaining, reset = p.rem_now, p.reset_now
  if applied then remaining, reset = p.rem_after, p.reset_after end
  if remaining < 0 then remaining = 0 end
  if applied and p.hits > 0 then
    if p.alg == 3 then
      local px = math.ceil(p.new_tat - now) + 1000
      redis.call('SET', KEYS[i], string.format('%.3f', p.new_tat), 'PX', px)
    elseif p.alg == 1 then
      if p.c == 0 then
        -- The window's first hit (or the key held an older window).
        -- PX, not PXAT: relative to `now`, which tests may set.
        redis.call('SET', KEYS[i], string.format('%d', p.tag * SPAN + p.hits), 'PX',
          math.ceil((p.w + 1) * p.period - now) + 1000)
      else
        redis.call('INCRBY', KEYS[i], p.hits)
      end
    else
      redis.call('HSET', KEYS[i], 'w', p.w, 'c', p.c + p.hits, 'p', p.prev)
      -- A sliding window still needs this window's count during the next one.
      redis.call('PEXPIRE', KEYS[i], math.ceil((p.w * p.period + 2 * p.period) - now) + 1000)
    end
    if id ~= '' then
      redis.call('ZADD', KEYS[n + i], math.floor(now), id)
      redis.call('PEXPIRE', KEYS[n + i], ttl + 1000)
    end
  end
  local over = 0
  if p.wait ~= 0 then over = 1 end
  local retry = -1
  if p.wait >= 0 then retry = math.ceil(p.wait) end
  local retry1 = -1
  if p.retry1 >= 0 then retry1 = math.ceil(p.retry1) end
  out[#out + 1] = over
  out[#out + 1] = remaining
  out[#out + 1] = math.ceil(reset)
  out[#out + 1] = retry
  out[#out + 1] = retry1
  local before = p.rem_now
  if before < 0 then before = 0 end
  out[#out + 1] = before
  out[#out + 1] = math.ceil(p.reset_now)
end
return out

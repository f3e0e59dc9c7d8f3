-- mesh rate limit: give back hits a slot group consumed for a call that
-- another slot group refused (see the protocol in src/store.rs).
--
-- KEYS[i]  the descriptor keys the check script wrote.
-- ARGV     4 values per descriptor: algorithm, period_ms, hits, marker.
--          For windows the marker is the window the hits went into: they are
--          taken from it whether it is still current or has become the
--          previous one. For token_bucket it is the hits' emission time (ms)
--          to take back from the theoretical arrival time.
for i = 1, #KEYS do
  local b = (i - 1) * 4
  local alg = tonumber(ARGV[b + 1])
  local hits = tonumber(ARGV[b + 3])
  local marker = tonumber(ARGV[b + 4])
  if alg == 3 then
    local tat = tonumber(redis.call('GET', KEYS[i]))
    if tat then
      redis.call('SET', KEYS[i], string.format('%.3f', tat - marker), 'KEEPTTL')
    end
  else
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
end
return #KEYS

-- ValidateSession: KEYS[1] the token's pointer, then keys learnt before
-- (the session, the user's index). ARGV[3] touch (0/1), ARGV[4] touch
-- interval (ms). Reply: a session (common.lua `reply`) or {0}.
local now = now_ms()
local sid = redis.call('GET', KEYS[1])
if not sid or string.sub(sid, 1, 1) == '~' then return { 0 } end
want(skey(sid))
need()
local s = load(sid)
if not live(s, now) or tkey(s.t) ~= KEYS[1] then return { 0 } end
if ARGV[3] == '1' then
  local interval = math.min(tonumber(ARGV[4]), math.floor(s.d / 16))
  if now - s.l >= interval then
    local u = ukey(s.u)
    want(u)
    need()
    local t = redis.call('PEXPIRETIME', u)
    s.l = now
    s.ie = math.min(now + s.d, s.ae)
    local x = fmt(expiry(s))
    redis.call('HSET', key(skey(sid)), 'l', fmt(now), 'ie', fmt(s.ie))
    redis.call('PEXPIREAT', key(skey(sid)), x)
    redis.call('PEXPIREAT', KEYS[1], x)
    if t ~= -2 and t < expiry(s) then redis.call('PEXPIREAT', u, x) end
  end
end
return reply(s, now)

-- RefreshSession: KEYS[1] the current token's pointer, KEYS[2] the new
-- token's pointer, KEYS[3] the outbox, then keys learnt before (the session,
-- the user's index). ARGV[3] the current token's hash, ARGV[4] the new
-- token's hash, ARGV[5] how long (ms) the old pointer remembers the
-- rotation. Reply (after `done`'s count): the session, or {0}.
local now = now_ms()
local old, new = ARGV[3], ARGV[4]
local v = redis.call('GET', KEYS[1])
if not v then return done({ 0 }) end
if string.sub(v, 1, 1) == '~' then
  -- Rotated already. A retry of that very rotation (same new hash) gets the
  -- same answer; anyone else presenting the old token gets nothing.
  if string.sub(v, 2) ~= new then return done({ 0 }) end
  local sid = redis.call('GET', key(tkey(new)))
  if not sid then return done({ 0 }) end
  want(skey(sid))
  need()
  local s = load(sid)
  if live(s, now) and s.t == new then return done(reply(s, now)) end
  return done({ 0 })
end
want(skey(v))
need()
local s = load(v)
if not live(s, now) or s.t ~= old then return done({ 0 }) end
local u = ukey(s.u)
want(u)
need()
s.t = new
s.l = now
s.ie = math.min(now + s.d, s.ae)
local x = fmt(expiry(s))
redis.call('HSET', key(skey(s.sid)), 't', new, 'l', fmt(now), 'ie', fmt(s.ie))
redis.call('PEXPIREAT', key(skey(s.sid)), x)
redis.call('SET', key(tkey(new)), s.sid, 'PXAT', x)
redis.call('SET', KEYS[1], '~' .. new, 'PX', fmt(math.max(1, math.min(tonumber(ARGV[5]), expiry(s) - now))))
local t = redis.call('PEXPIRETIME', u)
if t ~= -2 and t < expiry(s) then redis.call('PEXPIREAT', u, x) end
table.insert(revoked, old)
audit(now, 'session.refresh', s, { p = old })
return done(reply(s, now))

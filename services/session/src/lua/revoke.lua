-- RevokeSession: KEYS[1] the session (ARGV[3] = 's') or the token's pointer
-- (ARGV[3] = 't'), KEYS[2] the fence. Reply (after `done`'s count): {1, revoked token hash} or {0}.
local now = now_ms()
fence(now)
local sid
if ARGV[3] == 't' then
  sid = redis.call('GET', KEYS[1])
  if not sid or string.sub(sid, 1, 1) == '~' then return done({ 0 }) end
else
  sid = string.sub(KEYS[1], #base + 3)
end
local s = load(sid)
if not live(s, now) or (ARGV[3] == 't' and tkey(s.t) ~= KEYS[1]) then return done({ 0 }) end
present(tkey(s.t), ukey(s.u), OUTBOX)
for _, sid in ipairs(redis.call('ZRANGE', ukey(s.u), 0, -1)) do present(skey(sid)) end
kill(s)
reindex(s.u, now)
audit(now, 'session.revoke', s, { m = ARGV[3] == 't' and 'token' or 'session_id' })
return done(with_revoked({ 1 }))

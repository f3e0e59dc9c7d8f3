-- RevokeSession: KEYS[1] the session (ARGV[3] = 's') or the token's pointer
-- (ARGV[3] = 't'), KEYS[2] the fence, KEYS[3] the outbox, then keys learnt
-- before (the session, its token's pointer, the user's index and sessions).
-- Reply (after `done`'s count): {1, revoked token hash} or {0}.
local now = now_ms()
local sid
if ARGV[3] == 't' then
  sid = redis.call('GET', KEYS[1])
  if sid and string.sub(sid, 1, 1) == '~' then sid = nil end
else
  sid = string.sub(KEYS[1], #base + 3)
end
local s
if sid then
  want(skey(sid))
  need()
  s = load(sid)
  if not live(s, now) or (ARGV[3] == 't' and tkey(s.t) ~= KEYS[1]) then s = nil end
end
if s then
  want(tkey(s.t))
  want(ukey(s.u))
  need()
  sessions_of(s.u, now)
end
fence(now)
if not s then return done({ 0 }) end
kill(s)
reindex(s.u, now)
audit(now, 'session.revoke', s, { m = ARGV[3] == 't' and 'token' or 'session_id' })
return done(with_revoked({ 1 }))

-- RevokeUserSessions: KEYS[1] the user's index, KEYS[2] the fence.
-- ARGV[3] user id, ARGV[4] a session id to keep, or ''. Reply (after
-- `done`'s count): {count, revoked token hashes...}.
local now = now_ms()
fence(now)
local n = 0
local sessions = reindex(ARGV[3], now)
present(OUTBOX)
for _, s in ipairs(sessions) do present(tkey(s.t)) end
for _, s in ipairs(sessions) do
  if s.sid ~= ARGV[4] then
    kill(s)
    audit(now, 'session.revoke_all', s, ARGV[4] ~= '' and { m = 'except_one' } or nil)
    n = n + 1
  end
end
reindex(ARGV[3], now)
return done(with_revoked({ n }))

-- RevokeUserSessions: KEYS[1] the user's index, KEYS[2] the fence, KEYS[3]
-- the outbox, then keys learnt before (the user's sessions and their token
-- pointers). ARGV[3] user id, ARGV[4] a session id to keep, or ''. Reply
-- (after `done`'s count): {count, revoked token hashes...}.
local now = now_ms()
local sessions = sessions_of(ARGV[3], now)
for _, s in ipairs(sessions) do
  if s.sid ~= ARGV[4] then want(tkey(s.t)) end
end
need()
fence(now)
local n = 0
for _, s in ipairs(sessions) do
  if s.sid ~= ARGV[4] then
    kill(s)
    audit(now, 'session.revoke_all', s, ARGV[4] ~= '' and { m = 'except_one' } or nil)
    n = n + 1
  end
end
reindex(ARGV[3], now)
return done(with_revoked({ n }))

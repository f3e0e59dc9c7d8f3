-- CreateSession: KEYS[1] the user's index, KEYS[2] the new session, KEYS[3]
-- its token's pointer, KEYS[4] the outbox, then keys learnt before (the
-- user's sessions, the pointers of those it evicts). ARGV[3] session id,
-- ARGV[4] token hash, ARGV[5] user id, ARGV[6] attributes, ARGV[7] ip,
-- ARGV[8] user agent, ARGV[9] idle timeout (ms), ARGV[10] absolute lifetime
-- (ms), ARGV[11] cap. Reply (after `done`'s count): the session, then the
-- token hashes of evicted sessions.
local now = now_ms()
local sid, th, uid = ARGV[3], ARGV[4], ARGV[5]
local existing = load(sid)
if existing then
  -- The id is new for every call: this is a retry of this very call.
  if existing.t == th then return done(reply(existing, now)) end
  return redis.error_reply('ERR session id collision')
end
local sessions = sessions_of(uid, now)
local excess = #sessions - tonumber(ARGV[11]) + 1
for n = 1, excess do want(tkey(sessions[n].t)) end
need()
for n = 1, excess do
  kill(sessions[n])
  audit(now, 'session.evict', sessions[n], { m = 'cap' })
end
local d = tonumber(ARGV[9])
local ae = now + tonumber(ARGV[10])
local s = { sid = sid, u = uid, t = th, a = ARGV[6], i = ARGV[7], g = ARGV[8], c = now, l = now, d = d,
            ie = math.min(now + d, ae), ae = ae }
local x = fmt(expiry(s))
redis.call('HSET', key(skey(sid)), 'u', uid, 't', th, 'a', s.a, 'i', s.i, 'g', s.g, 'c', fmt(now), 'l', fmt(now),
  'd', fmt(d), 'ie', fmt(s.ie), 'ae', fmt(ae))
redis.call('PEXPIREAT', key(skey(sid)), x)
redis.call('SET', key(tkey(th)), sid, 'PXAT', x)
redis.call('ZADD', KEYS[1], fmt(now), sid)
reindex(uid, now)
audit(now, 'session.create', s)
return done(with_revoked(reply(s, now)))

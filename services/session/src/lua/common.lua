-- Shared head of every session script (store.rs prepends it).
--
-- KEYS[1] routes the script to its bucket's slot; every key is built from
-- ARGV[1], the bucket's key base `<prefix>{session:<hint>}:`, and so is in
-- the same slot, and every key a script touches is in KEYS (`key` below).
-- ARGV[2] is the audit context (JSON) of scripts that record events, else
-- empty.
--
-- Keys of a bucket:
--   s:<sid>  hash    the session (fields below); expires with it
--   t:<hex>  string  token hash -> session id; `~<hex>` after a rotation
--                    (the old token is dead; only a retry of that very
--                    rotation recognises it); expires with the session
--   u:<uid>  zset    the user's session ids, scored by creation time;
--                    expires with the user's longest-lived session
--   o        stream  audit outbox: events written with the change they record
--   l        string  the outbox drain lease
--   x        stream  audit events the audit service refused for good
--   w        string  write fence: every revocation writes it (KEYS[2]), so
--                    the WAIT after it covers an earlier attempt's deletion
-- Channel `c` (sharded pub/sub): `r <nonce> <hex> ...` token hashes revoked
-- (every subscriber answers `a <nonce>` once its cache has dropped them),
-- `o` the outbox has events.
--
-- Session fields: u user id, t token hash, a attributes (JSON), i client ip,
-- g user agent, c created, l last seen, d idle timeout, ie idle expiry,
-- ae absolute expiry (times in ms since the epoch, Redis's clock).

local base = ARGV[1]
local OUTBOX = base .. 'o'
local CHANNEL = base .. 'c'

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function fmt(n)
  return string.format('%d', n)
end

local function skey(sid) return base .. 's:' .. sid end
local function tkey(th) return base .. 't:' .. th end
local function ukey(uid) return base .. 'u:' .. uid end

-- Every key a script touches is in KEYS, as Redis Cluster requires: a node
-- then refuses a script whose slot is moving, before it runs, whenever it
-- lacks one of its keys (`ASK`, `TRYAGAIN`), so a script never runs on part
-- of a bucket. Some keys are learnt only from data (a token's session, a
-- user's sessions): a script `want`s them, then `need` stops it, before its
-- first write and before it touches any of them, with the error
-- `NEEDKEYS <JSON array of keys>`; store.rs sends it again with those keys
-- added to KEYS. `key` guards every access.
local declared, wanted, asked = {}, {}, {}
for _, k in ipairs(KEYS) do declared[k] = true end

local function key(k)
  if not declared[k] then error({ err = 'ERR session script touched an undeclared key' }) end
  return k
end

local function want(k)
  if not declared[k] and not asked[k] then
    asked[k] = true
    table.insert(wanted, k)
  end
end

local function need()
  if #wanted > 0 then error({ err = 'NEEDKEYS ' .. cjson.encode(wanted) }) end
end

local function load(sid)
  local v = redis.call('HMGET', key(skey(sid)), 'u', 't', 'a', 'i', 'g', 'c', 'l', 'd', 'ie', 'ae')
  if not v[1] then return nil end
  return { sid = sid, u = v[1], t = v[2], a = v[3], i = v[4], g = v[5], c = tonumber(v[6]),
           l = tonumber(v[7]), d = tonumber(v[8]), ie = tonumber(v[9]), ae = tonumber(v[10]) }
end

local function expiry(s) return math.min(s.ie, s.ae) end
local function live(s, now) return s ~= nil and now < s.ie and now < s.ae end

local function reply(s, now)
  return { 1, s.sid, s.u, s.a, s.i, s.g, fmt(s.c), fmt(s.l), fmt(s.ie), fmt(s.ae), fmt(now), fmt(s.d), s.t }
end

-- A user's sessions (reads only): the live ones, oldest first, and the ids
-- of members whose session is gone. Wants every member's session.
local function sessions_of(uid, now)
  local ids = redis.call('ZRANGE', key(ukey(uid)), 0, -1)
  for _, sid in ipairs(ids) do want(skey(sid)) end
  need()
  local out, dead = {}, {}
  for _, sid in ipairs(ids) do
    local s = load(sid)
    if live(s, now) then table.insert(out, s) else table.insert(dead, sid) end
  end
  return out, dead
end

-- Drops the index's dead members and keeps the index key alive exactly as
-- long as the user's longest-lived session. Returns the live sessions,
-- oldest first.
local function reindex(uid, now)
  local k = key(ukey(uid))
  local out, dead = sessions_of(uid, now)
  local last = 0
  for _, sid in ipairs(dead) do redis.call('ZREM', k, sid) end
  for _, s in ipairs(out) do
    if expiry(s) > last then last = expiry(s) end
  end
  if last == 0 then redis.call('DEL', k) else redis.call('PEXPIREAT', k, fmt(last)) end
  return out
end

-- Audit events go into the outbox in the same atomic step as the change.
local ctx = (ARGV[2] ~= nil and ARGV[2] ~= '') and cjson.decode(ARGV[2]) or {}
local events, revoked = 0, {}

local function audit(now, action, s, extra)
  events = events + 1
  local e = { k = ctx.k .. ':' .. events, a = action, s = s.sid, u = s.u, t = s.t, at = fmt(now),
              r = ctx.r, tr = ctx.tr, ip = ctx.ip, ua = ctx.ua }
  if extra then for k, v in pairs(extra) do e[k] = v end end
  redis.call('XADD', key(OUTBOX), '*', 'e', cjson.encode(e))
end

-- Revocations write the fence (KEYS[2]) whatever they find, before their
-- other writes (store.rs, Durability).
local function fence(now)
  redis.call('SET', KEYS[2], fmt(now), 'PX', 60000)
end

-- Ends a session: its keys go, its token is announced as revoked.
local function kill(s)
  redis.call('DEL', key(skey(s.sid)), key(tkey(s.t)))
  table.insert(revoked, s.t)
end

-- Publishes what changed, keeps the outbox alive, and puts in front of a
-- change's reply how many subscribers received the revocations (the
-- acknowledgements to wait for). Every change returns through it.
local function done(r)
  local receivers = 0
  if events > 0 then redis.call('PEXPIRE', key(OUTBOX), ctx.ttl) end
  if #revoked > 0 then
    receivers = redis.call('SPUBLISH', CHANNEL, 'r ' .. ctx.n .. ' ' .. table.concat(revoked, ' '))
  end
  if events > 0 then redis.call('SPUBLISH', CHANNEL, 'o') end
  table.insert(r, 1, receivers)
  return r
end

-- The hashes revoked, as the tail of a reply.
local function with_revoked(r)
  for _, h in ipairs(revoked) do table.insert(r, h) end
  return r
end

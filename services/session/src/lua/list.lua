-- ListUserSessions: KEYS[1] the user's index, then its sessions learnt
-- before. ARGV[3] user id. Reads only. Reply: the live sessions, newest
-- first, each a `reply`.
local now = now_ms()
local sessions = sessions_of(ARGV[3], now)
local out = {}
for n = #sessions, 1, -1 do table.insert(out, reply(sessions[n], now)) end
return out

-- A fixed-window decision of limitador-server's shape, for lua-ab.sh: INCRBY,
-- and an expiry on a counter's first hit; no clock, no read, no give-back.
-- Takes check.lua's KEYS and ARGV (one descriptor: ARGV[6] its period in ms,
-- ARGV[8] its hits) so the two run under the same redis-benchmark command.
-- Written for the comparison in results/peer.md; not limitador's code.
local hits = tonumber(ARGV[8])
local c = redis.call('INCRBY', KEYS[1], hits)
if c == hits then redis.call('PEXPIRE', KEYS[1], ARGV[6]) end
return c

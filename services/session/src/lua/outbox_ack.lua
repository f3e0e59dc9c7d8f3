-- Ends a drain: KEYS[1] the outbox, KEYS[2] the lease, KEYS[3] the
-- dead-letter stream. ARGV[1] the drainer, ARGV[2] how many of the ids that
-- follow were refused for good (moved to KEYS[3], first), ARGV[3] the
-- dead-letter TTL (ms), then ids. Delivered events are deleted even if the
-- lease was lost meanwhile: they are delivered. Reply: events left.
local dead = tonumber(ARGV[2])
for n = 4, #ARGV do
  if n < 4 + dead then
    local e = redis.call('XRANGE', KEYS[1], ARGV[n], ARGV[n])
    if e[1] then
      redis.call('XADD', KEYS[3], '*', 'e', e[1][2][2])
      redis.call('PEXPIRE', KEYS[3], ARGV[3])
    end
  end
  redis.call('XDEL', KEYS[1], ARGV[n])
end
local left = redis.call('XLEN', KEYS[1])
if left == 0 then redis.call('DEL', KEYS[1]) end
if redis.call('GET', KEYS[2]) == ARGV[1] then redis.call('DEL', KEYS[2]) end
return left

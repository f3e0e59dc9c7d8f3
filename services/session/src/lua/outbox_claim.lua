-- Claims a bucket's outbox for one drain: KEYS[1] the outbox, KEYS[2] the
-- lease. ARGV[1] the drainer, ARGV[2] lease (ms), ARGV[3] most events.
-- Reply: {0} another drainer holds it, else {1, id, event, id, event, ...}.
local holder = redis.call('GET', KEYS[2])
if holder and holder ~= ARGV[1] then return { 0 } end
local out = { 1 }
for _, e in ipairs(redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', ARGV[3])) do
  table.insert(out, e[1])
  table.insert(out, e[2][2])
end
if #out > 1 then
  redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
elseif holder then
  redis.call('DEL', KEYS[2])
end
return out

-- Outbox depth and its oldest event's id: KEYS[1] the outbox.
local first = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', 1)
return { redis.call('XLEN', KEYS[1]), first[1] and first[1][1] or '' }

-- Moves one lease from active to expired if its time has come. Returns 1
-- exactly once per lease, however many replicas reap at the same time.
-- A revoked lease still in the index was left there by end_task, which
-- counted it in KEYS[3]; dropping it uncounts it.
-- KEYS: 1 lease hash, 2 expiry index, 3 count of revoked leases left in
--       the expiry index
-- ARGV: 1 index member, 2 now ms
local s = redis.call('HMGET', KEYS[1], 'state', 'exp')
if s[1] == 'active' then
  if tonumber(s[2]) > tonumber(ARGV[2]) then return 0 end
  redis.call('HSET', KEYS[1], 'state', 'expired')
  redis.call('ZREM', KEYS[2], ARGV[1])
  return 1
end
if redis.call('ZREM', KEYS[2], ARGV[1]) == 1 and s[1] == 'revoked' then
  redis.call('DECR', KEYS[3])
end
return 0

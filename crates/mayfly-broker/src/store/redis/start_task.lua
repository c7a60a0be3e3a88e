-- KEYS: 1 task hash, 2 task-lease hash, 3 task's lease set, 4 all leases,
--       5 all tasks, 6 agent's tasks, 7 agent's leases, 8 expiry index,
--       9 purge index
-- ARGV: 1 task id, 2 task JSON, 3 task-lease JSON, 4 agent, 5 expires ms,
--       6 keep-until ms, 7 index member "lease:task:agent"
if redis.call('EXISTS', KEYS[1]) == 1 then return 'DUPLICATE' end
redis.call('HSET', KEYS[1], 'body', ARGV[2], 'agent', ARGV[4], 'exp', ARGV[5], 'rev', '0')
redis.call('HSET', KEYS[2], 'body', ARGV[3], 'state', 'active', 'exp', ARGV[5],
  'kind', 'task', 'agent', ARGV[4])
redis.call('ZADD', KEYS[3], 0, ARGV[1])
for i = 1, 3 do redis.call('PEXPIREAT', KEYS[i], ARGV[6]) end
redis.call('ZADD', KEYS[4], 0, ARGV[7])
redis.call('ZADD', KEYS[5], 0, ARGV[1] .. ':' .. ARGV[4])
redis.call('ZADD', KEYS[6], 0, ARGV[1])
redis.call('ZADD', KEYS[7], 0, ARGV[7])
redis.call('ZADD', KEYS[8], ARGV[5], ARGV[7])
redis.call('ZADD', KEYS[9], ARGV[5], ARGV[7])
return 'OK'

-- Records a credential lease only under a live task of the same agent.
-- KEYS: 1 task hash, 2 task-lease hash, 3 task's lease set, 4 new lease hash,
--       5 all leases, 6 expiry index
-- ARGV: 1 lease id, 2 agent, 3 now ms, 4 expires ms, 5 keep-until ms,
--       6 lease JSON, 7 kind, 8 index member, 9 certificate serial or "",
--       10 the task revision the decision saw
-- The lease is found by id through the all-leases index, by agent through
-- the agent's tasks, and is purged with its task (it never outlives it).
local t = redis.call('HMGET', KEYS[1], 'agent', 'exp', 'rev')
if not t[1] or t[1] ~= ARGV[2] then return 'NOTFOUND' end
local state = task_state(KEYS[2], ARGV[3])
if state ~= 'active' then return 'STATE:' .. state end
if tonumber(ARGV[4]) > tonumber(t[2]) then return 'OUTLIVES' end
if (t[3] or '0') ~= ARGV[10] then return 'CHANGED' end
if redis.call('EXISTS', KEYS[4]) == 1 then return 'DUPLICATE' end
if ARGV[9] ~= '' then
  redis.call('HSET', KEYS[4], 'body', ARGV[6], 'state', 'active', 'exp', ARGV[4],
    'kind', ARGV[7], 'agent', ARGV[2], 'serial', ARGV[9])
else
  redis.call('HSET', KEYS[4], 'body', ARGV[6], 'state', 'active', 'exp', ARGV[4],
    'kind', ARGV[7], 'agent', ARGV[2])
end
redis.call('PEXPIREAT', KEYS[4], ARGV[5])
redis.call('ZADD', KEYS[3], 0, ARGV[1])
redis.call('ZADD', KEYS[5], 0, ARGV[8])
redis.call('ZADD', KEYS[6], ARGV[4], ARGV[8])
return 'OK'

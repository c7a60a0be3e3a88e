-- KEYS: 1 task hash, 2 task-lease hash, 3 task's lease set, 4 lease index,
--       5 all tasks, 6 agent's tasks, 7 expiry index, 8 purge index,
--       9 parent task hash, 10 parent task-lease hash, 11 parent's children
--       set (9-11: the task's own keys when not delegated), 12 the agent's
--       lock
-- ARGV: 1 task id, 2 task JSON, 3 task-lease JSON, 4 agent, 5 expires ms,
--       6 keep-until ms, 7 index member "lease:task:agent", 8 parent id or
--       "", 9 the parent's owner, 10 now ms, 11 retention ms
if redis.call('EXISTS', KEYS[1]) == 1 then return 'DUPLICATE' end
if locked(KEYS[12], ARGV[10]) then return 'LOCKED' end
if ARGV[8] ~= '' then
  -- A delegated task: only under a live parent of the delegator that
  -- outlives it; it is then ended with the parent.
  local owner = redis.call('HGET', KEYS[9], 'agent')
  if not owner or owner ~= ARGV[9] then return 'NOTFOUND' end
  local state = task_state(KEYS[10], ARGV[10])
  if state ~= 'active' then return 'STATE:' .. state end
  local parent_exp = redis.call('HGET', KEYS[9], 'exp')
  if tonumber(ARGV[5]) > tonumber(parent_exp) then return 'OUTLIVES' end
  redis.call('ZADD', KEYS[11], 0, ARGV[1])
  redis.call('PEXPIREAT', KEYS[11], tonumber(parent_exp) + tonumber(ARGV[11]))
end
redis.call('HSET', KEYS[1], 'body', ARGV[2], 'agent', ARGV[4], 'exp', ARGV[5], 'rev', '0')
redis.call('HSET', KEYS[2], 'body', ARGV[3], 'state', 'active', 'exp', ARGV[5],
  'kind', 'task', 'agent', ARGV[4])
redis.call('ZADD', KEYS[3], 0, ARGV[1])
-- The lease set has no Redis TTL: purge finds the task's credentials
-- through it (and deletes it), however late the reaper runs.
for i = 1, 2 do redis.call('PEXPIREAT', KEYS[i], ARGV[6]) end
redis.call('HSET', KEYS[4], ARGV[1], ARGV[1])
redis.call('ZADD', KEYS[5], 0, ARGV[1] .. ':' .. ARGV[4])
redis.call('ZADD', KEYS[6], 0, ARGV[1])
redis.call('ZADD', KEYS[7], ARGV[5], ARGV[7])
-- The task is purged after retention, and its credentials with it.
redis.call('ZADD', KEYS[8], ARGV[5], ARGV[7])
return 'OK'

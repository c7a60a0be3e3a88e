-- Records a credential lease only under a live task of the same agent.
-- KEYS: 1 task hash, 2 task-lease hash, 3 task's lease set, 4 new lease hash,
--       5 lease index (id -> task), 6 expiry index, 7 the agent's lock
-- ARGV: 1 lease id, 2 agent, 3 now ms, 4 expires ms, 5 keep-until ms,
--       6 lease JSON, 7 kind, 8 index member, 9 certificate serial or "",
--       10 the task revision the decision saw, 11 task id
local status = issue_check(KEYS[1], KEYS[2], KEYS[4], KEYS[7], ARGV[2], ARGV[3], ARGV[4],
  ARGV[10])
if status ~= 'OK' then return status end
issue_write(KEYS[4], KEYS[3], KEYS[5], KEYS[6], ARGV[1], ARGV[11], ARGV[2], ARGV[4], ARGV[5],
  ARGV[6], ARGV[7], ARGV[8], ARGV[9])
return 'OK'

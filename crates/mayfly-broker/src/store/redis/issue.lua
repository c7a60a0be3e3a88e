-- Records a credential lease only under a live task of the same agent.
-- KEYS: 1 lease index (id -> task), 2 expiry index, then the lease's:
--       3 task hash, 4 task-lease hash, 5 task's lease set, 6 new lease hash,
--       7 the agent's lock, 8 the holder's lock, 9 the holder's actor index
-- ARGV: 1 lease id, 2 agent, 3 now ms, 4 expires ms, 5 keep-until ms,
--       6 lease JSON, 7 kind, 8 index member, 9 revocation-list entry (a
--       certificate's serial, a token's status index) or "", 10 the task revision the decision saw, 11 task id, 12 holder
if not writable(KEYS[9], 'zset') then return 'BROKEN' end
local status = issue_check(KEYS[3], KEYS[4], KEYS[6], KEYS[7], KEYS[8], ARGV[2], ARGV[3],
  ARGV[4], ARGV[10])
if status ~= 'OK' then return status end
issue_write(KEYS[6], KEYS[5], KEYS[1], KEYS[2], KEYS[9], ARGV[1], ARGV[11], ARGV[2], ARGV[12],
  ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7], ARGV[8], ARGV[9])
return 'OK'

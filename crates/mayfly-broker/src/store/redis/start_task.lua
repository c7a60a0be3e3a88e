-- Records a new task and its task lease (task_check, task_write).
-- KEYS: 1 task hash, 2 task-lease hash, 3 task's lease set, 4 lease index,
--       5 all tasks, 6 agent's tasks, 7 expiry index, 8 purge index,
--       9 parent task hash, 10 parent task-lease hash, 11 parent's children
--       set (9-11: the task's own keys when not delegated), 12 the agent's
--       lock
-- ARGV: 1 task id, 2 task JSON, 3 task-lease JSON, 4 agent, 5 expires ms,
--       6 keep-until ms, 7 index member "lease:task:agent", 8 parent id or
--       "", 9 the parent's owner, 10 now ms, 11 retention ms
local status = task_check(KEYS, ARGV)
if status ~= 'OK' then return status end
task_write(KEYS, ARGV)
return 'OK'

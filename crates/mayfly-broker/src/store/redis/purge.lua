-- Removes a lease past its retention window from every index; a task lease
-- takes the task's records with it.
-- KEYS: 1 lease hash, 2 task's lease set, 3 all leases, 4 agent's leases,
--       5 expiry index, 6 purge index, 7 task hash, 8 all tasks,
--       9 agent's tasks
-- ARGV: 1 index member, 2 lease id, 3 task id, 4 agent
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[2])
for i = 3, 6 do redis.call('ZREM', KEYS[i], ARGV[1]) end
if ARGV[2] == ARGV[3] then
  redis.call('DEL', KEYS[7], KEYS[2])
  redis.call('ZREM', KEYS[8], ARGV[3] .. ':' .. ARGV[4])
  redis.call('ZREM', KEYS[9], ARGV[3])
end
return 1

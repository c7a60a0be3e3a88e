-- Removes a task past its retention window from every index, with the
-- leases recorded under it (none outlives it), at most ARGV[6] leases per
-- call: returns 1 once the task is gone, 0 while leases remain (the task
-- stays due and the next pass goes on). A purge entry that names a
-- credential lease (written by an earlier layout) removes just that lease.
-- KEYS: 1 lease hash, 2 task's lease set, 3 lease index (id -> task),
--       4 expiry index, 5 purge index, 6 task hash, 7 all tasks, 8 agent's
--       tasks, 9 and 10 the all-leases and agent's-leases indexes of an
--       earlier layout, emptied here, 11 count of revoked leases left in
--       the expiry index (see expire.lua)
-- ARGV: 1 index member, 2 lease id, 3 task id, 4 agent, 5 key prefix,
--       6 most leases per call
local function unindex(id, member)
  redis.call('HDEL', KEYS[3], id)
  local key = ARGV[5] .. ':{' .. ARGV[3] .. '}:lease:' .. id
  if redis.call('ZREM', KEYS[4], member) == 1
      and redis.call('HGET', key, 'state') == 'revoked' then
    redis.call('DECR', KEYS[11])
  end
  redis.call('ZREM', KEYS[9], member)
  redis.call('ZREM', KEYS[10], member)
end
if ARGV[2] ~= ARGV[3] then
  unindex(ARGV[2], ARGV[1])
  redis.call('DEL', KEYS[1])
  redis.call('ZREM', KEYS[2], ARGV[2])
  redis.call('ZREM', KEYS[5], ARGV[1])
  return 1
end
local prefix = ARGV[5] .. ':{' .. ARGV[3] .. '}:lease:'
local ids = redis.call('ZRANGE', KEYS[2], 0, tonumber(ARGV[6]) - 1)
for _, id in ipairs(ids) do
  -- The task's own lease hash goes last, with the task: until then the
  -- task reads as it was.
  unindex(id, id .. ':' .. ARGV[3] .. ':' .. ARGV[4])
  if id ~= ARGV[3] then redis.call('DEL', prefix .. id) end
  redis.call('ZREM', KEYS[2], id)
end
if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
redis.call('DEL', KEYS[1], KEYS[6])
redis.call('ZREM', KEYS[5], ARGV[1])
redis.call('ZREM', KEYS[7], ARGV[3] .. ':' .. ARGV[4])
redis.call('ZREM', KEYS[8], ARGV[3])
return 1

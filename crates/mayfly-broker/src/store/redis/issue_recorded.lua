-- Records credential leases together with a batch of audit records, in one
-- step: either every lease passes issue_check, the trail's head is the one
-- the batch was chained onto and every key has the type it must have, and
-- all of it is written; or nothing is.
-- KEYS: 1 audit stream, 2 audit head, 3 lease index (id -> task), 4 expiry
--       index, then 7 per lease: task hash, task-lease hash, task's lease
--       set, lease hash, the agent's lock, the holder's lock, the holder's
--       actor index
-- ARGV: 1 expected head seq, 2 expected head hash, 3 new seq, 4 new hash,
--       5 number of lines N, 6..5+N the lines, then 12 per lease: id, agent,
--       now ms, expires ms, keep-until ms, lease JSON, kind, index member,
--       certificate serial or "", the task revision the decision saw, task
--       id, holder
-- Returns {'OK'}; {'STALE', seq, hash} when another replica moved the head;
-- {'REFUSED', i, status, ...} naming every lease (from 1) that may not be
-- recorded, and why; or {'BROKEN', key} when a key has the wrong type.
local h = redis.call('HMGET', KEYS[2], 'seq', 'hash')
local seq = h[1] or '0'
local hash = h[2] or string.rep('0', 64)
if seq ~= ARGV[1] or hash ~= ARGV[2] then return {'STALE', seq, hash} end
for i, want in ipairs({'stream', 'hash', 'hash', 'zset'}) do
  if not writable(KEYS[i], want) then return {'BROKEN', KEYS[i]} end
end
local lines = tonumber(ARGV[5])
local leases = (#KEYS - 4) / 7
local refused = {'REFUSED'}
for i = 0, leases - 1 do
  local k, a = 4 + 7 * i, 5 + lines + 12 * i
  for _, j in ipairs({3, 7}) do
    if not writable(KEYS[k + j], 'zset') then return {'BROKEN', KEYS[k + j]} end
  end
  local status = issue_check(KEYS[k + 1], KEYS[k + 2], KEYS[k + 4], KEYS[k + 5], KEYS[k + 6],
    ARGV[a + 2], ARGV[a + 3], ARGV[a + 4], ARGV[a + 10])
  if status ~= 'OK' then
    refused[#refused + 1] = tostring(i + 1)
    refused[#refused + 1] = status
  end
end
if #refused > 1 then return refused end
for i = 0, leases - 1 do
  local k, a = 4 + 7 * i, 5 + lines + 12 * i
  issue_write(KEYS[k + 4], KEYS[k + 3], KEYS[3], KEYS[4], KEYS[k + 7], ARGV[a + 1],
    ARGV[a + 11], ARGV[a + 2], ARGV[a + 12], ARGV[a + 3], ARGV[a + 4], ARGV[a + 5], ARGV[a + 6],
    ARGV[a + 7], ARGV[a + 8], ARGV[a + 9])
end
for i = 6, 5 + lines do redis.call('XADD', KEYS[1], '*', 'r', ARGV[i]) end
redis.call('HSET', KEYS[2], 'seq', ARGV[3], 'hash', ARGV[4])
return {'OK'}

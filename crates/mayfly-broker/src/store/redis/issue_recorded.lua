-- Records leases (credentials' and new tasks') together with a batch of
-- audit records, in one step: either every lease passes its check
-- (issue_check, task_check), the trail's head is the one the batch was
-- chained onto and every key has the type it must have, and all of it is
-- written; or nothing is.
-- KEYS: 1 audit stream, 2 audit head, 3 lease index (id -> task), 4 expiry
--       index, then per lease: for a credential, 7 keys (task hash,
--       task-lease hash, task's lease set, lease hash, the agent's lock, the
--       holder's lock, the holder's actor index); for a task, start_task.lua's
--       12
-- ARGV: 1 expected head seq, 2 expected head hash, 3 new seq, 4 new hash,
--       5 number of lines N, 6..5+N the lines, then per lease its kind, 'L'
--       (a credential) or 'T' (a task), and its arguments: for a credential,
--       12 (id, agent, now ms, expires ms, keep-until ms, lease JSON, kind,
--       index member, revocation-list entry (a certificate's serial, a
--       token's status index) or "", the task revision the decision saw,
--       task id, holder); for a task, start_task.lua's 11
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
-- Each lease: its kind, and where its keys and arguments start (before the
-- first).
local leases = {}
local k, a = 4, 6 + lines
while a <= #ARGV do
  local kind = ARGV[a]
  leases[#leases + 1] = {kind, k, a}
  if kind == 'L' then k, a = k + 7, a + 13 else k, a = k + 12, a + 12 end
end
local refused = {'REFUSED'}
for i, l in ipairs(leases) do
  local kind, k, a = l[1], l[2], l[3]
  local status
  if kind == 'L' then
    for _, j in ipairs({3, 7}) do
      if not writable(KEYS[k + j], 'zset') then return {'BROKEN', KEYS[k + j]} end
    end
    status = issue_check(KEYS[k + 1], KEYS[k + 2], KEYS[k + 4], KEYS[k + 5], KEYS[k + 6],
      ARGV[a + 2], ARGV[a + 3], ARGV[a + 4], ARGV[a + 10])
  else
    for _, j in ipairs({3, 5, 6, 8, 11}) do
      if not writable(KEYS[k + j], 'zset') then return {'BROKEN', KEYS[k + j]} end
    end
    status = task_check({unpack(KEYS, k + 1, k + 12)}, {unpack(ARGV, a + 1, a + 11)})
  end
  if status ~= 'OK' then
    refused[#refused + 1] = tostring(i)
    refused[#refused + 1] = status
  end
end
if #refused > 1 then return refused end
for _, l in ipairs(leases) do
  local kind, k, a = l[1], l[2], l[3]
  if kind == 'L' then
    issue_write(KEYS[k + 4], KEYS[k + 3], KEYS[3], KEYS[4], KEYS[k + 7], ARGV[a + 1],
      ARGV[a + 11], ARGV[a + 2], ARGV[a + 12], ARGV[a + 3], ARGV[a + 4], ARGV[a + 5],
      ARGV[a + 6], ARGV[a + 7], ARGV[a + 8], ARGV[a + 9])
  else
    task_write({unpack(KEYS, k + 1, k + 12)}, {unpack(ARGV, a + 1, a + 11)})
  end
end
for i = 6, 5 + lines do redis.call('XADD', KEYS[1], '*', 'r', ARGV[i]) end
redis.call('HSET', KEYS[2], 'seq', ARGV[3], 'hash', ARGV[4])
return {'OK'}

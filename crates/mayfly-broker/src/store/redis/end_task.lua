-- Ends an active task: its lease, every active lease under it, and every
-- active task delegated from it (to any depth, as parent_revoked), at once.
-- KEYS: 1 task hash, 2 task-lease hash, 3 task's lease set, 4 expiry index,
--       5 revocation stream, 6 count of revoked leases left in the expiry
--       index
-- ARGV: 1 task id, 2 now ms, 3 task revocation JSON, 4 task reason,
--       5 child revocation JSON, 6 child reason, 7 key prefix,
--       8 descendant revocation JSON (reason parent_revoked)
-- Returns {'OK', revoked ids...} (task first) or {error}.
-- Keys of descendants are built from the prefix (as in every index key).
if redis.call('EXISTS', KEYS[1]) == 0 then return {'NOTFOUND'} end
local state = task_state(KEYS[2], ARGV[2])
if state ~= 'active' then return {'STATE:' .. state} end
local P = ARGV[7]
local out = {'OK'}

local function task_key(t, suffix) return P .. ':{' .. t .. '}:' .. suffix end

local now = tonumber(ARGV[2])
-- Credentials revoked here stay in the expiry index (removing each from a
-- big index is a third of the cost of ending a big task); the reaper drops
-- them when they come due, and KEYS[6] counts them meanwhile so the
-- active count stays exact.
local left = 0

local function end_one(t, rev, reason, child_rev, child_reason)
  revoke(task_key(t, 'lease:' .. t), t, t, rev, reason, KEYS[4], KEYS[5])
  out[#out + 1] = t
  for _, id in ipairs(redis.call('ZRANGE', task_key(t, 'leases'), 0, -1)) do
    if id ~= t then
      -- Read once: whether it is active, and what its feed event says.
      local key = task_key(t, 'lease:' .. id)
      local f = redis.call('HMGET', key, 'state', 'exp', 'kind', 'serial')
      if f[1] == 'active' and tonumber(f[2]) > now then
        mark_revoked(key, id, t, child_rev, child_reason, f[3], f[2], f[4], KEYS[5])
        left = left + 1
        out[#out + 1] = id
      end
    end
  end
  for _, child in ipairs(redis.call('ZRANGE', task_key(t, 'children'), 0, -1)) do
    if task_state(task_key(child, 'lease:' .. child), ARGV[2]) == 'active' then
      end_one(child, ARGV[8], 'parent_revoked', ARGV[8], 'parent_revoked')
    end
  end
end

end_one(ARGV[1], ARGV[3], ARGV[4], ARGV[5], ARGV[6])
if left > 0 then redis.call('INCRBY', KEYS[6], left) end
return out

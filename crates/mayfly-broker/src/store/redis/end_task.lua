-- Ends an active task: its lease and every active lease under it, at once.
-- KEYS: 1 task hash, 2 task-lease hash, 3 task's lease set, 4 expiry index,
--       5 revocation stream
-- ARGV: 1 task id, 2 now ms, 3 task revocation JSON, 4 task reason,
--       5 child revocation JSON, 6 child reason, 7 lease key prefix
-- Returns {'OK', revoked ids...} (task first) or {error}.
if redis.call('EXISTS', KEYS[1]) == 0 then return {'NOTFOUND'} end
local state = task_state(KEYS[2], ARGV[2])
if state ~= 'active' then return {'STATE:' .. state} end
local out = {'OK', ARGV[1]}
revoke(KEYS[2], ARGV[1], ARGV[1], ARGV[3], ARGV[4], KEYS[4], KEYS[5])
for _, id in ipairs(redis.call('ZRANGE', KEYS[3], 0, -1)) do
  if id ~= ARGV[1] then
    -- Same hash tag as the task: the same slot.
    local key = ARGV[7] .. id
    if is_active(key, ARGV[2]) then
      revoke(key, id, ARGV[1], ARGV[5], ARGV[6], KEYS[4], KEYS[5])
      out[#out + 1] = id
    end
  end
end
return out

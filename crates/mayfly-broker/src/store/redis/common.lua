-- Shared by every script (prepended by the broker). Keys of one task share
-- the hash tag {task_id}; lease hashes hold: body (the lease JSON as issued),
-- state (active|revoked|expired), reason, rev (revocation JSON), exp (ms),
-- kind, agent, serial (certificates).

-- The state of a task at `now`, from its task lease: active, completed,
-- revoked, expired, or missing.
local function task_state(tlease_key, now)
  local s = redis.call('HMGET', tlease_key, 'state', 'reason', 'exp')
  if not s[1] then return 'missing' end
  if s[1] == 'active' then
    if tonumber(now) >= tonumber(s[3]) then return 'expired' end
    return 'active'
  end
  if s[1] == 'revoked' and s[2] == 'task_completed' then return 'completed' end
  return s[1]
end

-- Revokes one active lease and appends its feed event.
local function revoke(key, lease_id, task_id, rev, reason, expiry_key, stream_key)
  local f = redis.call('HMGET', key, 'kind', 'exp', 'agent', 'serial')
  redis.call('HSET', key, 'state', 'revoked', 'reason', reason, 'rev', rev)
  redis.call('ZREM', expiry_key, lease_id .. ':' .. task_id .. ':' .. f[3])
  redis.call('XADD', stream_key, '*', 'lease', lease_id, 'kind', f[1], 'task', task_id,
    'rev', rev, 'exp', f[2], 'serial', f[4] or '')
end

-- Whether a lease hash is active at `now`.
local function is_active(key, now)
  local s = redis.call('HMGET', key, 'state', 'exp')
  return s[1] == 'active' and tonumber(s[2]) > tonumber(now)
end

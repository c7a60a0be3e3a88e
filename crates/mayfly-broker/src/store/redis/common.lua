-- Shared by every script (prepended by the broker). Keys of one task share
-- the hash tag {task_id}; lease hashes hold: body (the lease JSON as issued),
-- state (active|revoked|expired), reason, rev (revocation JSON), exp (ms),
-- kind, agent, serial (the credential's entry in a revocation list: a
-- certificate's serial, a token's status-list index).

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

-- Marks a lease revoked and appends its feed event, given the lease's
-- kind, expiry and serial as read.
local function mark_revoked(key, lease_id, task_id, rev, reason, kind, exp, serial, stream_key)
  redis.call('HSET', key, 'state', 'revoked', 'reason', reason, 'rev', rev)
  redis.call('XADD', stream_key, '*', 'lease', lease_id, 'kind', kind, 'task', task_id,
    'rev', rev, 'exp', exp, 'serial', serial or '')
end

-- Revokes one active lease: marks it, takes it out of the expiry index and
-- appends its feed event.
local function revoke(key, lease_id, task_id, rev, reason, expiry_key, stream_key)
  local f = redis.call('HMGET', key, 'kind', 'exp', 'agent', 'serial')
  mark_revoked(key, lease_id, task_id, rev, reason, f[1], f[2], f[4], stream_key)
  redis.call('ZREM', expiry_key, lease_id .. ':' .. task_id .. ':' .. f[3])
end

-- Whether a lease hash is active at `now`.
local function is_active(key, now)
  local s = redis.call('HMGET', key, 'state', 'exp')
  return s[1] == 'active' and tonumber(s[2]) > tonumber(now)
end

-- Whether an operator's lock on an agent (its lock hash: body, exp ms or
-- 0 for "until unlocked") holds at `now`.
local function locked(lock_key, now)
  local exp = redis.call('HGET', lock_key, 'exp')
  if not exp then return false end
  return exp == '0' or tonumber(exp) > tonumber(now)
end

-- Whether a credential lease may be recorded now: 'OK', or why not. The
-- task must exist, belong to the lease's agent, be active at `now`,
-- outlive the lease, and still be at the context revision the decision
-- saw; the agent, and the service holding an exchanged token, must not be
-- locked (checked first, so a locked agent hears why); the lease id must be
-- new.
local function issue_check(task_key, tlease_key, lease_key, lock_key, holder_lock_key, agent,
    now, expires, rev)
  local t = redis.call('HMGET', task_key, 'agent', 'exp', 'rev')
  if not t[1] or t[1] ~= agent then return 'NOTFOUND' end
  if locked(lock_key, now) then return 'LOCKED' end
  if holder_lock_key ~= lock_key and locked(holder_lock_key, now) then return 'LOCKED' end
  local state = task_state(tlease_key, now)
  if state ~= 'active' then return 'STATE:' .. state end
  if tonumber(expires) > tonumber(t[2]) then return 'OUTLIVES' end
  if (t[3] or '0') ~= rev then return 'CHANGED' end
  if redis.call('EXISTS', lease_key) == 1 then return 'DUPLICATE' end
  return 'OK'
end

-- Records a credential lease that passed issue_check: its hash, its
-- entries in the task's set and the expiry index, and its task in the
-- lease index (id -> task). The lease is found by agent through the
-- agent's tasks, and is purged with its task (it never outlives it). A token
-- held by another than its owner (exchanged) is also found through its
-- holder's actor index, whose entries past their expiry are dropped
-- whenever it is written or read, and which lapses with the last lease it
-- lists.
local function issue_write(lease_key, set_key, index_key, expiry_key, actor_key, id, task, agent,
    holder, now, expires, keep_until, body, kind, member, serial)
  if holder ~= agent then
    redis.call('ZREMRANGEBYSCORE', actor_key, '-inf', now)
    redis.call('ZADD', actor_key, expires, id .. ':' .. task)
    local left = redis.call('PTTL', actor_key)
    if left < 0 or tonumber(now) + left < tonumber(keep_until) then
      redis.call('PEXPIREAT', actor_key, keep_until)
    end
  end
  if serial ~= '' then
    redis.call('HSET', lease_key, 'body', body, 'state', 'active', 'exp', expires,
      'kind', kind, 'agent', agent, 'serial', serial)
  else
    redis.call('HSET', lease_key, 'body', body, 'state', 'active', 'exp', expires,
      'kind', kind, 'agent', agent)
  end
  redis.call('PEXPIREAT', lease_key, keep_until)
  redis.call('ZADD', set_key, 0, id)
  redis.call('HSET', index_key, id, task)
  redis.call('ZADD', expiry_key, expires, member)
end

-- Whether `key` is missing or of type `want`, so that a write to it
-- cannot fail halfway through a script (Redis does not undo the writes a
-- failed script made before the failure).
local function writable(key, want)
  local t = redis.call('TYPE', key)['ok']
  return t == 'none' or t == want
end

-- Whether a task may be started now: 'OK', or why not. K and A are
-- start_task.lua's KEYS and ARGV (there, the layout). The agent must not be
-- locked and the task id must be new; a delegated task needs a live parent
-- of its delegator that outlives it.
local function task_check(K, A)
  if redis.call('EXISTS', K[1]) == 1 then return 'DUPLICATE' end
  if locked(K[12], A[10]) then return 'LOCKED' end
  if A[8] ~= '' then
    local owner = redis.call('HGET', K[9], 'agent')
    if not owner or owner ~= A[9] then return 'NOTFOUND' end
    local state = task_state(K[10], A[10])
    if state ~= 'active' then return 'STATE:' .. state end
    if tonumber(A[5]) > tonumber(redis.call('HGET', K[9], 'exp')) then return 'OUTLIVES' end
  end
  return 'OK'
end

-- Records a task that passed task_check: the task, its task lease, its
-- entries in the indexes and, when delegated, in its parent's children (it
-- then ends with the parent).
local function task_write(K, A)
  if A[8] ~= '' then
    local parent_exp = redis.call('HGET', K[9], 'exp')
    redis.call('ZADD', K[11], 0, A[1])
    redis.call('PEXPIREAT', K[11], tonumber(parent_exp) + tonumber(A[11]))
  end
  redis.call('HSET', K[1], 'body', A[2], 'agent', A[4], 'exp', A[5], 'rev', '0')
  redis.call('HSET', K[2], 'body', A[3], 'state', 'active', 'exp', A[5],
    'kind', 'task', 'agent', A[4])
  redis.call('ZADD', K[3], 0, A[1])
  -- The lease set has no Redis TTL: purge finds the task's credentials
  -- through it (and deletes it), however late the reaper runs.
  for i = 1, 2 do redis.call('PEXPIREAT', K[i], A[6]) end
  redis.call('HSET', K[4], A[1], A[1])
  redis.call('ZADD', K[5], 0, A[1] .. ':' .. A[4])
  redis.call('ZADD', K[6], 0, A[1])
  redis.call('ZADD', K[7], A[5], A[7])
  -- The task is purged after retention, and its credentials with it.
  redis.call('ZADD', K[8], A[5], A[7])
end

-- Replaces an active task's context and bumps its revision.
-- KEYS: 1 task hash, 2 task-lease hash
-- ARGV: 1 agent, 2 now ms, 3 new task JSON, 4 expected current revision
local agent = redis.call('HGET', KEYS[1], 'agent')
if not agent or agent ~= ARGV[1] then return 'NOTFOUND' end
local state = task_state(KEYS[2], ARGV[2])
if state ~= 'active' then return 'STATE:' .. state end
local rev = redis.call('HGET', KEYS[1], 'rev') or '0'
if rev ~= ARGV[4] then return 'CHANGED' end
redis.call('HSET', KEYS[1], 'body', ARGV[3], 'rev', tostring(tonumber(rev) + 1))
return 'OK'

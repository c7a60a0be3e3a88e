-- Uses an approved, unexpired approval once, for exactly its request.
-- KEYS: 1 approval hash
-- ARGV: 1 now ms, 2 agent, 3 task id, 4 request JSON, 5 consumed status JSON
local s = redis.call('HMGET', KEYS[1], 'state', 'exp', 'agent', 'task', 'request')
if not s[1] or s[3] ~= ARGV[2] or s[4] ~= ARGV[3] then return 'NOTFOUND' end
if (s[1] == 'pending' or s[1] == 'approved') and tonumber(ARGV[1]) >= tonumber(s[2]) then
  return 'STATE:expired'
end
if s[1] ~= 'approved' then return 'STATE:' .. s[1] end
if s[5] ~= ARGV[4] then return 'MISMATCH' end
redis.call('HSET', KEYS[1], 'state', 'consumed', 'status', ARGV[5])
return 'OK'

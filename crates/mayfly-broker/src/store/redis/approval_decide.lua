-- Approves or denies a pending, unexpired approval.
-- KEYS: 1 approval hash
-- ARGV: 1 now ms, 2 new state (approved|denied), 3 status JSON
local s = redis.call('HMGET', KEYS[1], 'state', 'exp')
if not s[1] then return 'NOTFOUND' end
if s[1] == 'pending' and tonumber(ARGV[1]) >= tonumber(s[2]) then return 'STATE:expired' end
if s[1] ~= 'pending' then return 'STATE:' .. s[1] end
redis.call('HSET', KEYS[1], 'state', ARGV[2], 'status', ARGV[3])
return 'OK'

-- Revokes one active credential lease (task leases go through end_task).
-- KEYS: 1 lease hash, 2 expiry index, 3 revocation stream
-- ARGV: 1 lease id, 2 task id, 3 now ms, 4 revocation JSON, 5 reason
if redis.call('EXISTS', KEYS[1]) == 0 then return 'NOTFOUND' end
if not is_active(KEYS[1], ARGV[3]) then return 'INACTIVE' end
revoke(KEYS[1], ARGV[1], ARGV[2], ARGV[4], ARGV[5], KEYS[2], KEYS[3])
return 'OK'

-- Compare-and-swap of one record: a value and its revision, two fields of a hash.
--
-- KEYS[1]  the hash holding the record
-- ARGV[1]  the record's field (its revision is in the field ARGV[1] .. '#')
-- ARGV[2]  the expected revision: '*' any, '0' none (the record must not exist), else
--          the revision last read
-- ARGV[3]  the new value
-- ARGV[4]  milliseconds after which the whole hash may be dropped ('0': kept for good)
--
-- Returns the new revision, or -1 when the record's revision is not the expected one
-- (nothing is written). A revision is the larger of the previous one + 1 and the
-- server's clock in microseconds, so revisions keep growing across a restart of Redis
-- that lost its data (other nodes order a user's events by them).
local rf = ARGV[1] .. '#'
local cur = tonumber(redis.call('HGET', KEYS[1], rf) or '0')
if ARGV[2] ~= '*' and tonumber(ARGV[2]) ~= cur then
  return -1
end
local t = redis.call('TIME')
local rev = math.max(cur + 1, tonumber(t[1]) * 1000000 + tonumber(t[2]))
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3], rf, string.format('%.0f', rev))
if tonumber(ARGV[4]) > 0 then
  redis.call('PEXPIRE', KEYS[1], ARGV[4])
else
  redis.call('PERSIST', KEYS[1])
end
return rev

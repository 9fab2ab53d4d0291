-- Removes one record (a value and its revision, two fields of a hash) if it is still at
-- the expected revision.
--
-- KEYS[1]  the hash holding the record
-- ARGV[1]  the record's field (its revision is in the field ARGV[1] .. '#')
-- ARGV[2]  the expected revision, or '*' for any
--
-- Returns 1 when removed, 0 when there was no record, -1 when its revision differs.
local rf = ARGV[1] .. '#'
local cur = redis.call('HGET', KEYS[1], rf)
if not cur then
  return 0
end
if ARGV[2] ~= '*' and tonumber(ARGV[2]) ~= tonumber(cur) then
  return -1
end
redis.call('HDEL', KEYS[1], ARGV[1], rf)
return 1

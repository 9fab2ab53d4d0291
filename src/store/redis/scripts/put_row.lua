-- Writes a directory row and appends the change to the directory's stream, which every
-- node follows.
--
-- KEYS[1]  the directory hash
-- KEYS[2]  its change stream (same hash tag: same cluster slot)
-- ARGV[1]  the row's field, '<table>.<key>' (its revision is in ARGV[1] .. '#')
-- ARGV[2]  the value ('' for a deleted row: kept, so a node that missed the change
--          still learns of it when it reads the directory again)
-- ARGV[3]  the approximate length the stream is trimmed to
--
-- Returns the row's revision: the larger of the directory's last revision + 1 and the
-- server's clock in microseconds (growing across a restart that lost the data).
local t = redis.call('TIME')
local seq = tonumber(redis.call('HGET', KEYS[1], '#seq') or '0')
local rev = string.format('%.0f', math.max(seq + 1, tonumber(t[1]) * 1000000 + tonumber(t[2])))
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2], ARGV[1] .. '#', rev, '#seq', rev)
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*', 'row', ARGV[1], 'value', ARGV[2], 'rev', rev)
return tonumber(rev)

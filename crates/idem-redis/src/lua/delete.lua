
-- delete_if. ARGV[2]: the expected revision (8 bytes).
-- Returns 1 (deleted), 0 (absent, expired or another revision), or
-- {'corrupt', why}.
local state, h = head(KEYS[1], ARGV[1])
if state == 'corrupt' then
  return {'corrupt', h}
end
if state == 'live' and string.sub(h, 10, 17) == ARGV[2] then
  redis.call('UNLINK', KEYS[1])
  return 1
end
return 0


-- compare_and_swap. ARGV[2]: the expected revision (8 bytes); ARGV[3]: the
-- new value (layout v1); ARGV[4]: PX in ms.
-- Returns 1 (swapped), 0 (absent or expired), the live value (another
-- revision), or {'corrupt', why}.
local state, h = head(KEYS[1], ARGV[1])
if state == 'corrupt' then
  return {'corrupt', h}
end
if state ~= 'live' then
  return 0
end
if string.sub(h, 10, 17) == ARGV[2] then
  redis.call('SET', KEYS[1], ARGV[3], 'PX', ARGV[4])
  return 1
end
-- The very bytes of the new value: this call already swapped them in (a
-- retry after a lost reply).
local live = redis.call('GET', KEYS[1])
if live == ARGV[3] then
  return 1
end
return live

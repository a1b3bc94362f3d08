
-- insert_if_absent. ARGV[2]: the new value (layout v1); ARGV[3]: PX in ms.
-- Returns 1 (written), the live value (not written), or {'corrupt', why}.
local state, h = head(KEYS[1], ARGV[1])
if state == 'corrupt' then
  return {'corrupt', h}
end
if state == 'live' then
  -- Same revision and write id: this very call already wrote it (a retry
  -- after a lost reply), so report it as written.
  if string.sub(h, 10, 25) == string.sub(ARGV[2], 10, 25) then
    return 1
  end
  return redis.call('GET', KEYS[1])
end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
return 1


-- insert_if_absent. ARGV[2]: the new value (layout v1); ARGV[3]: PX in ms.
-- Returns 1 (written), the live value (not written), or {'corrupt', why}.
local state, h = head(KEYS[1], ARGV[1])
if state == 'corrupt' then
  return {'corrupt', h}
end
if state == 'live' then
  -- The very same bytes: this call already wrote them (a retry after a
  -- lost reply; revisions and tokens are random per write), so report it
  -- as written.
  local live = redis.call('GET', KEYS[1])
  if live == ARGV[2] then
    return 1
  end
  return live
end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
return 1

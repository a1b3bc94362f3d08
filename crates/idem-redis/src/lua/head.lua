-- idem-redis, value layout v1 (see the crate documentation):
--   byte 1       layout tag, 0x01
--   bytes 2-9    expires_at, ms since the Unix epoch, u64 big-endian
--   bytes 10-17  revision, u64 big-endian
--   bytes 18-25  reserved, 0 (a random write id before round 5)
--   bytes 26-    the record, idem_core::codec
-- Every script touches exactly one key, KEYS[1]. ARGV[1] is the engine's
-- `now` (ms since the Unix epoch, u64 big-endian): expiry is decided by the
-- engine's clock, never by the server's. Arguments are data only; no Lua is
-- ever built from them.

-- Reads the 25-byte header of KEYS[1]; returns the state of the key at `now`:
-- 'absent', 'expired', 'live' (and the header), or 'corrupt' (and why).
local function head(key, now)
  local h = redis.pcall('GETRANGE', key, 0, 24)
  if type(h) == 'table' then
    return 'corrupt', tostring(h['err'])
  end
  if h == '' then
    if redis.call('EXISTS', key) == 1 then
      return 'corrupt', 'the value is empty'
    end
    return 'absent'
  end
  if string.len(h) < 25 or string.byte(h, 1) ~= 1 then
    return 'corrupt', 'the value is not an idem record (unknown layout)'
  end
  -- Two 32-bit halves: exact in Lua's doubles, compared lexicographically.
  local eh, el = struct.unpack('>I4I4', h, 2)
  local nh, nl = struct.unpack('>I4I4', now)
  if eh > nh or (eh == nh and el > nl) then
    return 'live', h
  end
  return 'expired'
end

"""The Lua scripts: each runs atomically in Redis, on Redis's clock (`TIME`), one for the fleet.

Sessions (non-Cluster: a script names the keys of the session it found):
  s:<sha256 hex>  HASH id, user, groups, service, rhost ("=host" or ""), created, last_seen,
                  ttl, idle, host, th; kept GRACE seconds past expiry so a sweep can still say
                  whose session ended
  sid:<id>        the token hash hex (same expiry);  u:<user> SET of ids;  s:exp ZSET id->expiry
  A session leaves s:exp exactly once (ZREM returns 1 to one caller): that caller emits
  `session.closed`, so a sweep on every host still reports each expiry once.
Lockout, per budget (scope, key), Cluster-safe hash tag `lo:{scope:key}`:
  :f ZSET fingerprint->failure time;  :l HASH since, until ("" = permanent), strikes
  :c HASH fingerprint->attempts in flight;  :d ZSET fingerprint->lease deadline
  RESERVE prunes the window and dead leases, refuses a lock, skips a counted guess, shares an
  in-flight one's slot, answers `wait` while failures + in-flight fill the budget, else takes
  a slot. FINISH returns it: a failure is recorded (and locks a full budget), a success
  clears the user's failures and lock.
Credential-cache drops (`cachedrops`): cd  HASH gen (random), u:<user> drops counted.
  MARK makes `gen` if there is none and answers the server's run_id, gen and the user's count.
"""

from __future__ import annotations

PRELUDE = """
local function clock() local t = redis.call('TIME') return tonumber(t[1]) + tonumber(t[2]) / 1000000 end
local function num(x) return string.format('%.6f', x) end
"""

_SESSION = PRELUDE + """
local function expires(f)
  local created, last, ttl, idle = tonumber(f.created), tonumber(f.last_seen), tonumber(f.ttl), tonumber(f.idle)
  local hard = created + ttl
  if idle > 0 then return math.min(hard, last + idle) end
  return hard
end
local function fields(key)
  local h = redis.call('HGETALL', key)
  if #h == 0 then return nil end
  local f = {}
  for i = 1, #h, 2 do f[h[i]] = h[i + 1] end
  return f
end
local function pack(f)
  return {f.id, f.user, f.groups, f.service, f.rhost, f.created, f.last_seen, f.ttl, f.idle, f.th}
end
local function keep_until(prefix, f, e, grace)
  local at = math.floor((e + grace) * 1000)
  redis.call('PEXPIREAT', prefix .. 's:' .. f.th, at)
  redis.call('PEXPIREAT', prefix .. 'sid:' .. f.id, at)
  local u = prefix .. 'u:' .. f.user
  local left = redis.call('PTTL', u)
  if left < 0 or left < at - math.floor(clock() * 1000) then redis.call('PEXPIREAT', u, at) end
end
local function drop(prefix, f, id)
  if redis.call('ZREM', prefix .. 's:exp', id) == 0 then return false end
  if f then
    redis.call('DEL', prefix .. 's:' .. f.th)
    redis.call('SREM', prefix .. 'u:' .. f.user, id)
  end
  redis.call('DEL', prefix .. 'sid:' .. id)
  return true
end
local function by_id(prefix, id)
  local th = redis.call('GET', prefix .. 'sid:' .. id)
  if not th then return nil end
  return fields(prefix .. 's:' .. th)
end
"""

# ARGV: prefix, grace, th, id, user, groups, service, rhost, ttl, idle, host -> created
CREATE = _SESSION + """
local p, grace = ARGV[1], tonumber(ARGV[2])
local now = num(clock())
local f = {th = ARGV[3], id = ARGV[4], user = ARGV[5], groups = ARGV[6], service = ARGV[7], rhost = ARGV[8],
           created = now, last_seen = now, ttl = ARGV[9], idle = ARGV[10], host = ARGV[11]}
redis.call('HSET', p .. 's:' .. f.th, 'th', f.th, 'id', f.id, 'user', f.user, 'groups', f.groups, 'service', f.service,
           'rhost', f.rhost, 'created', now, 'last_seen', now, 'ttl', f.ttl, 'idle', f.idle, 'host', f.host)
redis.call('SET', p .. 'sid:' .. f.id, f.th)
redis.call('SADD', p .. 'u:' .. f.user, f.id)
local e = expires(f)
redis.call('ZADD', p .. 's:exp', e, f.id)
keep_until(p, f, e, grace)
return now
"""

# ARGV: prefix, grace, th, touch (1/0) -> the live session, or nil
TOUCH = _SESSION + """
local p, grace = ARGV[1], tonumber(ARGV[2])
local f = fields(p .. 's:' .. ARGV[3])
if not f then return nil end
local now = clock()
if now >= expires(f) then return nil end
if ARGV[4] == '1' then
  f.last_seen = num(now)
  redis.call('HSET', p .. 's:' .. f.th, 'last_seen', f.last_seen)
  local e = expires(f)
  redis.call('ZADD', p .. 's:exp', e, f.id)
  keep_until(p, f, e, grace)
end
return pack(f)
"""

# ARGV: prefix, th -> the live session it ended (logout), or nil
LOGOUT = _SESSION + """
local p = ARGV[1]
local f = fields(p .. 's:' .. ARGV[2])
if not f or clock() >= expires(f) then return nil end
if not drop(p, f, f.id) then return nil end
return pack(f)
"""

# ARGV: prefix, user filter ("" = any), ids... -> the sessions this call removed
REVOKE = _SESSION + """
local p, user, out = ARGV[1], ARGV[2], {}
for i = 3, #ARGV do
  local f = by_id(p, ARGV[i])
  if f and (user == '' or f.user == user) and drop(p, f, f.id) then out[#out + 1] = pack(f) end
end
return out
"""

# ARGV: prefix, batch -> {sessions this call expired (or {id} if its hash is gone), sessions left}
SWEEP = _SESSION + """
local p, out = ARGV[1], {}
local ids = redis.call('ZRANGEBYSCORE', p .. 's:exp', '-inf', clock(), 'LIMIT', 0, tonumber(ARGV[2]))
for _, id in ipairs(ids) do
  local f = by_id(p, id)
  if drop(p, f, id) then out[#out + 1] = f and pack(f) or {id} end
end
return {out, redis.call('ZCARD', p .. 's:exp')}
"""

# ARGV: prefix, user ("" = everyone) -> live sessions
LIST = _SESSION + """
local p, out, ids = ARGV[1], {}, nil
local now = clock()
if ARGV[2] ~= '' then ids = redis.call('SMEMBERS', p .. 'u:' .. ARGV[2])
else ids = redis.call('ZRANGEBYSCORE', p .. 's:exp', '(' .. now, '+inf') end
for _, id in ipairs(ids) do
  local f = by_id(p, id)
  if f and now < expires(f) then out[#out + 1] = pack(f) end
end
return out
"""

_LOCKOUT = PRELUDE + """
local function prune(k, interval, now)
  redis.call('ZREMRANGEBYSCORE', k .. 'f', '-inf', '(' .. num(now - interval))
  for _, fp in ipairs(redis.call('ZRANGEBYSCORE', k .. 'd', '-inf', now)) do
    redis.call('HDEL', k .. 'c', fp)
    redis.call('ZREM', k .. 'd', fp)
  end
end
local function locked(k, now)
  local l = redis.call('HMGET', k .. 'l', 'since', 'until', 'strikes')
  if not l[3] then return nil end
  if l[2] ~= '' and tonumber(l[2]) <= now then return nil end
  return l
end
local function lock(k, a, now)
  local l = redis.call('HMGET', k .. 'l', 'since', 'until', 'strikes')
  local strikes = tonumber(l[3]) or 0
  if l[2] and l[2] ~= '' and now >= tonumber(l[2]) + a.max_lock then strikes = 0 end
  strikes = strikes + 1
  local till = ''
  if a.permanent == 0 then
    local length = a.lock_time
    if a.progressive == 1 then length = math.min(a.lock_time * 2 ^ math.min(strikes - 1, 40), a.max_lock) end
    till = num(now + length)
  end
  redis.call('HSET', k .. 'l', 'since', num(now), 'until', till, 'strikes', strikes)
  if till == '' then redis.call('PERSIST', k .. 'l')
  else redis.call('PEXPIREAT', k .. 'l', math.floor((tonumber(till) + a.max_lock) * 1000)) end
  redis.call('DEL', k .. 'f')
  return {num(now), till, strikes}
end
local function limits(base, n)
  local out = {}
  for i = 1, n do
    local j = base + (i - 1) * 8
    out[i] = {held = ARGV[j], max = tonumber(ARGV[j + 1]), interval = tonumber(ARGV[j + 2]), lock_time = tonumber(ARGV[j + 3]),
              permanent = tonumber(ARGV[j + 4]), progressive = tonumber(ARGV[j + 5]), max_lock = tonumber(ARGV[j + 6]),
              user = ARGV[j + 7]}
  end
  return out
end
"""

# KEYS: one base "…lo:{scope:key}:" per budget; ARGV: fingerprint, lease, then 8 per budget
# -> {"ok", held flags...} | {"locked", index, since, until, strikes} | {"wait"}
RESERVE = _LOCKOUT + """
local fp, lease, now = ARGV[1], tonumber(ARGV[2]), clock()
local a = limits(3, #KEYS)
local best = nil
for i, k in ipairs(KEYS) do
  prune(k, a[i].interval, now)
  local l = locked(k, now)
  if l and (not best or l[2] == '' or (best[4] ~= '' and tonumber(l[2]) > tonumber(best[4]))) then best = {'locked', i, l[1], l[2], l[3]} end
end
if best then return best end
local take = {}
for i, k in ipairs(KEYS) do
  if redis.call('ZSCORE', k .. 'f', fp) then take[i] = '0'
  elseif redis.call('HEXISTS', k .. 'c', fp) == 1 then take[i] = '1'
  elseif redis.call('ZCARD', k .. 'f') + redis.call('HLEN', k .. 'c') >= a[i].max then
    if redis.call('HLEN', k .. 'c') > 0 then return {'wait'} end
    local l = lock(k, a[i], now)
    return {'locked', i, l[1], l[2], l[3]}
  else take[i] = '1' end
end
local out = {'ok'}
for i, k in ipairs(KEYS) do
  out[#out + 1] = take[i]
  if take[i] == '1' then
    redis.call('HINCRBY', k .. 'c', fp, 1)
    redis.call('ZADD', k .. 'd', 'GT', now + lease, fp)
    redis.call('PEXPIRE', k .. 'c', math.floor(lease * 1000))
    redis.call('PEXPIRE', k .. 'd', math.floor(lease * 1000))
  end
end
return out
"""

# KEYS as RESERVE; ARGV: fingerprint, verdict (fail|ok|cancel), then 8 per budget
# -> {index, since, until, strikes} for each lock this failure imposed
FINISH = _LOCKOUT + """
local fp, verdict, now = ARGV[1], ARGV[2], clock()
local a = limits(3, #KEYS)
local out = {}
for i, k in ipairs(KEYS) do
  if a[i].held == '1' then
    local left = redis.call('HINCRBY', k .. 'c', fp, -1)
    if left <= 0 then redis.call('HDEL', k .. 'c', fp) redis.call('ZREM', k .. 'd', fp) end
  end
end
for i, k in ipairs(KEYS) do
  if verdict == 'ok' and a[i].user == '1' then
    redis.call('DEL', k .. 'f', k .. 'l')
  elseif verdict == 'fail' and a[i].held == '1' then
    prune(k, a[i].interval, now)
    if not redis.call('ZSCORE', k .. 'f', fp) then
      redis.call('ZADD', k .. 'f', now, fp)
      redis.call('PEXPIRE', k .. 'f', math.floor(a[i].interval * 1000) + 1000)
      if redis.call('ZCARD', k .. 'f') >= a[i].max then
        local l = lock(k, a[i], now)
        out[#out + 1] = {i, l[1], l[2], l[3]}
      end
    end
  end
end
return out
"""

# KEYS: one budget base; ARGV: interval -> {failures in the window, since, until, strikes}
INSPECT = _LOCKOUT + """
local k, now = KEYS[1], clock()
local l = redis.call('HMGET', k .. 'l', 'since', 'until', 'strikes')
local n = redis.call('ZCOUNT', k .. 'f', num(now - tonumber(ARGV[1])), '+inf')
return {n, l[1] or '', l[2] or '', l[3] or '0', num(now)}
"""

MARK = """
redis.call('HSETNX', KEYS[1], 'gen', ARGV[1])
local gen, count = unpack(redis.call('HMGET', KEYS[1], 'gen', ARGV[2]))
return {string.match(redis.call('INFO', 'server'), 'run_id:(%x+)'), gen, count or '0'}
"""

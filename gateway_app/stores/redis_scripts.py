"""The Lua scripts of the Redis store: every write is one script, atomic, on the Redis clock.

See :mod:`~gateway_app.stores.redis` for the layout of the keys they read and write.
"""

from __future__ import annotations

from .base import CHANGE_HISTORY

# Every write script starts with this. Its last ARGV is the write's deadline on the Redis
# clock (microseconds): a script that runs later than that (Redis was hung and has resumed;
# the caller gave up and answered 503) changes nothing and fails.
DEADLINE = """
local function now_us()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000000 + tonumber(t[2])
end
if now_us() > tonumber(ARGV[#ARGV]) then
  return redis.error_reply('LATE the write arrived after its deadline; nothing was changed')
end
"""

# Every registry write script also starts with this. KEYS[1..6] are the same for all of them:
# version, index, leases, policies, changelog, changelog_since; ARGV[1] is the key prefix and
# ARGV[2] the notification channel.
_COMMON = DEADLINE + f"local HISTORY = {CHANGE_HISTORY}\n" + """
local P = ARGV[1]
local function fmt(n) return string.format('%.0f', n) end
-- A change: bump the version, note it for each service touched, publish it.
local function bump(services)
  local v = redis.call('INCR', KEYS[1])
  if v == 1 then  -- a new or wiped registry: versions go on from the clock; a new history
    v = now_us()
    redis.call('SET', KEYS[1], fmt(v))
    redis.call('DEL', KEYS[5], P .. 'changelog_versions')
    redis.call('SET', KEYS[6], fmt(v - 1))
  end
  for _, name in ipairs(services) do redis.call('ZADD', KEYS[5], fmt(v), name) end
  redis.call('ZREMRANGEBYSCORE', KEYS[5], '-inf', fmt(v - HISTORY))
  -- every version noted: a version without a note (a write by a gateway of the older layout)
  -- shows as a gap, and a worker then loads everything
  redis.call('ZADD', P .. 'changelog_versions', fmt(v), fmt(v))
  redis.call('ZREMRANGEBYSCORE', P .. 'changelog_versions', '-inf', fmt(v - HISTORY))
  redis.call('PUBLISH', ARGV[2], fmt(v))
end
"""

# KEYS: common, instance, service set. ARGV: common, service, id, address, weight, metadata,
# ttl, deadline.
REGISTER = _COMMON + """
local member = ARGV[3] .. '/' .. ARGV[4]
local now = now_us()
local registered = redis.call('HGET', KEYS[7], 'registered_at')
local created = 0
if not registered then
  created = 1
  registered = fmt(now)
end
local expires = ''
if ARGV[8] ~= '' then
  expires = fmt(now + math.floor(tonumber(ARGV[8]) * 1000000 + 0.5))
  redis.call('ZADD', KEYS[3], expires, member)
else
  redis.call('ZREM', KEYS[3], member)
end
redis.call('HSET', KEYS[7], 'address', ARGV[5], 'weight', ARGV[6], 'metadata', ARGV[7],
           'ttl', ARGV[8], 'registered_at', registered, 'expires_at', expires,
           'draining', '0')
redis.call('SADD', KEYS[2], member)
redis.call('SADD', KEYS[8], ARGV[4])
bump({ARGV[3]})
return {created, redis.call('HGETALL', KEYS[7])}
"""

# KEYS: common, instance. ARGV: common, service, id, deadline.
HEARTBEAT = _COMMON + """
local ttl = redis.call('HGET', KEYS[7], 'ttl')
if not ttl then return false end
if ttl ~= '' then
  local expires = fmt(now_us() + math.floor(tonumber(ttl) * 1000000 + 0.5))
  redis.call('HSET', KEYS[7], 'expires_at', expires)
  redis.call('ZADD', KEYS[3], expires, ARGV[3] .. '/' .. ARGV[4])
  bump({ARGV[3]})
end
return redis.call('HGETALL', KEYS[7])
"""

# KEYS: common, instance, service set. ARGV: common, service, id, deadline.
REMOVE_INSTANCE = _COMMON + """
local record = redis.call('HGETALL', KEYS[7])
if #record == 0 then return false end
local member = ARGV[3] .. '/' .. ARGV[4]
redis.call('DEL', KEYS[7])
redis.call('SREM', KEYS[2], member)
redis.call('ZREM', KEYS[3], member)
redis.call('SREM', KEYS[8], ARGV[4])
bump({ARGV[3]})
return record
"""

# KEYS: common, service set. ARGV: common, service, deadline.
REMOVE_SERVICE = _COMMON + """
local removed = {}
for _, id in ipairs(redis.call('SMEMBERS', KEYS[7])) do
  local member = ARGV[3] .. '/' .. id
  local key = P .. 'instance:' .. member
  local record = redis.call('HGETALL', key)
  if #record > 0 then
    removed[#removed + 1] = id
    removed[#removed + 1] = record
  end
  redis.call('DEL', key)
  redis.call('SREM', KEYS[2], member)
  redis.call('ZREM', KEYS[3], member)
end
redis.call('DEL', KEYS[7])
if #removed > 0 then bump({ARGV[3]}) end
return removed
"""

# KEYS: common, instance. ARGV: common, service, "1" to drain or "0" to undo it, deadline.
SET_DRAINING = _COMMON + """
local draining = redis.call('HGET', KEYS[7], 'draining')
if not draining then return false end
if draining ~= ARGV[4] then
  redis.call('HSET', KEYS[7], 'draining', ARGV[4])
  bump({ARGV[3]})
end
return redis.call('HGETALL', KEYS[7])
"""

# KEYS: common. ARGV: common, deadline.
PURGE_EXPIRED = _COMMON + """
local due = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', fmt(now_us()))
local services, seen = {}, {}
for _, member in ipairs(due) do
  local slash = string.find(member, '/', 1, true)
  local service = string.sub(member, 1, slash - 1)
  redis.call('DEL', P .. 'instance:' .. member)
  redis.call('SREM', KEYS[2], member)
  redis.call('ZREM', KEYS[3], member)
  redis.call('SREM', P .. 'service:' .. service, string.sub(member, slash + 1))
  if not seen[service] then
    seen[service] = true
    services[#services + 1] = service
  end
end
if #due > 0 then bump(services) end
return #due
"""

# KEYS: common. ARGV: common, service, body, deadline.
PUT_POLICY = _COMMON + """
if redis.call('HGET', KEYS[4], ARGV[3]) == ARGV[4] then return 0 end
redis.call('HSET', KEYS[4], ARGV[3], ARGV[4])
bump({ARGV[3]})
return 1
"""

# KEYS: common. ARGV: common, service, deadline.
DELETE_POLICY = _COMMON + """
if redis.call('HDEL', KEYS[4], ARGV[3]) == 0 then return 0 end
bump({ARGV[3]})
return 1
"""

# KEYS: version, index, policies. ARGV: instance key prefix.
LOAD = """
local t = redis.call('TIME')
local instances = {}
for _, member in ipairs(redis.call('SMEMBERS', KEYS[2])) do
  instances[#instances + 1] = member
  instances[#instances + 1] = redis.call('HGETALL', ARGV[1] .. member)
end
return {redis.call('GET', KEYS[1]) or '0', t[1], t[2], instances,
        redis.call('HGETALL', KEYS[3])}
"""

# What changed after a version: {version, seconds, micros, known (0 or 1), names, instances
# ("SERVICE/ID", fields, ...), policies (service, body, ...)}. Not known: a version older than
# the history or newer than the store, a version since then that left no note (a write by a
# gateway of the older layout), or more services than ARGV[3]: the caller loads everything.
# KEYS: version, policies, changelog, changelog_since. ARGV: prefix, since, max services.
CHANGES = f"local HISTORY = {CHANGE_HISTORY}\n" + """
local t = redis.call('TIME')
local version = redis.call('GET', KEYS[1]) or '0'
local v, since = tonumber(version), tonumber(ARGV[2])
local floor = redis.call('GET', KEYS[4])
if not floor or since < math.max(tonumber(floor), v - HISTORY) or since > v then
  return {version, t[1], t[2], 0}
end
if since == v then return {version, t[1], t[2], 1, {}, {}, {}} end
local noted = redis.call('ZCOUNT', ARGV[1] .. 'changelog_versions', '(' .. ARGV[2], version)
if noted ~= v - since then return {version, t[1], t[2], 0} end
local names = redis.call('ZRANGEBYSCORE', KEYS[3], '(' .. ARGV[2], '+inf')
if #names > tonumber(ARGV[3]) then return {version, t[1], t[2], 0} end
local instances, policies = {}, {}
for _, name in ipairs(names) do
  for _, id in ipairs(redis.call('SMEMBERS', ARGV[1] .. 'service:' .. name)) do
    local record = redis.call('HGETALL', ARGV[1] .. 'instance:' .. name .. '/' .. id)
    if #record > 0 then
      instances[#instances + 1] = name .. '/' .. id
      instances[#instances + 1] = record
    end
  end
  local body = redis.call('HGET', KEYS[2], name)
  if body then
    policies[#policies + 1] = name
    policies[#policies + 1] = body
  end
end
return {version, t[1], t[2], 1, names, instances, policies}
"""

# Once per store, for a registry written by a gateway before the change history: a set of
# instance ids per service, from the index, and the history starting at the current version.
# KEYS: version, index, changelog_since, layout. ARGV: prefix.
UPGRADE = """
if redis.call('GET', KEYS[4]) == '2' then return 0 end
for _, member in ipairs(redis.call('SMEMBERS', KEYS[2])) do
  local slash = string.find(member, '/', 1, true)
  redis.call('SADD', ARGV[1] .. 'service:' .. string.sub(member, 1, slash - 1),
             string.sub(member, slash + 1))
end
redis.call('SET', KEYS[3], redis.call('GET', KEYS[1]) or '0')
redis.call('SET', KEYS[4], '2')
return 1
"""

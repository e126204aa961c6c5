"""
The Redis layout (docs/running.md, "The Redis layout"): key names, the revocation channel, and
the Lua scripts that change them. One round trip each, atomic, and never re-creating a key
that is gone.
"""

from __future__ import annotations

TOKEN_KEY_PREFIX = "vncmux:token:"
INSTANCE_KEY_PREFIX = "vncmux:instance:"
REVOKE_CHANNEL = "vncmux:revoke"
#: websockify format only: single-use claims, since the token's own key is not ours.
USED_KEY_PREFIX = "vncmux:used:"

#: Issuing a token sweeps its instance SET of members whose token key is gone (expired) only
#: once the SET has this many members: most issues stay O(1), and a SET of an instance whose
#: tokens are never revoked, only left to expire, still cannot grow without bound.
INSTANCE_PRUNE_THRESHOLD = 64

#: The first line of every script: before Redis 5 a script may write after a non-deterministic
#: read (SMEMBERS, TTL) only once it replicates its effects rather than itself. Public for the
#: other scripts that live next to the tokens (the fleet view's).
REPLICATE_COMMANDS = "if redis.replicate_commands then redis.replicate_commands() end\n"


def token_key(token_hash: str) -> str:
    """The HASH key of a token record."""
    return TOKEN_KEY_PREFIX + token_hash


def instance_key(instance_uuid: str) -> str:
    """The SET key of an instance's token hashes."""
    return INSTANCE_KEY_PREFIX + instance_uuid


ISSUE_SCRIPT = (
    REPLICATE_COMMANDS
    + """
-- KEYS[1] token key, KEYS[2] instance set (optional)
-- ARGV[1] ttl (0: none), ARGV[2] token hash, ARGV[3] token key prefix,
-- ARGV[4] INSTANCE_PRUNE_THRESHOLD, ARGV[5..] fields
redis.call('DEL', KEYS[1])
for i = 5, #ARGV, 2 do
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
end
local ttl = tonumber(ARGV[1])
if ttl > 0 then redis.call('EXPIRE', KEYS[1], ttl) end
if KEYS[2] then
  if redis.call('SCARD', KEYS[2]) >= tonumber(ARGV[4]) then
    for _, member in ipairs(redis.call('SMEMBERS', KEYS[2])) do
      if redis.call('EXISTS', ARGV[3] .. member) == 0 then
        redis.call('SREM', KEYS[2], member)
      end
    end
  end
  local existed = redis.call('EXISTS', KEYS[2])
  redis.call('SADD', KEYS[2], ARGV[2])
  if ttl == 0 then
    redis.call('PERSIST', KEYS[2])
  else
    local current = redis.call('TTL', KEYS[2])
    if existed == 0 or (current >= 0 and current < ttl) then
      redis.call('EXPIRE', KEYS[2], ttl)
    end
  end
end
return 1
"""
)

REVOKE_SCRIPT = (
    REPLICATE_COMMANDS
    + """
-- KEYS[1] token key; ARGV[1] token hash, ARGV[2] channel, ARGV[3] instance key prefix,
-- ARGV[4] token key prefix
local instance = redis.call('HGET', KEYS[1], 'instance_uuid')
local deleted = redis.call('DEL', KEYS[1])
if instance and instance ~= '' then
  local set = ARGV[3] .. instance
  redis.call('SREM', set, ARGV[1])
  -- The SET lives as long as its longest-lived token: a revoked token without expiry must
  -- not leave it PERSISTed forever. -1 once a member has no expiry; gone members leave.
  local longest = 0
  for _, member in ipairs(redis.call('SMEMBERS', set)) do
    local left = redis.call('TTL', ARGV[4] .. member)
    if left == -2 then
      redis.call('SREM', set, member)
    elseif left == -1 then
      longest = -1
    elseif longest >= 0 and left > longest then
      longest = left
    end
  end
  if redis.call('SCARD', set) == 0 then
    redis.call('DEL', set)
  elseif longest == -1 then
    redis.call('PERSIST', set)
  else
    redis.call('EXPIRE', set, math.max(longest, 1))
  end
end
redis.call('PUBLISH', ARGV[2], ARGV[1])
return deleted
"""
)

REVOKE_INSTANCE_SCRIPT = (
    REPLICATE_COMMANDS
    + """
-- KEYS[1] instance set; ARGV[1] token key prefix, ARGV[2] channel, ARGV[3] instance uuid
local deleted = 0
for _, member in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  deleted = deleted + redis.call('DEL', ARGV[1] .. member)
end
redis.call('DEL', KEYS[1])
redis.call('PUBLISH', ARGV[2], 'instance:' .. ARGV[3])
return deleted
"""
)

#: A token's record as one JSON text (field, value, field, value…; "{}" when there is
#: none): one reply element instead of two per field, which txredisapi would parse one by
#: one in Python. Read-only, so it runs on replicas too.
LOOKUP_SCRIPT = "return cjson.encode(redis.call('HGETALL', KEYS[1]))"

#: The same lookup guarded by a key of vncmux's own (a client's failed-attempts cooldown):
#: 1 when KEYS[1] exists, without reading KEYS[2]; one round trip for both. Read-only.
_UNLESS_GUARD_SET = "if redis.call('EXISTS', KEYS[1]) == 1 then return 1 end\n"
GUARDED_LOOKUP_SCRIPT = _UNLESS_GUARD_SET + "return cjson.encode(redis.call('HGETALL', KEYS[2]))"
#: The guarded lookup of a websockify-format key (a string value, nil when there is none).
GUARDED_GET_SCRIPT = _UNLESS_GUARD_SET + "return redis.call('GET', KEYS[2])"

RECORD_ACTIVITY_SCRIPT = (
    REPLICATE_COMMANDS
    + """
-- KEYS: token keys; ARGV: unix seconds, one per key. Keys that are gone stay gone.
local written = 0
for i, key in ipairs(KEYS) do
  if redis.call('EXISTS', key) == 1 then
    local current = tonumber(redis.call('HGET', key, 'last_activity_at') or '') or 0
    if tonumber(ARGV[i]) > current then
      redis.call('HSET', key, 'last_activity_at', ARGV[i])
      written = written + 1
    end
  end
end
return written
"""
)

CLAIM_USE_SCRIPT = (
    REPLICATE_COMMANDS
    + """
-- KEYS[1] token key; ARGV[1] unix seconds
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
return redis.call('HSETNX', KEYS[1], 'used_at', ARGV[1])
"""
)

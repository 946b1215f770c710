"""Leader election among coordinators: a lease in Redis with fencing tokens.

Every coordinator runs the round manager loop, but only the holder of the lease
acts. The lease expires ``ttl_s`` after its holder last renewed it, so a standby
takes over within ``ttl_s`` plus one poll interval of the leader's death. Each
acquisition increments a fencing token; state transitions are written only while
the store's token still equals the writer's, so a paused former leader that wakes
up cannot overwrite its successor's decisions.
"""

from __future__ import annotations

import logging

import redis.asyncio as aioredis

from fedq.state import keys

__all__ = ["LeaderLease"]

log = logging.getLogger(__name__)

FENCE = keys.LEADER + ":fence"

# KEYS: lease, fence counter. ARGV: owner, ttl in ms. Returns the fencing token or -1.
_ACQUIRE = """
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return tonumber(redis.call('GET', KEYS[2]) or '0')
end
if not holder then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return redis.call('INCR', KEYS[2])
end
return -1
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


class LeaderLease:
    """One coordinator's view of the lease."""

    def __init__(self, redis: aioredis.Redis, *, owner: str, ttl_s: float) -> None:
        if ttl_s <= 0:
            raise ValueError(f"lease ttl_s {ttl_s} must be > 0")
        self._owner = owner
        self._ttl_ms = int(ttl_s * 1000)
        self.ttl_s = ttl_s
        self._acquire = redis.register_script(_ACQUIRE)
        self._release = redis.register_script(_RELEASE)
        self.token: int | None = None

    async def hold(self) -> int | None:
        """Acquire or renew the lease; the fencing token while leading, else None."""
        token = int(
            await self._acquire(keys=[keys.LEADER, FENCE], args=[self._owner, self._ttl_ms])
        )
        leading = token if token >= 0 else None
        if leading is not None and self.token != leading:
            log.info("coordinator %s leads (fencing token %d)", self._owner, leading)
        elif leading is None and self.token is not None:
            log.warning("coordinator %s lost the lead; standing by", self._owner)
        self.token = leading
        return leading

    async def release(self) -> None:
        """Give the lease up (on orderly shutdown) so a standby takes over at once."""
        if self.token is not None:
            await self._release(keys=[keys.LEADER], args=[self._owner])
            self.token = None

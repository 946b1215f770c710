"""Gathering the parts of an update that was queued as several messages.

An update larger than one broker message is published as ``parts`` messages that
share its id and the sha256 of the whole payload. Workers may receive them in any
order and on different workers. Each part is stored in a Redis hash (one per
update id and digest) before its message is acked, so no part is lost when a
worker dies, and the worker whose store completes the hash assembles the payload.
That worker keeps the completing part's message unacked until the update is
committed: if it dies first, the redelivered part completes the hash again.
Digest in the key means parts of two different payloads under one id never mix.
Hashes of updates that never complete (the gateway died mid-publish and the client
did not retry) expire after ``PARTS_TTL_S``.
"""

from __future__ import annotations

import hashlib

import redis.asyncio as aioredis

from fedq.state import keys

__all__ = ["PARTS_TTL_S", "PartStash"]

PARTS_TTL_S = 24 * 3600

# KEYS: parts hash. ARGV: part index, bytes, ttl in ms. Returns the parts held.
_STORE = """
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return redis.call('HLEN', KEYS[1])
"""


class PartStash:
    """Stores parts of multi-part updates and assembles complete ones."""

    def __init__(self, redis: aioredis.Redis, *, ttl_s: float = PARTS_TTL_S) -> None:
        self._redis = redis
        self._store = redis.register_script(_STORE)
        self._ttl_ms = int(ttl_s * 1000)

    async def store(
        self, round_id: int, update_id: str, *, digest: str, part: int, data: bytes
    ) -> int:
        """Keep one part (idempotent); returns how many distinct parts are now held."""
        key = keys.parts(round_id, update_id, digest)
        return int(await self._store(keys=[key], args=[part, data, self._ttl_ms]))

    async def assemble(
        self, round_id: int, update_id: str, *, digest: str, parts: int
    ) -> bytearray | None:
        """The whole payload if every part is held and it matches ``digest``, else ``None``.

        Parts are fetched one at a time, so the only large buffer is the payload itself.
        """
        key = keys.parts(round_id, update_id, digest)
        payload = bytearray()
        hasher = hashlib.sha256()
        for part in range(parts):
            data = await self._redis.hget(key, str(part))
            if data is None:
                return None
            hasher.update(data)
            payload += data
        return payload if hasher.hexdigest() == digest else None

    async def discard(self, round_id: int, update_id: str, *, digest: str) -> None:
        """Forget an update's parts (after it was committed)."""
        await self._redis.delete(keys.parts(round_id, update_id, digest))

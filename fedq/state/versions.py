"""Asynchronous mode: which model version each accepted update went into.

In asynchronous mode an update names the version it was trained on, and the gateway
puts it into whichever version is open when it arrives. A retry of an accepted update
may therefore arrive while a later version is open; this global record is what lets
the gateway answer it as a duplicate instead of counting it again.
"""

from __future__ import annotations

import redis.asyncio as aioredis

from fedq.state import keys

__all__ = ["AsyncVersions"]


class AsyncVersions:
    """Update id -> the version it was accepted into."""

    def __init__(self, redis: aioredis.Redis) -> None:
        self._redis = redis

    async def version_of(self, update_id: str) -> int | None:
        """The version an update was accepted into, or None if it never was."""
        value = await self._redis.hget(keys.ASYNC_ACCEPTED, update_id)
        return int(value) if value is not None else None

    async def mark(self, update_id: str, version: int) -> None:
        """Record that ``update_id`` was accepted into ``version`` (first record wins)."""
        await self._redis.hsetnx(keys.ASYNC_ACCEPTED, update_id, version)

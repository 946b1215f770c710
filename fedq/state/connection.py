"""Connecting to Redis, or to an embedded stand-in when no URL is given."""

from __future__ import annotations

import logging
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from fedq.config import redact_url

__all__ = ["StoreUnavailableError", "connect_redis", "embedded_server"]

log = logging.getLogger(__name__)

MAX_CONNECTIONS = 64  # per process; pipelined commands keep the need small
POOL_WAIT_S = 20.0  # longest wait for a free connection before the store counts as down

_EMBEDDED: Any = None


class StoreUnavailableError(RuntimeError):
    """Redis (or its stand-in) could not be reached or refused an operation."""


def embedded_server() -> Any:
    """The process-wide fakeredis server shared by every embedded component."""
    global _EMBEDDED
    if _EMBEDDED is None:
        import fakeredis

        _EMBEDDED = fakeredis.FakeServer()
    return _EMBEDDED


async def connect_redis(url: str | None) -> aioredis.Redis:
    """A Redis client for ``url``; with no URL, one on the embedded stand-in.

    Raises:
        StoreUnavailableError: the server did not answer PING.
    """
    if not url:
        import fakeredis

        return fakeredis.FakeAsyncRedis(server=embedded_server())

    # A blocking pool: past MAX_CONNECTIONS commands wait for a free connection instead
    # of failing with "Too many connections", as a burst of 1,000 uploads would otherwise.
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        max_connections=MAX_CONNECTIONS,
        timeout=POOL_WAIT_S,
        socket_connect_timeout=5,
        socket_keepalive=True,
        health_check_interval=15,
    )
    client = aioredis.Redis.from_pool(pool)
    try:
        await client.ping()
    except (RedisError, OSError) as exc:
        await client.aclose()
        raise StoreUnavailableError(f"Redis at {redact_url(url)} is unreachable: {exc}") from exc
    log.info("connected to Redis at %s", redact_url(url))
    return client

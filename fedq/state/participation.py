"""How often each client has been selected, kept in Redis for fair selection."""

from __future__ import annotations

from collections.abc import Iterable

import redis.asyncio as aioredis

from fedq.state import keys

__all__ = ["SelectionCounts"]

# KEYS: counts hash, counted-rounds set. ARGV: round id, client ids...
# Counting a round twice (a coordinator restarted between opening it and recording
# it) must not count its participants twice, so the round id guards the increments.
_RECORD = """
if redis.call('SADD', KEYS[2], ARGV[1]) == 0 then
  return 0
end
for i = 2, #ARGV do
  redis.call('HINCRBY', KEYS[1], ARGV[i], 1)
end
return 1
"""


class SelectionCounts:
    """Per-client selection counts: how many rounds each client was selected for."""

    def __init__(self, redis: aioredis.Redis) -> None:
        self._redis = redis
        self._record = redis.register_script(_RECORD)

    async def counts(self, client_ids: Iterable[str]) -> dict[str, int]:
        """Selection count of each client (0 for one never selected)."""
        ids = list(client_ids)
        if not ids:
            return {}
        values = await self._redis.hmget(keys.SELECTIONS, ids)
        return {cid: int(v or 0) for cid, v in zip(ids, values, strict=True)}

    async def record(self, round_id: int, client_ids: Iterable[str]) -> bool:
        """Count one selection of each client for ``round_id``; False if already counted."""
        ids = sorted(client_ids)
        reply = await self._record(
            keys=[keys.SELECTIONS, keys.SELECTION_ROUNDS], args=[round_id, *ids]
        )
        return bool(reply)

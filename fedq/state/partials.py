"""Partial sums: fixed-point integer sums of example-weighted updates in Redis.

Fixed point. An update ``u`` trained on ``n`` examples contributes
``rint(n * u * 2**SCALE_BITS)`` as int64 to its round's sum. Integer addition is
exact and associative, so the sum, and the model computed from it, is bit-identical
whatever the order of arrival, the number of workers, failures or replays. With
``SCALE_BITS = 20`` the resolution of an example-weighted coordinate is 2**-20
(about 9.5e-7); the gateway bounds ``|u|`` and ``n`` so that no sum can overflow.

Atomic commits. Each worker owns one partial-sum hash per round and rewrites it
whole (it keeps the committed value in memory), so workers never contend on a key.
A commit is one Lua script: it refuses the batch if the round no longer takes
updates or if any update id is already counted, and otherwise writes the new sum
and records the ids in the same step. A worker killed at any instant therefore
leaves either the old partial sum with the old ids or the new one with the new ids.
A sum larger than ``SUM_FIELD_BYTES`` is written as several fields (``sum``,
``sum.1``, ...) because Redis refuses one argument above 512 MiB
(``proto-max-bulk-len``); a 100M-parameter sum is 800 MB.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import redis.asyncio as aioredis

from fedq.state import keys

__all__ = [
    "SCALE_BITS",
    "CommitOutcome",
    "PartialSumStore",
    "fill_fixed_point",
    "to_fixed_point",
]

log = logging.getLogger(__name__)

SCALE_BITS = 20
_SCALE = float(2**SCALE_BITS)
SUM_FIELD_BYTES = 256 << 20
_CHUNK = 1 << 20

# KEYS: round hash, applied hash, partial hash, partials set.
# ARGV: partial key, sum fields, examples, count, update ids...
# (sum fields: their number n, then n byte strings, stored as sum, sum.1, ...)
_COMMIT = """
local status = redis.call('HGET', KEYS[1], 'status')
if status ~= 'open' and status ~= 'closing' then
  return {'closed', status or 'missing'}
end
local n = tonumber(ARGV[2])
local first = n + 5
local dups = {'duplicate'}
for i = first, #ARGV do
  if redis.call('HEXISTS', KEYS[2], ARGV[i]) == 1 then
    table.insert(dups, ARGV[i])
  end
end
if #dups > 1 then
  return dups
end
redis.call('DEL', KEYS[3])
redis.call('HSET', KEYS[3], 'sum', ARGV[3], 'examples', ARGV[n + 3], 'count', ARGV[n + 4],
           'sum_fields', n)
for k = 2, n do
  redis.call('HSET', KEYS[3], 'sum.' .. (k - 1), ARGV[k + 2])
end
for i = first, #ARGV do
  redis.call('HSET', KEYS[2], ARGV[i], ARGV[1])
end
redis.call('SADD', KEYS[4], ARGV[1])
redis.call('HINCRBY', KEYS[1], 'aggregated', #ARGV - first + 1)
return {'ok'}
"""


def to_fixed_point(flat_update: np.ndarray, num_examples: int) -> np.ndarray:
    """Example-weighted update as int64 fixed point (``SCALE_BITS`` fractional bits)."""
    scaled = np.multiply(flat_update.astype(np.float64, copy=False), float(num_examples) * _SCALE)
    return np.rint(scaled).astype(np.int64)


def fill_fixed_point(out: np.ndarray, flat_update: np.ndarray, num_examples: int) -> None:
    """Write ``to_fixed_point(flat_update, num_examples)`` into ``out``, a slice at a time.

    Same values bit for bit, without a float64 copy of the whole update.
    """
    factor = float(num_examples) * _SCALE
    for start in range(0, flat_update.size, _CHUNK):
        scaled = np.multiply(flat_update[start : start + _CHUNK].astype(np.float64), factor)
        np.rint(scaled, out=scaled)
        out[start : start + scaled.size] = scaled


@dataclass
class CommitOutcome:
    """Result of a commit: ``ok``, ``duplicate`` (with the ids) or ``closed``."""

    status: str
    duplicates: list[str] = field(default_factory=list)
    round_status: str = ""


@dataclass
class RoundSum:
    """All partial sums of a round added up."""

    total: np.ndarray
    examples: int
    count: int

    def mean_update(self) -> np.ndarray:
        """Example-weighted mean update (float64)."""
        if self.examples == 0:
            return np.zeros_like(self.total, dtype=np.float64)
        return self.total.astype(np.float64) / _SCALE / float(self.examples)


class PartialSumStore:
    """Commits and reads a round's partial sums."""

    def __init__(self, redis: aioredis.Redis) -> None:
        self._redis = redis
        self._commit = redis.register_script(_COMMIT)

    async def commit(
        self,
        round_id: int,
        *,
        owner: str,
        total: np.ndarray,
        examples: int,
        count: int,
        update_ids: list[str],
    ) -> CommitOutcome:
        """Write ``owner``'s cumulative partial sum and count ``update_ids``, atomically."""
        key = keys.partial(round_id, owner)
        # Views, not copies: the sum can be most of this process's memory.
        raw = memoryview(np.ascontiguousarray(total.astype("<i8", copy=False))).cast("B")
        fields = [raw[i : i + SUM_FIELD_BYTES] for i in range(0, len(raw), SUM_FIELD_BYTES)]
        fields = fields or [raw]
        reply = await self._commit(
            keys=[keys.round_hash(round_id), keys.applied(round_id), key, keys.partials(round_id)],
            args=[key, len(fields), *fields, examples, count, *update_ids],
        )

        status = _text(reply[0])
        if status == "ok":
            return CommitOutcome("ok")
        if status == "duplicate":
            return CommitOutcome("duplicate", duplicates=[_text(x) for x in reply[1:]])
        return CommitOutcome("closed", round_status=_text(reply[1]))

    async def already_applied(self, round_id: int, update_ids: list[str]) -> set[str]:
        """The subset of ``update_ids`` that some partial sum already counts."""
        if not update_ids:
            return set()
        flags = await self._redis.hmget(keys.applied(round_id), update_ids)
        return {uid for uid, flag in zip(update_ids, flags, strict=True) if flag is not None}

    async def applied_ids(self, round_id: int) -> set[str]:
        """Every update id counted in the round."""
        return {_text(k) for k in await self._redis.hkeys(keys.applied(round_id))}

    async def round_sum(self, round_id: int, *, size: int) -> RoundSum:
        """Add up every partial sum of the round (call once the round stopped taking updates)."""
        total = np.zeros(size, dtype=np.int64)
        examples = count = 0
        for key in sorted(await self._redis.smembers(keys.partials(round_id))):
            fields = await self._redis.hmget(key, ["sum", "examples", "count", "sum_fields"])
            if fields[0] is None:
                continue
            more = [f"sum.{k}" for k in range(1, int(fields[3] or 1))]
            rest = await self._redis.hmget(key, more) if more else []
            part = np.frombuffer(b"".join([fields[0], *rest]), dtype="<i8")
            if part.size != size:
                raise ValueError(f"partial sum {_text(key)} has {part.size} values, want {size}")
            total += part
            examples += int(fields[1])
            count += int(fields[2])
        return RoundSum(total=total, examples=examples, count=count)


def _text(value: bytes | str | int) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)

"""Partial sums: fixed-point integer sums of example-weighted updates in Redis.

Fixed point. An update ``u`` trained on ``n`` examples contributes
``rint(n * u * 2**SCALE_BITS)`` as int64 to its round's sum. Integer addition is
exact and associative, so the sum, and the model computed from it, is bit-identical
whatever the order of arrival, the number of workers, failures or replays. With
``SCALE_BITS = 20`` the resolution of an example-weighted coordinate is 2**-20
(about 9.5e-7); the gateway bounds ``|u|`` and ``n`` so that no sum can overflow.

Atomic commits. Each worker owns one partial-sum hash per round and rewrites it
whole (it keeps the committed value in memory), so workers never contend on a key.
The sum is stored as fields of at most ``SUM_FIELD_BYTES`` (``sum``, ``sum.1``, ...).
A commit first writes those fields one command at a time into a staging hash of its
own, then runs one Lua script: it refuses the batch if the round no longer takes
updates or if any update id is already counted, and otherwise renames the staging
hash over the partial sum and records the ids in the same step. A worker killed at
any instant therefore leaves either the old partial sum with the old ids or the new
one with the new ids; a staging hash it leaves behind expires after
``STAGING_TTL_S``. Writing piece by piece keeps a 100M-parameter sum (800 MB) from
being copied whole into the client's socket buffers and under Redis's 512 MiB limit
on one argument (``proto-max-bulk-len``).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field

import numpy as np
import redis.asyncio as aioredis

from fedq.state import keys

__all__ = [
    "SCALE_BITS",
    "SUM_FIELD_BYTES",
    "CommitOutcome",
    "PartialSumStore",
    "StagingLostError",
    "add_fixed_point",
    "fill_fixed_point",
    "to_fixed_point",
]

log = logging.getLogger(__name__)

SCALE_BITS = 20
_SCALE = float(2**SCALE_BITS)
SUM_FIELD_BYTES = 16 << 20
STAGING_TTL_S = 3600
_CHUNK = 1 << 20
_THREAD = threading.local()

# KEYS: round hash, applied hash, partial hash, partials set, staging hash.
# ARGV: partial key, number of sum fields staged, examples, count, update ids...
_COMMIT = """
local status = redis.call('HGET', KEYS[1], 'status')
if status ~= 'open' and status ~= 'closing' then
  return {'closed', status or 'missing'}
end
local dups = {'duplicate'}
for i = 5, #ARGV do
  if redis.call('HEXISTS', KEYS[2], ARGV[i]) == 1 then
    table.insert(dups, ARGV[i])
  end
end
if #dups > 1 then
  return dups
end
if redis.call('HLEN', KEYS[5]) ~= tonumber(ARGV[2]) then
  return {'unstaged'}
end
redis.call('HSET', KEYS[5], 'examples', ARGV[3], 'count', ARGV[4], 'sum_fields', ARGV[2])
redis.call('RENAME', KEYS[5], KEYS[3])
redis.call('PERSIST', KEYS[3])
for i = 5, #ARGV do
  redis.call('HSET', KEYS[2], ARGV[i], ARGV[1])
end
redis.call('SADD', KEYS[4], ARGV[1])
redis.call('HINCRBY', KEYS[1], 'aggregated', #ARGV - 4)
return {'ok'}
"""


class StagingLostError(RuntimeError):
    """The staged sum fields vanished before the commit (expired or evicted); retry."""


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


def add_fixed_point(
    total: np.ndarray, flat_update: np.ndarray, num_examples: int, *, subtract: bool = False
) -> None:
    """Add (or subtract) ``to_fixed_point(flat_update, num_examples)`` into ``total`` in place.

    Works a slice at a time in this thread's scratch buffers, so it allocates no
    temporaries. Adding and then subtracting the same update restores ``total`` exactly.
    """
    factor = float(num_examples) * _SCALE
    combine = np.subtract if subtract else np.add
    scaled_buf, fixed_buf = _scratch()
    for start in range(0, flat_update.size, _CHUNK):
        piece = flat_update[start : start + _CHUNK]
        scaled, fixed = scaled_buf[: piece.size], fixed_buf[: piece.size]
        # float32 -> float64 is exact, so this is astype(float64) * factor bit for bit.
        np.multiply(piece, factor, out=scaled, dtype=np.float64)
        np.rint(scaled, out=scaled)
        np.copyto(fixed, scaled, casting="unsafe")
        target = total[start : start + piece.size]
        combine(target, fixed, out=target)


def _scratch() -> tuple[np.ndarray, np.ndarray]:
    """This thread's float64 and int64 buffers of ``_CHUNK`` values, reused across calls."""
    buffers = getattr(_THREAD, "buffers", None)
    if buffers is None:
        buffers = _THREAD.buffers = (np.empty(_CHUNK, np.float64), np.empty(_CHUNK, np.int64))
    return buffers


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
        """Write ``owner``'s cumulative partial sum and count ``update_ids``, atomically.

        ``total`` must not change until this returns: its fields are sent from it
        directly, one at a time.

        Raises:
            StagingLostError: the staged fields vanished before the commit script ran.
        """
        key, staging = keys.partial(round_id, owner), keys.partial_staging(round_id, owner)
        staged = await self._write_staging(staging, total)
        reply = await self._commit(
            keys=[
                keys.round_hash(round_id),
                keys.applied(round_id),
                key,
                keys.partials(round_id),
                staging,
            ],
            args=[key, staged, examples, count, *update_ids],
        )

        status = _text(reply[0])
        if status == "ok":
            return CommitOutcome("ok")
        if status == "duplicate":
            return CommitOutcome("duplicate", duplicates=[_text(x) for x in reply[1:]])
        if status == "unstaged":
            raise StagingLostError(f"round {round_id}: staged sum of {owner} vanished; retry")
        return CommitOutcome("closed", round_status=_text(reply[1]))

    async def load(self, round_id: int, *, owner: str, out: np.ndarray) -> tuple[int, int] | None:
        """Copy ``owner``'s committed sum into ``out``; its (examples, count), or ``None``.

        ``None`` (and ``out`` untouched) when ``owner`` committed nothing in the round.
        """
        return await self._read_sum(keys.partial(round_id, owner), out, add=False)

    async def already_applied(self, round_id: int, update_ids: list[str]) -> set[str]:
        """The subset of ``update_ids`` that some partial sum already counts."""
        if not update_ids:
            return set()
        flags = await self._redis.hmget(keys.applied(round_id), update_ids)
        return {uid for uid, flag in zip(update_ids, flags, strict=True) if flag is not None}

    async def applied_ids(self, round_id: int) -> set[str]:
        """Every update id counted in the round."""
        return {_text(k) for k in await self._redis.hkeys(keys.applied(round_id))}

    async def applied_count(self, round_id: int) -> int:
        """How many update ids the round's partial sums count."""
        return int(await self._redis.hlen(keys.applied(round_id)))

    async def round_sum(self, round_id: int, *, size: int) -> RoundSum:
        """Add up every partial sum of the round (call once the round stopped taking updates).

        Reads one field at a time, so it holds the total plus one field.
        """
        total = np.zeros(size, dtype=np.int64)
        examples = count = 0
        for key in sorted(await self._redis.smembers(keys.partials(round_id))):
            found = await self._read_sum(key, total, add=True)
            if found is not None:
                examples += found[0]
                count += found[1]
        return RoundSum(total=total, examples=examples, count=count)

    async def _write_staging(self, staging: str, total: np.ndarray) -> int:
        """Write ``total`` into a fresh staging hash; returns how many fields it took."""
        # Views, not copies: the sum can be most of this process's memory.
        raw = memoryview(np.ascontiguousarray(total.astype("<i8", copy=False))).cast("B")
        ttl_ms = STAGING_TTL_S * 1000
        await self._redis.unlink(staging)

        starts = range(0, len(raw), SUM_FIELD_BYTES) if len(raw) else [0]
        for k, start in enumerate(starts):
            piece = raw[start : start + SUM_FIELD_BYTES]
            # A plain HSET, not a script: Redis keeps a big argument as it is, where a
            # script would copy it twice. MULTI keeps the field from being left without
            # its expiry.
            async with self._redis.pipeline(transaction=True) as stage:
                stage.hset(staging, _sum_field(k), piece)
                stage.pexpire(staging, ttl_ms)
                await stage.execute()
        return len(starts)

    async def _read_sum(
        self, key: bytes | str, out: np.ndarray, *, add: bool
    ) -> tuple[int, int] | None:
        """Copy (or add) the sum stored at ``key`` into ``out``; (examples, count) or ``None``."""
        head = await self._redis.hmget(key, ["examples", "count", "sum_fields"])
        if head[0] is None:
            return None

        at = 0
        for k in range(int(head[2] or 1)):
            data = await self._redis.hget(key, _sum_field(k))
            if data is None:
                raise ValueError(f"partial sum {_text(key)} lacks its field {_sum_field(k)}")
            part = np.frombuffer(data, dtype="<i8")
            if at + part.size > out.size:
                raise ValueError(f"partial sum {_text(key)} holds more than {out.size} values")
            target = out[at : at + part.size]
            if add:
                target += part
            else:
                target[...] = part
            at += part.size
        if at != out.size:
            raise ValueError(f"partial sum {_text(key)} has {at} values, want {out.size}")
        return int(head[0]), int(head[1])


def _sum_field(k: int) -> str:
    return "sum" if k == 0 else f"sum.{k}"


def _text(value: bytes | str | int) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)

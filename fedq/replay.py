"""Replaying a finished round from the update archive, to audit or debug its model.

FedAvg replays use the workers' and the round manager's own arithmetic: an update
split into parts is reassembled and checked against its digest, weighed like the
workers weigh it (``workers.weights``: work done, staleness), turned into
``to_fixed_point(u, weight)``, and the mean of the integer sum takes the server's step
(``coordinator.rounds.server_optimizer``, with the round's stored momentum) before the
model is encoded as the manager encodes it. Only the update ids the round
applied (its ``applied`` hash in Redis) are counted, each once, so an intact archive
reproduces the recorded model digest bit for bit.

Which archived copy of an id is the round's: the archive may also hold copies from
an earlier federation that reused the round number and update id. The reader keeps
the complete copy accepted last, but none accepted after the round closed.

Robust rules (coordinate-wise median, trimmed mean) recompute the round's step from
the same updates, unweighted, for debugging; nothing is written back.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace

import numpy as np

from coordinator.rounds.server_optimizer import ServerOptimizer, decode_velocity
from fedq.archive import ArchiveError, UpdateArchive
from fedq.config import SettingsError
from fedq.queue.message import QueuedUpdate
from fedq.state import PartialSumStore, RoundStore, StoreUnavailableError, connect_redis
from fedq.state.partials import RoundSum, to_fixed_point
from fedq.state.rounds import FINALIZED, FederationRecord, RoundRecord
from fedq.tensors import ModelSpec
from proto.codec import decode_tensors, encode_tensors
from workers.weights import staleness_weight, work_weight

__all__ = ["RULES", "ReplayError", "ReplayResult", "replay_round", "robust_update"]

RULES = ("fedavg", "median", "trimmed-mean")
ARCHIVE_SLACK_S = 120.0  # clock skew allowed between gateways and the round manager


class ReplayError(RuntimeError):
    """The round cannot be replayed (not finished, model missing, nothing archived)."""


@dataclass(frozen=True)
class ReplayResult:
    """What a replay computed, next to what the round recorded."""

    round: int
    rule: str
    digest: str
    recorded_digest: str
    applied: int
    replayed: int
    examples: int
    missing: tuple[str, ...]
    l2_distance: float

    @property
    def matches(self) -> bool:
        """Whether the replayed model is bit-identical to the recorded one."""
        return self.digest == self.recorded_digest


async def replay_round(
    round_id: int,
    *,
    store: RoundStore,
    partials: PartialSumStore,
    archive: UpdateArchive,
    rule: str = "fedavg",
    trim: float = 0.1,
) -> ReplayResult:
    """Recompute round ``round_id``'s model from the archive with ``rule``.

    Raises:
        ReplayError: the round is not finalized, its models are gone, or a robust rule
            found no archived update.
    """
    _check_rule(rule, trim)
    federation, record = await _finished_round(store, round_id)
    applied = await partials.applied_ids(round_id)
    updates = await _applied_updates(archive, record, applied)

    start = await store.model(round_id)
    recorded = await store.model(round_id + 1)
    if start is None or recorded is None:
        raise ReplayError(f"round {round_id}: the models before and after it are not stored")
    if rule != "fedavg" and not updates:
        raise ReplayError(f"round {round_id}: no applied update is in the archive")

    ordered = [updates[uid] for uid in sorted(updates)]
    ordered = [replace(u, num_examples=await _weight(store, u)) for u in ordered]
    digest, distance = await asyncio.get_running_loop().run_in_executor(
        None,
        _recompute,
        start[0],
        recorded[0],
        federation.spec,
        ordered,
        rule,
        trim,
        ServerOptimizer(federation.server_learning_rate, federation.server_momentum),
        await store.velocity(round_id),
    )
    return ReplayResult(
        round=round_id,
        rule=rule,
        digest=digest,
        recorded_digest=record.next_digest,
        applied=len(applied),
        replayed=len(ordered),
        examples=sum(u.num_examples for u in ordered),
        missing=tuple(sorted(applied - updates.keys())),
        l2_distance=distance,
    )


def robust_update(updates: np.ndarray, rule: str, *, trim: float = 0.1) -> np.ndarray:
    """Coordinate-wise median or trimmed mean of stacked flat updates (one per row)."""
    _check_rule(rule, trim)
    if updates.ndim != 2 or updates.shape[0] == 0:
        raise ReplayError(f"{rule} needs at least one update, got shape {updates.shape}")
    if rule == "median":
        return np.median(updates, axis=0)

    cut = int(np.floor(trim * updates.shape[0]))
    ranked = np.sort(updates, axis=0)
    return ranked[cut : updates.shape[0] - cut].mean(axis=0)


async def run_replay_command(args: argparse.Namespace) -> int:
    """``fedq replay``: print the replayed digest and whether it matches; 1 on mismatch."""
    from coordinator.settings import ServiceUrls

    urls = ServiceUrls.from_env()
    redis_url = args.redis_url or urls.redis_url
    if not redis_url:
        raise SettingsError("replay reads the round from Redis: give --redis-url or FEDQ_REDIS_URL")
    if args.round_id < 1:
        raise SettingsError(f"--round {args.round_id}: expected a round number of at least 1")

    try:
        result = await _replay_from(
            args, redis_url=redis_url, amqp_url=args.amqp_url or urls.amqp_url
        )
    except (ReplayError, ArchiveError, StoreUnavailableError) as exc:
        print(f"fedq: replay: {exc}", file=sys.stderr)
        return 1

    print(describe(result))
    return 0 if result.matches or result.rule != "fedavg" else 1


async def _replay_from(args: argparse.Namespace, *, redis_url: str, amqp_url: str) -> ReplayResult:
    from fedq.archive import open_archive

    redis = await connect_redis(redis_url)
    try:
        async with await open_archive(amqp_url, idle_s=args.idle_s) as archive:
            return await replay_round(
                args.round_id,
                store=RoundStore(redis),
                partials=PartialSumStore(redis),
                archive=archive,
                rule=args.rule,
                trim=args.trim,
            )
    finally:
        await redis.aclose()


def describe(result: ReplayResult) -> str:
    """Human-readable lines about a replay."""
    lines = [
        f"round {result.round} ({result.rule}): {result.replayed} of {result.applied} applied "
        f"updates found in the archive, {result.examples} examples",
        f"recorded model {result.recorded_digest}",
        f"replayed model {result.digest}",
    ]
    if result.missing:
        lines.append(f"not in the archive: {', '.join(result.missing[:10])}")
    if result.rule == "fedavg":
        lines.append("match" if result.matches else "MISMATCH")
    else:
        lines.append(
            f"L2 distance to the recorded model: {result.l2_distance:.6g} (state unchanged)"
        )
    return "\n".join(lines)


def _check_rule(rule: str, trim: float) -> None:
    if rule not in RULES:
        raise ReplayError(f"unknown rule {rule!r}: expected one of {', '.join(RULES)}")
    if not 0.0 <= trim < 0.5:
        raise ReplayError(f"trim {trim}: expected a fraction in [0, 0.5)")


async def _finished_round(store: RoundStore, round_id: int) -> tuple[FederationRecord, RoundRecord]:
    federation = await store.federation()
    record = await store.round(round_id)
    if federation is None or record is None:
        raise ReplayError(f"round {round_id} does not exist in this federation")
    if record.status != FINALIZED or not record.next_digest:
        raise ReplayError(f"round {round_id} is {record.status}; only finalized rounds replay")
    return federation, record


async def _applied_updates(
    archive: UpdateArchive, record: RoundRecord, applied: set[str]
) -> dict[str, QueuedUpdate]:
    """The archived copy of each applied update id, parts joined (see the module docstring)."""
    latest = (record.closed_at or time.time()) + ARCHIVE_SLACK_S
    copies: dict[tuple[str, str, float], dict[int, QueuedUpdate]] = {}
    async for update in archive.read_round(record.round, since=record.opened_at - ARCHIVE_SLACK_S):
        if update.update_id not in applied or update.accepted_at > latest:
            continue
        # Parts of one update share its digest; a retried publish may stamp them anew.
        stamp = 0.0 if update.parts > 1 else update.accepted_at
        copies.setdefault((update.update_id, update.digest, stamp), {})[update.part] = update

    picked: dict[str, QueuedUpdate] = {}
    for parts in copies.values():
        whole = _joined(parts)
        if whole is None:
            continue
        known = picked.get(whole.update_id)
        if known is None or whole.accepted_at > known.accepted_at:
            picked[whole.update_id] = whole
    return picked


def _joined(parts: dict[int, QueuedUpdate]) -> QueuedUpdate | None:
    """One update from all of its parts, or None when some are missing or do not match."""
    first = next(iter(parts.values()))
    if first.parts == 1:
        return first
    if sorted(parts) != list(range(first.parts)):
        return None
    payload = b"".join(bytes(parts[i].payload) for i in range(first.parts))
    if hashlib.sha256(payload).hexdigest() != first.digest:
        return None
    accepted_at = max(p.accepted_at for p in parts.values())
    return replace(first, payload=payload, part=0, parts=1, accepted_at=accepted_at)


async def _weight(store: RoundStore, update: QueuedUpdate) -> int:
    """The update's integer weight in the round's sum, as the workers compute it."""
    weight = update.num_examples
    base = update.base_version or update.round
    if update.steps > 0:
        plan = await store.plan_for(base, update.client_id)
        planned = plan.local_steps if plan is not None else 0
        weight = work_weight(weight, steps_done=update.steps, planned_steps=planned)
    return staleness_weight(weight, staleness=update.round - base)


def _recompute(
    start_blob: bytes,
    recorded_blob: bytes,
    spec: ModelSpec,
    updates: list[QueuedUpdate],
    rule: str,
    trim: float,
    optimizer: ServerOptimizer,
    velocity_blob: bytes | None,
) -> tuple[str, float]:
    model_bytes = sum(t.nbytes for t in spec.tensors)
    start = decode_tensors(start_blob, max_bytes=model_bytes)
    flats = [
        spec.flatten_update(decode_tensors(u.payload, max_bytes=spec.update_nbytes, expected=spec))
        for u in updates
    ]

    if rule == "fedavg":
        total = np.zeros(spec.update_size, dtype=np.int64)
        for flat, update in zip(flats, updates, strict=True):
            total += to_fixed_point(flat, update.num_examples)
        examples = sum(u.num_examples for u in updates)
        mean = RoundSum(total, examples, len(updates)).mean_update()
    else:
        mean = robust_update(np.stack(flats), rule, trim=trim)
    velocity = decode_velocity(velocity_blob, size=spec.update_size)
    model = optimizer.step(start, spec, mean, velocity).model

    blob = encode_tensors(model)
    recorded = decode_tensors(recorded_blob, max_bytes=model_bytes)
    return hashlib.sha256(blob).hexdigest(), _distance(model, recorded, spec)


def _distance(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray], spec: ModelSpec) -> float:
    squares = sum(
        float(np.sum((a[t.name].astype(np.float64) - b[t.name].astype(np.float64)) ** 2))
        for t in spec.trainable
    )
    return float(np.sqrt(squares))

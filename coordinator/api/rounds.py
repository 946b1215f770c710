"""Federation progress and rounds: ``/v1/federation`` and ``/v1/rounds``."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from quart import Blueprint, request

from coordinator.api.context import api_context
from coordinator.api.errors import BadRequestError, NotFoundError
from coordinator.api.params import parse_int
from fedq.state import RoundRecord, RoundStore

__all__ = ["blueprint", "parse_round_id"]

log = logging.getLogger(__name__)

blueprint = Blueprint("rounds", __name__)

_BATCH = 32  # rounds read concurrently, bounding the Redis connections one request opens


@blueprint.get("/v1/federation")
async def federation() -> dict[str, Any]:
    """The federation's model, data set and progress."""
    record = await api_context().store.federation()
    if record is None:
        raise NotFoundError("no federation yet: the coordinator has not created one")
    return record.to_public()


@blueprint.get("/v1/rounds")
async def rounds() -> dict[str, Any]:
    """Every round so far in order, or the latest ``limit`` of them."""
    limit = parse_int("limit", request.args.get("limit"), minimum=1)
    found = await all_rounds(api_context().store, limit=limit)
    return {"rounds": [r.to_public() for r in found], "count": len(found)}


@blueprint.get("/v1/rounds/<raw_round>")
async def one_round(raw_round: str) -> dict[str, Any]:
    """One round: status, participants, update counts, deadline and test metrics."""
    round_id = parse_round_id(raw_round, name="round")
    record = await api_context().store.round(round_id)
    if record is None:
        raise NotFoundError(f"round {round_id} does not exist (it has not opened)")
    return record.to_public()


async def all_rounds(store: RoundStore, *, limit: int | None = None) -> list[RoundRecord]:
    """Rounds in order up to the current one (the latest ``limit`` of them if given)."""
    record = await store.federation()
    if record is None:
        return []

    # The round manager writes a new round before it advances ``current_round``, so look
    # one past it; that extra id is why one more than ``limit`` is read.
    ids = list(range(1, record.current_round + 2))
    if limit is not None:
        ids = ids[-(limit + 1) :]

    found: list[RoundRecord] = []
    for start in range(0, len(ids), _BATCH):
        batch = await asyncio.gather(*(store.round(r) for r in ids[start : start + _BATCH]))
        found.extend(r for r in batch if r is not None)
    return found[-limit:] if limit is not None else found


def parse_round_id(raw: str | None, *, name: str) -> int:
    """A round number from a path or query value: an integer of at least 1."""
    value = parse_int(name, raw, minimum=1)
    if value is None:
        raise BadRequestError(f"{name} is required")
    return value

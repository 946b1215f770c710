"""One embedded federation, timed round by round for the time-to-accuracy benchmark.

``run_federation`` records when each round opened and closed and how long each
client trained, but not when the next model was stored nor how long the transfers
took. This module adds both without changing what the federation does:

- an observer task (``observe_rounds``, which the process run uses on Redis too)
  reads the round records from the store every ``POLL_S`` seconds and stamps the
  first time it sees a round finalized (its next model stored) and evaluated;
- ``transfer_clock`` times the client's two transfer calls (``fetch_model``,
  ``submit``) for the length of the run and puts the originals back afterwards.

Times are ``time.time()`` seconds, the clock the round records use.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from clients.client import FederatedClient
from coordinator.settings import CoordinatorSettings, ServiceUrls
from fedq.federation import FederationOptions, FederationSummary, run_federation
from fedq.state import RoundStore, connect_redis

__all__ = [
    "POLL_S",
    "TimedFederation",
    "observe_rounds",
    "run_timed_federation",
    "transfer_clock",
]

POLL_S = 0.1


@dataclass
class TimedFederation:
    """A finished federation with the times the benchmark needs."""

    summary: FederationSummary
    started_at: float
    finished_at: float
    finalized_at: dict[int, float] = field(default_factory=dict)
    evaluated_at: dict[int, float] = field(default_factory=dict)
    transfers: list[dict[str, Any]] = field(default_factory=list)


async def run_timed_federation(
    settings: CoordinatorSettings, options: FederationOptions
) -> TimedFederation:
    """Run the embedded federation (no service URLs) with the observer and transfer clock."""
    started_at = time.time()
    finalized_at: dict[int, float] = {}
    evaluated_at: dict[int, float] = {}
    transfers: list[dict[str, Any]] = []

    observer = asyncio.create_task(_observe_embedded(finalized_at, evaluated_at, since=started_at))
    try:
        with transfer_clock(transfers):
            summary = await run_federation(settings, ServiceUrls(), options)
    finally:
        observer.cancel()
        await asyncio.gather(observer, return_exceptions=True)

    return TimedFederation(
        summary=summary,
        started_at=started_at,
        finished_at=time.time(),
        finalized_at=finalized_at,
        evaluated_at=evaluated_at,
        transfers=transfers,
    )


@contextmanager
def transfer_clock(records: list[dict[str, Any]]) -> Iterator[None]:
    """Time every ``fetch_model`` and ``submit`` of every client into ``records``."""
    fetch, submit = FederatedClient.fetch_model, FederatedClient.submit

    async def timed_fetch(self: FederatedClient, round_id: int, **kwargs: Any) -> bytes:
        started = time.perf_counter()
        blob = await fetch(self, round_id, **kwargs)
        _note(records, self, round_id, kind="fetch", started=started, nbytes=len(blob))
        return blob

    async def timed_submit(self: FederatedClient, round_id: int, **kwargs: Any) -> Any:
        started = time.perf_counter()
        reply = await submit(self, round_id, **kwargs)
        nbytes = len(kwargs.get("payload", b""))
        _note(records, self, round_id, kind="submit", started=started, nbytes=nbytes)
        return reply

    FederatedClient.fetch_model = timed_fetch  # type: ignore[method-assign]
    FederatedClient.submit = timed_submit  # type: ignore[method-assign]
    try:
        yield
    finally:
        FederatedClient.fetch_model = fetch  # type: ignore[method-assign]
        FederatedClient.submit = submit  # type: ignore[method-assign]


def _note(
    records: list[dict[str, Any]],
    client: FederatedClient,
    round_id: int,
    *,
    kind: str,
    started: float,
    nbytes: int,
) -> None:
    records.append(
        {
            "client": client.client_id,
            "round": round_id,
            "kind": kind,
            "seconds": time.perf_counter() - started,
            "bytes": nbytes,
        }
    )


async def observe_rounds(
    store: RoundStore,
    finalized_at: dict[int, float],
    evaluated_at: dict[int, float],
    *,
    since: float,
) -> None:
    """Stamp when each round opened after ``since`` is first seen finalized and evaluated.

    Polls ``store`` every ``POLL_S`` seconds until cancelled.
    """
    while True:
        await _stamp(store, finalized_at, evaluated_at, since=since)
        await asyncio.sleep(POLL_S)


async def _observe_embedded(
    finalized_at: dict[int, float], evaluated_at: dict[int, float], *, since: float
) -> None:
    redis = await connect_redis("")
    try:
        await observe_rounds(RoundStore(redis), finalized_at, evaluated_at, since=since)
    finally:
        await redis.aclose()


async def _stamp(
    store: RoundStore,
    finalized_at: dict[int, float],
    evaluated_at: dict[int, float],
    *,
    since: float,
) -> None:
    federation = await store.federation()
    if federation is None:
        return

    now = time.time()
    for round_id in range(1, federation.current_round + 1):
        if round_id in evaluated_at:
            continue
        record = await store.round(round_id)
        # Records of an earlier run in the same store are ignored until it is reset.
        if record is None or record.opened_at < since:
            continue
        if record.status == "finalized":
            finalized_at.setdefault(round_id, now)
            if record.accuracy is not None:
                evaluated_at[round_id] = now

"""One poller per gateway that follows the federation's round state in the store.

Every WatchRounds stream waits on this watcher instead of polling the store itself,
so a thousand watching clients cost one Redis read per poll interval.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from fedq.state import RoundStore

__all__ = ["RoundState", "RoundWatcher"]

log = logging.getLogger(__name__)

_TOUCH_EVERY_S = 5.0


@dataclass(frozen=True)
class RoundState:
    """What the watcher last saw."""

    round: int = 0
    round_status: str = ""
    federation_status: str = "waiting"
    deadline: float = 0.0
    model_digest: str = ""


class RoundWatcher:
    """Polls the store and wakes every waiting stream when the round state changes."""

    def __init__(self, store: RoundStore, *, poll_s: float) -> None:
        self._store = store
        self._poll_s = poll_s
        self._changed = asyncio.Condition()
        self._watching: dict[str, int] = {}
        self._last_touch = 0.0
        self.state = RoundState()
        self.version = 0

    async def run(self) -> None:
        """Poll until cancelled."""
        while True:
            try:
                await self._poll_once()
            except asyncio.CancelledError:
                raise
            except Exception:  # a store hiccup must not end the watcher
                log.warning("round watcher could not read the store; retrying", exc_info=True)
            await asyncio.sleep(self._poll_s)

    async def wait_change(self, seen_version: int, *, timeout_s: float) -> int:
        """Wait until the state differs from ``seen_version`` (or timeout); new version."""
        async with self._changed:
            try:
                await asyncio.wait_for(
                    self._changed.wait_for(lambda: self.version != seen_version), timeout_s
                )
            except TimeoutError:
                pass
            return self.version

    def add_watcher(self, client_id: str) -> None:
        """Count a client's open WatchRounds stream (keeps it marked alive)."""
        self._watching[client_id] = self._watching.get(client_id, 0) + 1

    def remove_watcher(self, client_id: str) -> None:
        """Forget one of a client's streams."""
        left = self._watching.get(client_id, 0) - 1
        if left <= 0:
            self._watching.pop(client_id, None)
        else:
            self._watching[client_id] = left

    async def _poll_once(self) -> None:
        federation = await self._store.federation()
        if federation is None:
            return
        record = (
            await self._store.round(federation.current_round) if federation.current_round else None
        )
        state = RoundState(
            round=federation.current_round,
            round_status=record.status if record else "",
            federation_status=federation.status,
            deadline=record.deadline if record else 0.0,
            model_digest=record.model_digest if record else "",
        )
        if state != self.state:
            self.state = state
            self.version += 1
            async with self._changed:
                self._changed.notify_all()

        if self._watching and time.monotonic() - self._last_touch > _TOUCH_EVERY_S:
            self._last_touch = time.monotonic()
            for client_id in list(self._watching):
                await self._store.touch_client(client_id)

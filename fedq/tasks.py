"""Stopping asyncio tasks reliably."""

from __future__ import annotations

import asyncio
import logging

__all__ = ["cancel_and_wait"]

log = logging.getLogger(__name__)


async def cancel_and_wait(*tasks: asyncio.Task[object], timeout_s: float = 10.0) -> None:
    """Cancel tasks and wait until they have ended.

    A cancellation can be absorbed by a library that races it against its own
    timeout (an ``asyncio.timeout`` inside a Redis call, say), leaving the task
    running; so the request is repeated until the task is done or ``timeout_s`` passes.
    """
    pending = {t for t in tasks if not t.done()}
    loop = asyncio.get_running_loop()
    give_up = loop.time() + timeout_s
    while pending and loop.time() < give_up:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=0.2)
    for task in pending:
        log.error("task %s did not stop within %.0fs", task.get_name(), timeout_s)

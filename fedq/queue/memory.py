"""In-process stand-in for the RabbitMQ update queue (embedded mode and tests).

It honours the same contract as the broker: a message stays queued until a
consumer acks it, unsettled messages go back to the queue when their consumer
stops, and a message delivered more than ``delivery_limit`` times is dead-lettered.
Nothing survives the process; that is what the real broker is for, except the
optional on-disk archive of published updates (the broker's archive stream here).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fedq.queue.base import (
    DeadLetter,
    DeadLetterOutcome,
    DeadLetterSelection,
    Delivery,
    QueueStats,
    QueueUnavailableError,
    UpdateQueue,
)
from fedq.queue.deadletters import (
    dead_letter_id,
    describe_dead_letter,
    missing_ids,
    requeue_headers,
    selects,
)

if TYPE_CHECKING:
    from fedq.archive.disk import DiskArchive

__all__ = ["MemoryQueue", "shared_memory_queue"]

log = logging.getLogger(__name__)

_SHARED: MemoryQueue | None = None


def shared_memory_queue() -> MemoryQueue:
    """The process-wide queue every embedded gateway and worker uses."""
    global _SHARED
    if _SHARED is None or _SHARED.closed:
        from fedq.archive import ArchiveSettings
        from fedq.archive.disk import DiskArchive

        _SHARED = MemoryQueue(archive=DiskArchive.from_settings(ArchiveSettings.from_env()))
    return _SHARED


@dataclass
class _Message:
    body: bytes
    message_id: str
    headers: dict[str, Any]
    deliveries: int = 0


@dataclass(eq=False)
class _Dead:
    message: _Message
    reason: str
    dead_at: float = field(default_factory=time.time)

    @property
    def letter_id(self) -> str:
        return dead_letter_id(self.message.message_id, self.message.body)

    def describe(self, *, detail: bool = False) -> DeadLetter:
        return describe_dead_letter(
            self.message.body,
            self.message.headers,
            message_id=self.message.message_id,
            reason=self.reason,
            dead_at=self.dead_at,
            detail=detail,
        )


@dataclass
class _MemoryDelivery(Delivery):
    queue: MemoryQueue
    message: _Message
    settled: bool = False
    body: bytes = field(init=False)
    message_id: str = field(init=False)
    headers: dict[str, Any] = field(init=False)
    redelivered: bool = field(init=False)

    def __post_init__(self) -> None:
        self.body = self.message.body
        self.message_id = self.message.message_id
        self.headers = self.message.headers
        self.redelivered = self.message.deliveries > 1

    async def ack(self) -> None:
        self._settle()

    async def nack(self, *, requeue: bool = True) -> None:
        self._settle()
        if requeue:
            self.queue._requeue(self.message)
        else:
            self.queue._dead.append(_Dead(self.message, "rejected"))

    def _settle(self) -> None:
        if self.settled:
            raise RuntimeError(f"message {self.message_id} was already settled")
        self.settled = True
        self.queue._unsettled.discard(id(self))


class MemoryQueue(UpdateQueue):
    """A FIFO with acks, redelivery and dead letters, inside one event loop."""

    def __init__(self, *, delivery_limit: int = 5, archive: DiskArchive | None = None) -> None:
        self._ready: deque[_Message] = deque()
        self._dead: list[_Dead] = []
        self._archive = archive
        self._unsettled: set[int] = set()
        self._arrived = asyncio.Event()
        self._consumers = 0
        self.delivery_limit = delivery_limit
        self.closed = False

    async def publish(self, body: bytes, *, message_id: str, headers: dict[str, Any]) -> None:
        if self.closed:
            raise QueueUnavailableError("the embedded queue is closed")
        if self._archive is not None:
            await self._archive.append(body)
        self._ready.append(_Message(bytes(body), message_id, dict(headers)))
        self._arrived.set()

    async def consume(self, *, prefetch: int) -> AsyncIterator[Delivery]:  # type: ignore[override]
        slots = asyncio.Semaphore(prefetch)
        mine: list[_MemoryDelivery] = []
        self._consumers += 1
        try:
            while not self.closed:
                await slots.acquire()
                message = await self._next()
                delivery = _MemoryDelivery(self, message)
                mine.append(delivery)
                self._unsettled.add(id(delivery))
                yield _Releasing(delivery, slots)
                mine = [d for d in mine if not d.settled]
        finally:
            self._consumers -= 1
            for delivery in mine:
                if not delivery.settled:
                    delivery.settled = True
                    self._requeue(delivery.message)

    async def dead_letter(self, delivery: Delivery, *, reason: str) -> None:
        inner = delivery.inner if isinstance(delivery, _Releasing) else delivery
        assert isinstance(inner, _MemoryDelivery)
        inner._settle()
        self._dead.append(_Dead(inner.message, reason))
        if isinstance(delivery, _Releasing):
            delivery.release()

    async def stats(self) -> QueueStats:
        return QueueStats(ready=len(self._ready), consumers=self._consumers, dead=len(self._dead))

    async def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        return [dead.describe() for dead in self._dead[:limit]]

    async def inspect_dead_letter(self, message_id: str) -> DeadLetter | None:
        for dead in self._dead:
            if dead.letter_id == message_id:
                return dead.describe(detail=True)
        return None

    async def requeue_dead_letters(self, message_ids: DeadLetterSelection) -> DeadLetterOutcome:
        chosen = [d for d in self._dead if selects(message_ids, d.letter_id)]
        for dead in chosen:
            message = dead.message
            await self.publish(
                message.body,
                message_id=message.message_id,
                headers=requeue_headers(message.headers),
            )
            self._dead.remove(dead)
        return self._outcome(message_ids, chosen)

    async def purge_dead_letters(self, message_ids: DeadLetterSelection) -> DeadLetterOutcome:
        chosen = [d for d in self._dead if selects(message_ids, d.letter_id)]
        self._dead = [d for d in self._dead if not any(d is c for c in chosen)]
        return self._outcome(message_ids, chosen)

    @staticmethod
    def _outcome(selection: DeadLetterSelection, chosen: list[_Dead]) -> DeadLetterOutcome:
        done = sorted({d.letter_id for d in chosen})
        return DeadLetterOutcome(done=done, missing=missing_ids(selection, done))

    async def close(self) -> None:
        self.closed = True
        self._arrived.set()

    async def _next(self) -> _Message:
        while True:
            if self._ready:
                message = self._ready.popleft()
                message.deliveries += 1
                return message
            if self.closed:
                raise asyncio.CancelledError
            self._arrived.clear()
            await self._arrived.wait()

    def _requeue(self, message: _Message) -> None:
        if message.deliveries >= self.delivery_limit:
            log.error(
                "update %s dead-lettered after %d deliveries",
                message.message_id,
                message.deliveries,
            )
            self._dead.append(_Dead(message, "delivery_limit"))
            return
        self._ready.appendleft(message)
        self._arrived.set()


class _Releasing(Delivery):
    """Wraps a delivery so settling it frees a prefetch slot."""

    def __init__(self, inner: _MemoryDelivery, slots: asyncio.Semaphore) -> None:
        self.inner = inner
        self._slots = slots
        self._released = False
        self.body = inner.body
        self.message_id = inner.message_id
        self.headers = inner.headers
        self.redelivered = inner.redelivered

    async def ack(self) -> None:
        await self.inner.ack()
        self.release()

    async def nack(self, *, requeue: bool = True) -> None:
        await self.inner.nack(requeue=requeue)
        self.release()

    def release(self) -> None:
        """Free the prefetch slot once."""
        if not self._released:
            self._released = True
            self._slots.release()

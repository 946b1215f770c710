"""In-process stand-in for the RabbitMQ update queue (embedded mode and tests).

It honours the same contract as the broker: a message stays queued until a
consumer acks it, unsettled messages go back to the queue when their consumer
stops, and a message delivered more than ``delivery_limit`` times is dead-lettered.
Nothing survives the process; that is what the real broker is for.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fedq.queue.base import DeadLetter, Delivery, QueueStats, QueueUnavailableError, UpdateQueue

__all__ = ["MemoryQueue", "shared_memory_queue"]

log = logging.getLogger(__name__)

_SHARED: MemoryQueue | None = None


def shared_memory_queue() -> MemoryQueue:
    """The process-wide queue every embedded gateway and worker uses."""
    global _SHARED
    if _SHARED is None or _SHARED.closed:
        _SHARED = MemoryQueue()
    return _SHARED


@dataclass
class _Message:
    body: bytes
    message_id: str
    headers: dict[str, Any]
    deliveries: int = 0


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
            self.queue._dead.append(DeadLetter(self.message_id, "rejected", self.headers))

    def _settle(self) -> None:
        if self.settled:
            raise RuntimeError(f"message {self.message_id} was already settled")
        self.settled = True
        self.queue._unsettled.discard(id(self))


class MemoryQueue(UpdateQueue):
    """A FIFO with acks, redelivery and dead letters, inside one event loop."""

    def __init__(self, *, delivery_limit: int = 5) -> None:
        self._ready: deque[_Message] = deque()
        self._dead: list[DeadLetter] = []
        self._unsettled: set[int] = set()
        self._arrived = asyncio.Event()
        self._consumers = 0
        self.delivery_limit = delivery_limit
        self.closed = False

    async def publish(self, body: bytes, *, message_id: str, headers: dict[str, Any]) -> None:
        if self.closed:
            raise QueueUnavailableError("the embedded queue is closed")
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
        self._dead.append(DeadLetter(inner.message_id, reason, inner.headers, len(inner.body)))
        if isinstance(delivery, _Releasing):
            delivery.release()

    async def stats(self) -> QueueStats:
        return QueueStats(ready=len(self._ready), consumers=self._consumers, dead=len(self._dead))

    def dead_letters(self) -> list[DeadLetter]:
        """The dead-lettered messages so far."""
        return list(self._dead)

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
            self._dead.append(DeadLetter(message.message_id, "delivery limit", message.headers))
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

"""The queue contract shared by the RabbitMQ queue and the in-process stand-in.

Contract:

* ``publish`` returns only once the message is durably queued (RabbitMQ: a
  publisher confirm for a persistent message on a durable quorum queue). On any
  failure it raises ``QueueUnavailableError`` and the caller must not acknowledge
  the update to its client.
* ``consume`` yields deliveries up to ``prefetch`` unacknowledged at once. A
  delivery that is neither acked nor dead-lettered when its consumer goes away is
  delivered again (``redelivered`` is then true).
* ``dead_letter`` moves a delivery to the dead-letter queue with a reason and
  removes it from the update queue.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

__all__ = ["DeadLetter", "Delivery", "QueueStats", "QueueUnavailableError", "UpdateQueue"]

UPDATES_EXCHANGE = "fedq.updates"
UPDATES_QUEUE = "fedq.updates"
DEAD_EXCHANGE = "fedq.dead"
DEAD_QUEUE = "fedq.updates.dead"
ROUTING_KEY = "update"


class QueueUnavailableError(RuntimeError):
    """The broker could not be reached or did not confirm a message."""


@dataclass
class QueueStats:
    """Depth of the update queue and how many consumers read it."""

    ready: int
    consumers: int
    dead: int = 0


@dataclass
class DeadLetter:
    """A message in the dead-letter queue."""

    message_id: str
    reason: str
    headers: dict[str, Any] = field(default_factory=dict)
    size: int = 0


class Delivery(abc.ABC):
    """One delivered message; settle it exactly once with ack, nack or dead_letter."""

    body: bytes
    message_id: str
    headers: dict[str, Any]
    redelivered: bool

    @abc.abstractmethod
    async def ack(self) -> None:
        """The message is fully processed; remove it from the queue."""

    @abc.abstractmethod
    async def nack(self, *, requeue: bool = True) -> None:
        """Give the message back (requeue) or drop it to the dead-letter exchange."""


class UpdateQueue(abc.ABC):
    """Durable queue of accepted updates between gateways and workers."""

    @abc.abstractmethod
    async def publish(self, body: bytes, *, message_id: str, headers: dict[str, Any]) -> None:
        """Queue one update; returns after the broker confirmed it."""

    @abc.abstractmethod
    def consume(self, *, prefetch: int) -> AsyncIterator[Delivery]:
        """Deliveries, at most ``prefetch`` unacknowledged at once."""

    @abc.abstractmethod
    async def dead_letter(self, delivery: Delivery, *, reason: str) -> None:
        """Move a delivery to the dead-letter queue, recording why."""

    @abc.abstractmethod
    async def stats(self) -> QueueStats:
        """Current depth and consumer count."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Release connections; calling it twice is harmless."""

    async def __aenter__(self) -> UpdateQueue:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

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
* ``dead_letters`` and ``inspect_dead_letter`` read the dead-letter queue without
  removing anything. ``requeue_dead_letters`` publishes the chosen dead letters to
  the update queue again (confirmed like ``publish``) and only then removes the dead
  copies; ``purge_dead_letters`` removes them. A dead letter is named by its message
  id, or ``sha256:<16 hex digits of its body>`` when it has none; copies that share
  an id are handled together.
"""

from __future__ import annotations

import abc
import enum
from collections.abc import AsyncIterator, Collection
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = [
    "ALL_DEAD_LETTERS",
    "DeadLetter",
    "DeadLetterOutcome",
    "DeadLetterSelection",
    "Delivery",
    "QueueStats",
    "QueueUnavailableError",
    "UpdateQueue",
]

UPDATES_EXCHANGE = "fedq.updates"
UPDATES_QUEUE = "fedq.updates"
DEAD_EXCHANGE = "fedq.dead"
DEAD_QUEUE = "fedq.updates.dead"
ROUTING_KEY = "update"
ARCHIVE_QUEUE = "fedq.updates.archive"  # stream of every update published (replay)

REASON_HEADER = "x-fedq-reason"  # why a worker dead-lettered a message
DEAD_AT_HEADER = "x-fedq-dead-at-ms"  # when it did (unix milliseconds, an integer)
REQUEUED_HEADER = "x-fedq-requeued"  # how often an operator requeued the message


class _Everything(enum.Enum):
    ALL = "all"


ALL_DEAD_LETTERS = _Everything.ALL
DeadLetterSelection = Collection[str] | Literal[_Everything.ALL]


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
    """A message in the dead-letter queue.

    ``round`` and ``client_id`` come from the decoded update (or the round header when
    the body does not decode); ``update`` is filled by ``inspect_dead_letter`` only.
    """

    message_id: str
    reason: str
    headers: dict[str, Any] = field(default_factory=dict)
    size: int = 0
    round: int | None = None
    client_id: str | None = None
    dead_at: float | None = None
    update: dict[str, Any] | None = None


@dataclass
class DeadLetterOutcome:
    """Which requested dead letters were handled and which were not found."""

    done: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)


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
    async def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        """Up to ``limit`` dead letters, oldest first, left in place."""

    @abc.abstractmethod
    async def inspect_dead_letter(self, message_id: str) -> DeadLetter | None:
        """One dead letter with headers and a decoded summary; None when there is none."""

    @abc.abstractmethod
    async def requeue_dead_letters(self, message_ids: DeadLetterSelection) -> DeadLetterOutcome:
        """Publish the chosen dead letters to the update exchange again, then drop them.

        Each copy is removed from the dead-letter queue only after the broker confirmed
        its republished copy, so a failure part-way leaves a duplicate, never a loss
        (workers count an update id once). Raises ``QueueUnavailableError`` on failure.
        """

    @abc.abstractmethod
    async def purge_dead_letters(self, message_ids: DeadLetterSelection) -> DeadLetterOutcome:
        """Delete the chosen dead letters for good."""

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

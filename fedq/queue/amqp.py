"""The update queue on RabbitMQ (aio-pika): durable quorum queue, publisher confirms.

Topology, declared idempotently by every process that connects:

* exchange ``fedq.updates`` (direct, durable) -> quorum queue ``fedq.updates`` with a
  delivery limit and dead-letter exchange ``fedq.dead``;
* exchange ``fedq.dead`` (fanout, durable) -> quorum queue ``fedq.updates.dead``;
* exchange ``fedq.updates`` -> stream ``fedq.updates.archive`` (retention from
  ``ArchiveSettings``), which keeps every published update for replays.

A publisher confirm arrives once every bound queue has the message, so it covers
the archive copy too.

Messages are persistent and published as mandatory, so a message that no queue
took fails the publish instead of vanishing.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import aio_pika
import aiormq
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractRobustConnection,
)

from fedq.archive.base import ArchiveSettings
from fedq.config import redact_url
from fedq.queue.base import (
    ARCHIVE_QUEUE,
    DEAD_AT_HEADER,
    DEAD_EXCHANGE,
    DEAD_QUEUE,
    REASON_HEADER,
    ROUTING_KEY,
    UPDATES_EXCHANGE,
    UPDATES_QUEUE,
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

__all__ = ["AmqpQueue"]

log = logging.getLogger(__name__)

SWEEP_MAX = 10_000  # dead letters one requeue, purge or lookup reads at most


class _AmqpDelivery(Delivery):
    def __init__(self, message: AbstractIncomingMessage) -> None:
        self.raw = message
        self.body = message.body
        self.message_id = message.message_id or ""
        self.headers = dict(message.headers or {})
        self.redelivered = bool(message.redelivered)

    async def ack(self) -> None:
        await self.raw.ack()

    async def nack(self, *, requeue: bool = True) -> None:
        await self.raw.nack(requeue=requeue)


class AmqpQueue(UpdateQueue):
    """Publishes and consumes updates on RabbitMQ."""

    def __init__(
        self,
        connection: AbstractRobustConnection,
        channel: AbstractChannel,
        exchange: AbstractExchange,
        *,
        delivery_limit: int,
        publish_timeout_s: float,
    ) -> None:
        self._connection = connection
        self._channel = channel
        self._exchange = exchange
        self._delivery_limit = delivery_limit
        self._publish_timeout_s = publish_timeout_s
        self._closed = False

    @classmethod
    async def connect(
        cls,
        url: str,
        *,
        delivery_limit: int = 5,
        publish_timeout_s: float = 30.0,
        archive: ArchiveSettings | None = None,
    ) -> AmqpQueue:
        """Connect, declare the topology and return a ready queue.

        ``archive`` sets the archive stream's retention (default: from ``FEDQ_ARCHIVE_*``).

        Raises:
            QueueUnavailableError: the broker is unreachable or refused the topology.
        """
        archive = archive or ArchiveSettings.from_env()
        try:
            connection = await aio_pika.connect_robust(url, timeout=10)
            channel = await connection.channel(publisher_confirms=True)
            exchange = await _declare(channel, delivery_limit=delivery_limit)
            await _declare_archive(connection, archive)
        except Exception as exc:
            raise QueueUnavailableError(f"RabbitMQ at {redact_url(url)}: {exc}") from exc

        log.info("connected to RabbitMQ at %s", redact_url(url))
        return cls(
            connection,
            channel,
            exchange,
            delivery_limit=delivery_limit,
            publish_timeout_s=publish_timeout_s,
        )

    async def publish(self, body: bytes, *, message_id: str, headers: dict[str, Any]) -> None:
        message = aio_pika.Message(
            body,
            message_id=message_id,
            headers=headers,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            content_type="application/x-msgpack",
        )
        try:
            confirm = await self._exchange.publish(
                message, routing_key=ROUTING_KEY, mandatory=True, timeout=self._publish_timeout_s
            )
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            raise QueueUnavailableError(
                f"broker did not confirm update {message_id}: {exc}"
            ) from exc
        if confirm is not None and type(confirm).__name__ not in ("Ack", "BasicAck"):
            raise QueueUnavailableError(f"broker refused update {message_id}: {confirm!r}")

    async def consume(self, *, prefetch: int) -> AsyncIterator[Delivery]:  # type: ignore[override]
        channel = await self._connection.channel()
        await channel.set_qos(prefetch_count=prefetch)
        queue = await channel.get_queue(UPDATES_QUEUE, ensure=True)
        try:
            async with queue.iterator() as messages:
                async for message in messages:
                    yield _AmqpDelivery(message)
        finally:
            if not channel.is_closed:
                await channel.close()

    async def dead_letter(self, delivery: Delivery, *, reason: str) -> None:
        assert isinstance(delivery, _AmqpDelivery)
        headers = {**delivery.headers, REASON_HEADER: reason[:500], DEAD_AT_HEADER: _now_ms()}
        dead = await self._channel.get_exchange(DEAD_EXCHANGE)
        await dead.publish(
            aio_pika.Message(
                delivery.body,
                message_id=delivery.message_id,
                headers=headers,
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            ),
            routing_key=ROUTING_KEY,
            timeout=self._publish_timeout_s,
        )
        # Acked only after the dead-letter copy was confirmed: a crash in between
        # leaves a duplicate dead letter, never a lost one.
        await delivery.ack()

    async def stats(self) -> QueueStats:
        channel = await self._connection.channel()
        try:
            updates = await channel.declare_queue(UPDATES_QUEUE, passive=True)
            dead = await channel.declare_queue(DEAD_QUEUE, passive=True)
            result, dead_result = updates.declaration_result, dead.declaration_result
            return QueueStats(
                ready=result.message_count or 0,
                consumers=result.consumer_count or 0,
                dead=dead_result.message_count or 0,
            )
        finally:
            await channel.close()

    async def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        found: list[DeadLetter] = []

        def keep(message: AbstractIncomingMessage) -> bool:
            found.append(_describe(message))
            return len(found) < limit

        await self._sweep(keep, limit=limit)
        return found

    async def inspect_dead_letter(self, message_id: str) -> DeadLetter | None:
        found: list[DeadLetter] = []

        def look(message: AbstractIncomingMessage) -> bool:
            if _letter_id(message) == message_id:
                found.append(_describe(message, detail=True))
            return not found

        await self._sweep(look, limit=SWEEP_MAX)
        return found[0] if found else None

    async def requeue_dead_letters(self, message_ids: DeadLetterSelection) -> DeadLetterOutcome:
        return await self._settle_dead(message_ids, requeue=True)

    async def purge_dead_letters(self, message_ids: DeadLetterSelection) -> DeadLetterOutcome:
        return await self._settle_dead(message_ids, requeue=False)

    async def _settle_dead(
        self, selection: DeadLetterSelection, *, requeue: bool
    ) -> DeadLetterOutcome:
        chosen: list[AbstractIncomingMessage] = []

        def pick(message: AbstractIncomingMessage) -> bool:
            if selects(selection, _letter_id(message)):
                chosen.append(message)
            return True

        done: set[str] = set()

        async def settle() -> None:
            for message in chosen:
                if requeue:
                    await self._republish(message)
                # The dead copy goes only after the new one was confirmed.
                await message.ack()
                done.add(_letter_id(message))

        await self._sweep(pick, limit=SWEEP_MAX, then=settle)
        log.info(
            "%s %d dead letters: %s",
            "requeued" if requeue else "purged",
            len(chosen),
            ", ".join(sorted(done)[:20]),
        )
        return DeadLetterOutcome(done=sorted(done), missing=missing_ids(selection, done))

    async def _republish(self, message: AbstractIncomingMessage) -> None:
        copy = aio_pika.Message(
            message.body,
            message_id=message.message_id,
            headers=requeue_headers(dict(message.headers or {})),
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            content_type=message.content_type or "application/x-msgpack",
        )
        confirm = await self._exchange.publish(
            copy, routing_key=ROUTING_KEY, mandatory=True, timeout=self._publish_timeout_s
        )
        if confirm is not None and type(confirm).__name__ not in ("Ack", "BasicAck"):
            raise QueueUnavailableError(
                f"broker refused requeued dead letter {_letter_id(message)}: {confirm!r}"
            )

    async def _sweep(
        self,
        visit: Callable[[AbstractIncomingMessage], bool],
        *,
        limit: int,
        then: Callable[[], Any] | None = None,
    ) -> None:
        """Fetch dead letters one by one, holding each, until ``visit`` says stop.

        Held messages stay unacknowledged on this channel, so none is fetched twice;
        ``then`` settles the ones it wants and the rest go back to the dead-letter
        queue (by the channel's close if anything failed).
        """
        channel = await self._connection.channel()
        held: list[AbstractIncomingMessage] = []
        try:
            queue = await channel.declare_queue(DEAD_QUEUE, passive=True)
            while len(held) < limit:
                message = await queue.get(no_ack=False, fail=False)
                if message is None:
                    break
                held.append(message)
                if not visit(message):
                    break
            if then is not None:
                await then()
            # Returned explicitly rather than by the close, so that the broker has them
            # back before a sweep that starts right after this one.
            for message in held:
                if not message.processed:
                    await message.nack(requeue=True)
        except asyncio.CancelledError:
            raise
        except QueueUnavailableError:
            raise
        except Exception as exc:
            raise QueueUnavailableError(f"dead-letter queue {DEAD_QUEUE}: {exc}") from exc
        finally:
            if not channel.is_closed:
                await channel.close()

    async def purge_updates(self) -> None:
        """Drop every queued update (tests and operators only)."""
        channel = await self._connection.channel()
        try:
            for name in (UPDATES_QUEUE, DEAD_QUEUE):
                queue = await channel.declare_queue(name, passive=True)
                await queue.purge()
        finally:
            await channel.close()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        await self._connection.close()


async def _declare(channel: AbstractChannel, *, delivery_limit: int) -> AbstractExchange:
    dead = await channel.declare_exchange(DEAD_EXCHANGE, aio_pika.ExchangeType.FANOUT, durable=True)
    dead_queue = await channel.declare_queue(
        DEAD_QUEUE, durable=True, arguments={"x-queue-type": "quorum"}
    )
    await dead_queue.bind(dead, routing_key="")

    exchange = await channel.declare_exchange(
        UPDATES_EXCHANGE, aio_pika.ExchangeType.DIRECT, durable=True
    )
    queue = await channel.declare_queue(
        UPDATES_QUEUE,
        durable=True,
        arguments={
            "x-queue-type": "quorum",
            "x-delivery-limit": delivery_limit,
            "x-dead-letter-exchange": DEAD_EXCHANGE,
        },
    )
    await queue.bind(exchange, routing_key=ROUTING_KEY)
    return exchange


async def _declare_archive(connection: AbstractRobustConnection, settings: ArchiveSettings) -> None:
    """Declare the archive stream and bind it to the update exchange.

    A stream that already exists with other retention arguments is kept as it is (a
    declaration cannot change them); an operator deletes it to apply new ones.
    """
    arguments: dict[str, Any] = {
        "x-queue-type": "stream",
        "x-max-length-bytes": settings.max_bytes,
        "x-max-age": settings.max_age,
    }
    channel = await connection.channel()
    try:
        queue = await channel.declare_queue(ARCHIVE_QUEUE, durable=True, arguments=arguments)
        await queue.bind(UPDATES_EXCHANGE, routing_key=ROUTING_KEY)
    except aiormq.exceptions.ChannelPreconditionFailed as exc:
        log.warning("archive stream %s kept with its own retention: %s", ARCHIVE_QUEUE, exc)
        await _bind_existing_archive(connection)
    finally:
        await channel.close()


async def _bind_existing_archive(connection: AbstractRobustConnection) -> None:
    channel = await connection.channel()
    try:
        queue = await channel.declare_queue(ARCHIVE_QUEUE, passive=True)
        await queue.bind(UPDATES_EXCHANGE, routing_key=ROUTING_KEY)
    finally:
        await channel.close()


def _now_ms() -> int:
    # NOTE: an integer, because AMQP field tables carry Python floats as 32-bit floats,
    # which would round a unix time to about two minutes.
    return int(time.time() * 1000)


def _letter_id(message: AbstractIncomingMessage) -> str:
    return dead_letter_id(message.message_id, message.body)


def _describe(message: AbstractIncomingMessage, *, detail: bool = False) -> DeadLetter:
    return describe_dead_letter(
        message.body, dict(message.headers or {}), message_id=message.message_id, detail=detail
    )

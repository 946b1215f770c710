"""The update queue on RabbitMQ (aio-pika): durable quorum queue, publisher confirms.

Topology, declared idempotently by every process that connects:

* exchange ``fedq.updates`` (direct, durable) -> quorum queue ``fedq.updates`` with a
  delivery limit and dead-letter exchange ``fedq.dead``;
* exchange ``fedq.dead`` (fanout, durable) -> quorum queue ``fedq.updates.dead``.

Messages are persistent and published as mandatory, so a message that no queue
took fails the publish instead of vanishing.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import aio_pika
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractRobustConnection,
)

from fedq.queue.base import (
    DEAD_EXCHANGE,
    DEAD_QUEUE,
    ROUTING_KEY,
    UPDATES_EXCHANGE,
    UPDATES_QUEUE,
    DeadLetter,
    Delivery,
    QueueStats,
    QueueUnavailableError,
    UpdateQueue,
)

__all__ = ["AmqpQueue"]

log = logging.getLogger(__name__)

REASON_HEADER = "x-fedq-reason"


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
        cls, url: str, *, delivery_limit: int = 5, publish_timeout_s: float = 30.0
    ) -> AmqpQueue:
        """Connect, declare the topology and return a ready queue.

        Raises:
            QueueUnavailableError: the broker is unreachable or refused the topology.
        """
        try:
            connection = await aio_pika.connect_robust(url, timeout=10)
            channel = await connection.channel(publisher_confirms=True)
            exchange = await _declare(channel, delivery_limit=delivery_limit)
        except Exception as exc:
            raise QueueUnavailableError(f"RabbitMQ at {_redact(url)}: {exc}") from exc

        log.info("connected to RabbitMQ at %s", _redact(url))
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
        headers = {**delivery.headers, REASON_HEADER: reason[:500]}
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

    async def dead_letters(self, *, limit: int = 100) -> list[DeadLetter]:
        """Peek at dead letters (fetched and requeued, so they stay)."""
        channel = await self._connection.channel()
        out: list[DeadLetter] = []
        try:
            queue = await channel.declare_queue(DEAD_QUEUE, passive=True)
            held = []
            while len(out) < limit:
                message = await queue.get(no_ack=False, fail=False)
                if message is None:
                    break
                held.append(message)
                headers = dict(message.headers or {})
                out.append(
                    DeadLetter(
                        message_id=message.message_id or "",
                        reason=str(headers.get(REASON_HEADER) or _death_reason(headers)),
                        headers={k: v for k, v in headers.items() if k != "x-death"},
                        size=len(message.body),
                    )
                )
            for message in held:
                await message.nack(requeue=True)
        finally:
            await channel.close()
        return out

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


def _death_reason(headers: dict[str, Any]) -> str:
    deaths = headers.get("x-death") or []
    if deaths and isinstance(deaths[0], dict):
        return str(deaths[0].get("reason", "dead-lettered"))
    return "dead-lettered"


def _redact(url: str) -> str:
    if "@" not in url:
        return url
    scheme, rest = url.split("://", 1)
    return f"{scheme}://***@{rest.rsplit('@', 1)[1]}"

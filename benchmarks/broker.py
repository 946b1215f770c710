"""A fresh quorum queue and a consumer that acks what arrives, for the broker ceilings."""

from __future__ import annotations

import asyncio

import aio_pika
import aio_pika.abc

__all__ = ["AckingConsumer", "fresh_quorum_queue"]


async def fresh_quorum_queue(
    channel: aio_pika.abc.AbstractChannel, name: str
) -> aio_pika.abc.AbstractQueue:
    """An empty durable quorum queue ``name``: the queues fedq's updates travel on."""
    await channel.queue_delete(name)
    return await channel.declare_queue(name, durable=True, arguments={"x-queue-type": "quorum"})


class AckingConsumer:
    """Acks every message of one queue on its own channel, until ``expected`` were acked."""

    def __init__(self, expected: int) -> None:
        self._expected = expected
        self._acked = 0
        self._done = asyncio.Event()
        self._channel: aio_pika.abc.AbstractChannel | None = None

    async def start(
        self, connection: aio_pika.abc.AbstractConnection, queue: str, *, prefetch: int
    ) -> None:
        """Start consuming ``queue`` with ``prefetch`` messages in flight."""
        self._channel = await connection.channel()
        await self._channel.set_qos(prefetch_count=prefetch)
        await (await self._channel.get_queue(queue)).consume(self._on_message)

    async def wait(self, *, timeout_s: float) -> None:
        """Return once ``expected`` messages were acked."""
        await asyncio.wait_for(self._done.wait(), timeout=timeout_s)

    async def close(self) -> None:
        """Stop consuming; call it before deleting the queue, so the broker cancels nothing."""
        if self._channel is not None:
            await self._channel.close()

    async def _on_message(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        await message.ack()
        self._acked += 1
        if self._acked == self._expected:
            self._done.set()

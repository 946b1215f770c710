"""The archive on RabbitMQ: the ``fedq.updates.archive`` stream, read from an offset.

The stream is bound to the update exchange next to the work queue (``AmqpQueue``
declares it), so a publisher confirm covers both copies. Reading attaches a consumer
with ``x-stream-offset`` (a timestamp when ``since`` is given, else ``first``),
acknowledges every message to keep credit flowing, and stops once no message came
for ``idle_s``: a stream reports no message count over AMQP, so a quiet consumer is
the sign that it has caught up with the end.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
from collections.abc import AsyncIterator

import aio_pika
from aio_pika.abc import AbstractConnection, AbstractIncomingMessage

from fedq.archive.base import ArchiveError, UpdateArchive
from fedq.queue.base import ARCHIVE_QUEUE
from fedq.queue.message import MessageError, QueuedUpdate

__all__ = ["StreamArchive"]

log = logging.getLogger(__name__)


class StreamArchive(UpdateArchive):
    """Reads the archive stream of one broker."""

    def __init__(
        self,
        connection: AbstractConnection,
        *,
        idle_s: float = 1.0,
        prefetch: int = 64,
        owns_connection: bool = False,
    ) -> None:
        if idle_s <= 0 or prefetch < 1:
            raise ValueError(f"idle_s ({idle_s}) must be > 0 and prefetch ({prefetch}) >= 1")
        self._connection = connection
        self._idle_s = idle_s
        self._prefetch = prefetch
        self._owns_connection = owns_connection
        self._closed = False

    @classmethod
    async def connect(cls, url: str, *, idle_s: float = 1.0, prefetch: int = 64) -> StreamArchive:
        """Connect to the broker at ``url``.

        Raises:
            ArchiveError: the broker is unreachable.
        """
        try:
            connection = await aio_pika.connect(url, timeout=10)
        except Exception as exc:
            raise ArchiveError(f"RabbitMQ unreachable for the archive: {exc}") from exc
        return cls(connection, idle_s=idle_s, prefetch=prefetch, owns_connection=True)

    async def read_round(  # type: ignore[override]
        self, round_id: int, *, since: float | None = None
    ) -> AsyncIterator[QueuedUpdate]:
        channel, queue = await self._open()
        arrived: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()
        offset: object = "first"
        if since is not None:
            offset = datetime.datetime.fromtimestamp(since, tz=datetime.UTC)
        try:
            await queue.consume(arrived.put, arguments={"x-stream-offset": offset})  # type: ignore[arg-type]
            while True:
                try:
                    message = await asyncio.wait_for(arrived.get(), self._idle_s)
                except TimeoutError:
                    break
                await message.ack()
                update = _decode(message)
                if update is not None and update.round == round_id:
                    yield update
        finally:
            if not channel.is_closed:
                await channel.close()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._owns_connection:
            await self._connection.close()

    async def _open(self) -> tuple[aio_pika.abc.AbstractChannel, aio_pika.abc.AbstractQueue]:
        try:
            channel = await self._connection.channel()
            await channel.set_qos(prefetch_count=self._prefetch)
        except Exception as exc:
            raise ArchiveError(f"cannot open a channel to read the archive: {exc}") from exc
        try:
            queue = await channel.declare_queue(ARCHIVE_QUEUE, passive=True)
        except Exception as exc:
            raise ArchiveError(
                f"archive stream {ARCHIVE_QUEUE} not found ({exc}); it is declared when a "
                "gateway or worker connects to RabbitMQ 3.9 or later"
            ) from exc
        return channel, queue


def _decode(message: AbstractIncomingMessage) -> QueuedUpdate | None:
    try:
        return QueuedUpdate.decode(message.body)
    except MessageError as exc:
        offset = (message.headers or {}).get("x-stream-offset")
        log.debug("archive offset %s is no update; skipped: %s", offset, exc)
        return None

"""The update queue: RabbitMQ in deployment, an in-process stand-in when embedded."""

from fedq.queue.base import Delivery, QueueStats, QueueUnavailableError, UpdateQueue

__all__ = ["Delivery", "QueueStats", "QueueUnavailableError", "UpdateQueue", "open_queue"]


async def open_queue(url: str | None, **options: object) -> UpdateQueue:
    """Open the AMQP queue at ``url``, or the embedded stand-in when no URL is given."""
    if not url:
        from fedq.queue.memory import shared_memory_queue

        return shared_memory_queue()

    from fedq.queue.amqp import AmqpQueue

    return await AmqpQueue.connect(url, **options)  # type: ignore[arg-type]

"""Entry point of an aggregator worker (settings from the environment)."""

from __future__ import annotations

import asyncio
import logging
import signal

from coordinator.settings import ServiceUrls
from fedq.config import SettingsError
from fedq.metrics import serve_metrics
from fedq.queue import open_queue
from fedq.state import connect_redis
from fedq.tasks import cancel_and_wait
from workers.consumer import AggregationWorker
from workers.settings import WorkerSettings

__all__ = ["run_worker"]

log = logging.getLogger(__name__)


async def run_worker() -> None:
    """Consume updates until SIGTERM, then stop taking work and leave."""
    settings, urls = WorkerSettings.from_env(), ServiceUrls.from_env()
    if not urls.amqp_url or not urls.redis_url:
        raise SettingsError("FEDQ_AMQP_URL and FEDQ_REDIS_URL must be set for a worker")

    serve_metrics(settings.metrics_port)
    redis = await connect_redis(urls.redis_url)
    queue = await open_queue(urls.amqp_url, delivery_limit=urls.delivery_limit)
    worker = AggregationWorker(queue=queue, redis=redis, settings=settings)
    task = asyncio.create_task(worker.run(), name="worker")

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: asyncio.ensure_future(cancel_and_wait(task)))
    try:
        await task
    except asyncio.CancelledError:
        pass
    finally:
        await queue.close()
        await redis.aclose()

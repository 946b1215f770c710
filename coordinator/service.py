"""Entry points of the coordinator and gateway services (settings from the environment)."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket

from coordinator.gateway import GatewayServer
from coordinator.privacy import PrivacyLedger
from coordinator.rounds import RoundManager
from coordinator.rounds.leader import LeaderLease
from coordinator.settings import CoordinatorSettings, GatewaySettings, ServiceUrls
from fedq.metrics import serve_metrics
from fedq.queue import UpdateQueue, open_queue
from fedq.state import PartialSumStore, RoundStore, connect_redis
from fedq.tasks import cancel_and_wait

__all__ = ["run_coordinator", "run_gateway"]

log = logging.getLogger(__name__)


async def run_coordinator() -> None:
    """Round manager plus REST API, until SIGTERM or the federation finishes."""
    from coordinator.api.server import ApiServer
    from fedq.datasets import load_dataset
    from fedq.evaluation import evaluate
    from fedq.models import build_model, default_model_for, make_dp_compatible, model_arrays

    settings, urls = CoordinatorSettings.from_env(), ServiceUrls.from_env()
    _require_urls(urls)
    redis = await connect_redis(urls.redis_url)
    queue = await open_queue(urls.amqp_url, delivery_limit=urls.delivery_limit)
    store = RoundStore(redis)
    ledger = PrivacyLedger(
        redis,
        delta=settings.delta,
        default_budget=settings.epsilon_budget,
        accountant=settings.accountant,
    )

    model_name = settings.model or default_model_for(settings.dataset)
    evaluator = None
    if settings.evaluate:
        test_data = load_dataset(settings.dataset, root=settings.data_dir or None, train=False)
        evaluator = lambda arrays: evaluate(model_name, arrays, test_data)  # noqa: E731
    lease = LeaderLease(
        redis, owner=f"{socket.gethostname()}-{os.getpid()}", ttl_s=settings.leader_ttl_s
    )
    manager = RoundManager(
        store=RoundStore(redis),
        partials=PartialSumStore(redis),
        settings=settings,
        ledger=ledger,
        evaluator=evaluator,
        lease=lease,
    )
    initial_model = build_model(model_name, seed=settings.seed)
    if settings.plan.dp_mode != "none":
        # Clients train the DP-compatible variant (e.g. GroupNorm for BatchNorm).
        initial_model = make_dp_compatible(initial_model)
    await manager.ensure_federation(model_name=model_name, initial=model_arrays(initial_model))

    api = ApiServer(
        host=settings.api_host,
        port=settings.api_port,
        store=store,
        ledger=ledger,
        queue=queue,
        settings=settings,
    )
    await api.start()
    publisher = _start_backlog_publisher(queue)
    stop = _stop_event()
    try:
        await manager.run(stop=stop)
        log.info("federation finished; REST API stays up until stopped")
        await stop.wait()
    finally:
        if publisher is not None:
            await cancel_and_wait(publisher)
        await api.stop()
        await queue.close()
        await redis.aclose()


def _start_backlog_publisher(queue: UpdateQueue) -> asyncio.Task[None] | None:
    """Publish backlog per worker to CloudWatch when FEDQ_CLOUDWATCH_NAMESPACE is set."""
    from coordinator.autoscale import AutoscaleSettings, BacklogPublisher

    settings = AutoscaleSettings.from_env()
    if not settings.enabled:
        return None
    publisher = BacklogPublisher(settings)
    log.info("publishing backlog per worker to CloudWatch namespace %s", settings.namespace)
    return asyncio.create_task(publisher.run(queue), name="backlog-publisher")


async def run_gateway() -> None:
    """A gRPC gateway, until SIGTERM."""
    settings, urls = GatewaySettings.from_env(), ServiceUrls.from_env()
    coordinator = CoordinatorSettings.from_env()
    _require_urls(urls)
    serve_metrics(settings.metrics_port)
    redis = await connect_redis(urls.redis_url)
    queue = await open_queue(urls.amqp_url, delivery_limit=urls.delivery_limit)
    ledger = PrivacyLedger(
        redis,
        delta=coordinator.delta,
        default_budget=coordinator.epsilon_budget,
        accountant=coordinator.accountant,
    )
    server = GatewayServer(store=RoundStore(redis), queue=queue, settings=settings, ledger=ledger)
    await server.start()
    try:
        await _stop_event().wait()
    finally:
        await server.stop()
        await queue.close()
        await redis.aclose()


def _require_urls(urls: ServiceUrls) -> None:
    from fedq.config import SettingsError

    if not urls.amqp_url or not urls.redis_url:
        raise SettingsError(
            "FEDQ_AMQP_URL and FEDQ_REDIS_URL must be set for a standalone service "
            "(embedded stand-ins exist only inside `fedq run`)"
        )


def _stop_event() -> asyncio.Event:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop

"""Operations endpoints: health, readiness, queue depth and Prometheus metrics."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
from quart import Blueprint, Response

import fedq.metrics  # noqa: F401  (registers the shared metrics this endpoint exports)
from coordinator.api.context import api_context
from coordinator.api.errors import DependencyError
from coordinator.api.metrics import record_privacy, record_queue
from coordinator.privacy import PrivacyLedgerError
from fedq.queue import QueueStats, QueueUnavailableError

__all__ = ["blueprint"]

log = logging.getLogger(__name__)

blueprint = Blueprint("ops", __name__)

CHECK_TIMEOUT_S = 3.0


@blueprint.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is up and serving."""
    return {"status": "ok"}


@blueprint.get("/readyz")
async def readyz() -> tuple[dict[str, Any], int]:
    """Redis answers PING and the broker reports the queue; 503 naming what failed."""
    ctx = api_context()
    checks = {
        "redis": await _check("redis", ctx.store.redis.ping()),
        "queue": await _check("queue", ctx.queue.stats()),
    }
    failed = [name for name, result in checks.items() if result != "ok"]
    if not failed:
        return {"status": "ready", "checks": checks}, 200

    error = "not ready: " + ", ".join(f"{name} unavailable" for name in failed)
    return {"status": "unavailable", "error": error, "checks": checks}, 503


@blueprint.get("/v1/queue")
async def queue() -> dict[str, Any]:
    """Updates waiting, consuming workers, backlog per worker and dead letters."""
    stats = await _queue_stats()
    backlog = record_queue(stats)
    return {
        "ready": stats.ready,
        "consumers": stats.consumers,
        "backlog_per_worker": backlog,
        "dead": stats.dead,
    }


@blueprint.get("/metrics")
async def metrics() -> Response:
    """Every metric of this process in the Prometheus text format."""
    ctx = api_context()
    try:
        record_queue(await _queue_stats())
    except DependencyError as exc:
        log.debug("queue gauges not refreshed: %s", exc)
    try:
        await record_privacy(ctx.ledger)
    except PrivacyLedgerError as exc:
        log.debug("ε gauges not refreshed: %s", exc)

    return Response(generate_latest(REGISTRY), content_type=CONTENT_TYPE_LATEST)


async def _queue_stats() -> QueueStats:
    try:
        return await asyncio.wait_for(api_context().queue.stats(), CHECK_TIMEOUT_S)
    except (QueueUnavailableError, TimeoutError, OSError) as exc:
        log.warning("queue stats failed: %r", exc)
        raise DependencyError("message broker unavailable: queue stats could not be read") from exc
    except Exception as exc:  # broker client errors are not converted below this edge
        log.warning("queue stats failed: %r", exc)
        raise DependencyError("message broker unavailable: queue stats could not be read") from exc


async def _check(name: str, probe: Awaitable[Any]) -> str:
    """Await ``probe`` with a timeout: "ok", "timeout" or "error" (details go to the log)."""
    try:
        await asyncio.wait_for(probe, CHECK_TIMEOUT_S)
    except TimeoutError:
        log.warning("readiness: %s gave no answer within %gs", name, CHECK_TIMEOUT_S)
        return "timeout"
    except Exception as exc:  # readiness must report any failure, whatever its type
        log.warning("readiness: %s failed: %r", name, exc)
        return "error"
    return "ok"

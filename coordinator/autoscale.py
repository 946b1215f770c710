"""Publish the update backlog to CloudWatch so an auto-scaling group can follow it.

The worker group scales on ``BacklogPerWorker``: updates ready in the queue per
consuming worker. A target-tracking policy keeps it near a target, adding workers
when updates pile up and removing them when the queue drains; on Kubernetes KEDA
reads the same signal straight from RabbitMQ. ``QueueDepth`` goes beside it for
dashboards and alarms. Both carry one dimension, ``Federation``, so several
federations can share a namespace.

Publishing is off unless ``FEDQ_CLOUDWATCH_NAMESPACE`` is set. boto3 is imported
only when a publisher is built, so services that never publish do not need it.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fedq.config import EnvReader, SettingsError
from fedq.queue.base import QueueStats, UpdateQueue

__all__ = [
    "BACKLOG_METRIC",
    "DEPTH_METRIC",
    "FEDERATION_DIMENSION",
    "AutoscaleSettings",
    "BacklogPublisher",
    "MetricsPublishError",
    "backlog_per_worker",
]

log = logging.getLogger(__name__)

BACKLOG_METRIC = "BacklogPerWorker"
DEPTH_METRIC = "QueueDepth"
FEDERATION_DIMENSION = "Federation"
_MAX_NAMESPACE_CHARS = 255
_MAX_DIMENSION_VALUE_CHARS = 1024


class MetricsPublishError(RuntimeError):
    """CloudWatch could not be reached or refused the metric data."""


@dataclass(frozen=True)
class AutoscaleSettings:
    """Where the backlog metrics go; an empty namespace turns publishing off."""

    namespace: str = ""
    interval_s: float = 60.0
    federation: str = "fedq"
    region: str = ""  # empty: boto3's own lookup (AWS_DEFAULT_REGION, ~/.aws/config)

    def __post_init__(self) -> None:
        if self.namespace.startswith("AWS/") or len(self.namespace) > _MAX_NAMESPACE_CHARS:
            raise SettingsError(
                f"FEDQ_CLOUDWATCH_NAMESPACE={self.namespace!r}: expected at most "
                f"{_MAX_NAMESPACE_CHARS} characters, not starting with 'AWS/'"
            )
        if not self.federation or len(self.federation) > _MAX_DIMENSION_VALUE_CHARS:
            raise SettingsError(
                f"FEDQ_FEDERATION_NAME={self.federation!r}: expected 1 to "
                f"{_MAX_DIMENSION_VALUE_CHARS} characters"
            )
        if self.interval_s <= 0:
            raise SettingsError(f"FEDQ_CLOUDWATCH_INTERVAL_S={self.interval_s}: expected > 0")

    @property
    def enabled(self) -> bool:
        """Whether a namespace was given."""
        return bool(self.namespace)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> AutoscaleSettings:
        """Read ``FEDQ_CLOUDWATCH_*``, ``FEDQ_FEDERATION_NAME`` and ``AWS_REGION``.

        ``AWS_REGION`` keeps the name every AWS tool uses (it is not a ``FEDQ_``
        variable), so it is read from the same mapping the ``EnvReader`` wraps.
        """
        environ = os.environ if environ is None else environ
        env = EnvReader(environ)
        return cls(
            namespace=env.str("CLOUDWATCH_NAMESPACE", "").strip(),
            interval_s=env.float("CLOUDWATCH_INTERVAL_S", 60.0, minimum=1.0),
            federation=env.str("FEDERATION_NAME", "fedq").strip(),
            region=environ.get("AWS_REGION", "").strip(),
        )


def backlog_per_worker(stats: QueueStats) -> float:
    """Ready updates per consumer; with no consumer the whole backlog counts for one."""
    return stats.ready / max(stats.consumers, 1)


class BacklogPublisher:
    """Sends ``BacklogPerWorker`` and ``QueueDepth`` to CloudWatch, once or on a timer."""

    def __init__(self, settings: AutoscaleSettings, *, client: Any | None = None) -> None:
        if not settings.enabled:
            raise SettingsError("FEDQ_CLOUDWATCH_NAMESPACE is empty: backlog publishing is off")
        self._settings = settings
        self._client = client if client is not None else _cloudwatch_client(settings.region)
        self._dimensions = [{"Name": FEDERATION_DIMENSION, "Value": settings.federation}]

    async def publish_once(self, stats: QueueStats) -> float:
        """Publish one sample of both metrics and return the backlog per worker.

        Raises:
            MetricsPublishError: CloudWatch was unreachable or refused the data.
        """
        backlog = backlog_per_worker(stats)
        data = [
            self._datum(BACKLOG_METRIC, backlog),
            self._datum(DEPTH_METRIC, float(stats.ready)),
        ]

        # boto3 is blocking; a slow endpoint must not stall rounds on the event loop.
        await asyncio.to_thread(self._put, data)

        log.debug(
            "%s: published %s=%.2f (%d ready, %d consumers)",
            self._settings.federation,
            BACKLOG_METRIC,
            backlog,
            stats.ready,
            stats.consumers,
        )
        return backlog

    async def run(self, queue: UpdateQueue, interval_s: float | None = None) -> None:
        """Publish every ``interval_s`` until cancelled; a failed sample is logged and skipped."""
        interval_s = self._settings.interval_s if interval_s is None else interval_s
        if interval_s <= 0:
            raise ValueError(f"interval_s={interval_s}: expected > 0")

        log.info(
            "%s: publishing %s to CloudWatch namespace %s every %.0f s",
            self._settings.federation,
            BACKLOG_METRIC,
            self._settings.namespace,
            interval_s,
        )
        failures = 0
        while True:
            try:
                await self.publish_once(await queue.stats())
            except Exception as exc:  # noqa: BLE001 - the loop must outlive broker and AWS outages
                failures += 1
                log.warning(
                    "%s: backlog not published (%d in a row): %s",
                    self._settings.federation,
                    failures,
                    exc,
                )
                log.debug("backlog publishing failure", exc_info=True)
            else:
                if failures:
                    log.info(
                        "%s: backlog publishing recovered after %d failures",
                        self._settings.federation,
                        failures,
                    )
                failures = 0
            await asyncio.sleep(interval_s)

    def close(self) -> None:
        """Release the HTTP connections of the client; calling it twice is harmless."""
        close = getattr(self._client, "close", None)
        if close is not None:
            close()

    async def __aenter__(self) -> BacklogPublisher:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    def _datum(self, name: str, value: float) -> dict[str, Any]:
        return {"MetricName": name, "Dimensions": self._dimensions, "Value": value, "Unit": "Count"}

    def _put(self, data: list[dict[str, Any]]) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self._client.put_metric_data(Namespace=self._settings.namespace, MetricData=data)
        except (BotoCoreError, ClientError) as exc:
            raise MetricsPublishError(
                f"PutMetricData to namespace {self._settings.namespace!r} failed: {exc}"
            ) from exc


def _cloudwatch_client(region: str) -> Any:
    try:
        import boto3
    except ImportError as exc:
        raise SettingsError(
            "FEDQ_CLOUDWATCH_NAMESPACE is set but boto3 is not installed (pip install boto3)"
        ) from exc
    from botocore.exceptions import NoRegionError

    try:
        return boto3.client("cloudwatch", region_name=region or None)
    except NoRegionError as exc:
        raise SettingsError(
            "FEDQ_CLOUDWATCH_NAMESPACE is set but no AWS region is: set AWS_REGION"
        ) from exc

"""Backlog publishing to CloudWatch, against moto's in-process AWS."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import boto3
import pytest
from botocore.exceptions import ClientError
from moto import mock_aws

from coordinator.autoscale import (
    BACKLOG_METRIC,
    DEPTH_METRIC,
    AutoscaleSettings,
    BacklogPublisher,
    MetricsPublishError,
    backlog_per_worker,
)
from fedq.config import SettingsError
from fedq.queue.base import QueueStats, QueueUnavailableError

REGION = "eu-west-1"
NAMESPACE = "fedq"
FEDERATION = "mnist-test"


@pytest.fixture
def aws(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """A CloudWatch client on moto, with fake credentials so nothing real is touched."""
    for name, value in (
        ("AWS_ACCESS_KEY_ID", "testing"),
        ("AWS_SECRET_ACCESS_KEY", "testing"),
        ("AWS_SESSION_TOKEN", "testing"),
        ("AWS_DEFAULT_REGION", REGION),
    ):
        monkeypatch.setenv(name, value)
    with mock_aws():
        yield boto3.client("cloudwatch", region_name=REGION)


@pytest.fixture
def settings() -> AutoscaleSettings:
    return AutoscaleSettings(
        namespace=NAMESPACE, interval_s=60, federation=FEDERATION, region=REGION
    )


class _Queue:
    """Answers ``stats()`` from a script; an exception in it is raised instead."""

    def __init__(self, *answers: QueueStats | Exception) -> None:
        self._answers = list(answers)
        self.calls = 0

    async def stats(self) -> QueueStats:
        self.calls += 1
        answer = self._answers[min(self.calls, len(self._answers)) - 1]
        if isinstance(answer, Exception):
            raise answer
        return answer


class _FailingOnceClient:
    """A CloudWatch client whose first ``put_metric_data`` is throttled."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.calls = 0

    def put_metric_data(self, **kwargs: Any) -> Any:
        self.calls += 1
        if self.calls == 1:
            error = {"Error": {"Code": "Throttling", "Message": "Rate exceeded"}}
            raise ClientError(error, "PutMetricData")
        return self._inner.put_metric_data(**kwargs)


def _average(cloudwatch: Any, metric: str) -> float:
    now = datetime.now(UTC)
    answer = cloudwatch.get_metric_statistics(
        Namespace=NAMESPACE,
        MetricName=metric,
        Dimensions=[{"Name": "Federation", "Value": FEDERATION}],
        StartTime=now - timedelta(minutes=5),
        EndTime=now + timedelta(minutes=5),
        Period=60,
        Statistics=["Average"],
    )
    points = answer["Datapoints"]
    assert points, f"no datapoints for {metric}"
    return points[0]["Average"]


async def _wait_until(condition: Any, *, timeout_s: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


def test_settings_are_off_by_default_and_read_from_the_environment() -> None:
    assert not AutoscaleSettings.from_env({}).enabled

    settings = AutoscaleSettings.from_env(
        {
            "FEDQ_CLOUDWATCH_NAMESPACE": "fedq",
            "FEDQ_CLOUDWATCH_INTERVAL_S": "30",
            "FEDQ_FEDERATION_NAME": "prod",
            "AWS_REGION": "us-east-2",
        }
    )

    assert settings == AutoscaleSettings(
        namespace="fedq", interval_s=30.0, federation="prod", region="us-east-2"
    )
    assert settings.enabled


@pytest.mark.parametrize(
    "environ",
    [
        {"FEDQ_CLOUDWATCH_NAMESPACE": "AWS/SQS"},
        {"FEDQ_CLOUDWATCH_INTERVAL_S": "0.5"},
        {"FEDQ_FEDERATION_NAME": " "},
    ],
)
def test_unusable_settings_stop_the_service_at_start(environ: dict[str, str]) -> None:
    with pytest.raises(SettingsError):
        AutoscaleSettings.from_env(environ)


def test_a_publisher_needs_a_namespace() -> None:
    with pytest.raises(SettingsError, match="FEDQ_CLOUDWATCH_NAMESPACE"):
        BacklogPublisher(AutoscaleSettings())


def test_backlog_per_worker_counts_zero_consumers_as_one() -> None:
    assert backlog_per_worker(QueueStats(ready=12, consumers=4)) == 3.0
    assert backlog_per_worker(QueueStats(ready=12, consumers=0)) == 12.0
    assert backlog_per_worker(QueueStats(ready=0, consumers=0)) == 0.0


async def test_published_backlog_lands_with_the_federation_dimension(aws, settings) -> None:
    publisher = BacklogPublisher(settings)

    backlog = await publisher.publish_once(QueueStats(ready=30, consumers=3))

    assert backlog == 10.0
    assert _average(aws, BACKLOG_METRIC) == pytest.approx(10.0)
    assert _average(aws, DEPTH_METRIC) == pytest.approx(30.0)
    listed = aws.list_metrics(Namespace=NAMESPACE, MetricName=BACKLOG_METRIC)["Metrics"]
    assert listed[0]["Dimensions"] == [{"Name": "Federation", "Value": FEDERATION}]


async def test_zero_consumers_publish_the_whole_backlog(aws, settings) -> None:
    publisher = BacklogPublisher(settings)

    await publisher.publish_once(QueueStats(ready=7, consumers=0))

    assert _average(aws, BACKLOG_METRIC) == pytest.approx(7.0)


async def test_a_refused_put_is_converted_to_our_error(aws, settings) -> None:
    publisher = BacklogPublisher(settings, client=_FailingOnceClient(aws))

    with pytest.raises(MetricsPublishError, match="Throttling"):
        await publisher.publish_once(QueueStats(ready=1, consumers=1))


async def test_the_loop_survives_broker_and_cloudwatch_errors(aws, settings) -> None:
    client = _FailingOnceClient(aws)
    publisher = BacklogPublisher(settings, client=client)
    queue = _Queue(QueueUnavailableError("broker down"), QueueStats(ready=8, consumers=2))

    task = asyncio.create_task(publisher.run(queue, 0.01))
    await _wait_until(lambda: client.calls >= 3)
    task.cancel()

    with pytest.raises(asyncio.CancelledError):
        await task
    assert queue.calls >= 3  # the broker failure and the throttled put were both skipped
    assert _average(aws, BACKLOG_METRIC) == pytest.approx(4.0)


async def test_closing_twice_is_harmless(aws, settings) -> None:
    async with BacklogPublisher(settings) as publisher:
        await publisher.publish_once(QueueStats(ready=0, consumers=1))

    publisher.close()

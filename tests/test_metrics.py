"""Prometheus metrics are exposed by every service and change while a federation runs."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
import urllib.request

import grpc
import pytest
from prometheus_client import REGISTRY

from tests.conftest import REPO_ROOT
from tests.support import start_stack, submit, update_for


def _sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


async def test_gateway_counters_follow_accepted_and_rejected_updates(redis, queue):
    stack = await start_stack(redis, queue, clients=["a", "b"])
    accepted, rejected = (
        _sample("fedq_updates_accepted_total"),
        _sample("fedq_updates_rejected_total", reason="auth"),
    )
    try:
        await submit(stack, "a", update_for(stack.initial, seed=1), update_id="a-1")
        stack.tokens["b"] = "wrong"
        with pytest.raises(grpc.aio.AioRpcError):
            await submit(stack, "b", update_for(stack.initial, seed=2), update_id="b-1")
    finally:
        await stack.close()

    assert _sample("fedq_updates_accepted_total") == accepted + 1
    assert _sample("fedq_updates_rejected_total", reason="auth") == rejected + 1


async def test_a_worker_process_serves_metrics_that_count_its_commits(
    redis, queue, redis_url, amqp_url
):
    port = _free_port()
    env = {
        **os.environ,
        "FEDQ_REDIS_URL": redis_url,
        "FEDQ_AMQP_URL": amqp_url,
        "FEDQ_METRICS_PORT": str(port),
        "FEDQ_WORKER_FLUSH_S": "0.05",
        "PYTHONPATH": str(REPO_ROOT),
    }
    worker = subprocess.Popen(
        [sys.executable, "-m", "fedq.cli", "worker"],
        env=env,
        cwd=REPO_ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    stack = await start_stack(redis, queue, clients=["a", "b", "c"])
    try:
        before = await _scrape_when_up(port)
        for c in ("a", "b", "c"):
            await submit(stack, c, update_for(stack.initial, seed=3), update_id=f"{c}-1")
        deadline = time.monotonic() + 60
        while _scrape(port).get("fedq_updates_aggregated_total", 0) < 3:
            assert time.monotonic() < deadline, "worker metrics never counted the updates"
            await asyncio.sleep(0.2)
        after = _scrape(port)
    finally:
        worker.terminate()
        worker.wait(10)
        await stack.close()

    assert before["fedq_updates_aggregated_total"] == 0
    assert after["fedq_updates_aggregated_total"] == 3
    assert after["fedq_aggregation_seconds_count"] >= 1


async def _scrape_when_up(port: int) -> dict[str, float]:
    deadline = time.monotonic() + 60
    while True:
        try:
            return _scrape(port)
        except OSError:
            assert time.monotonic() < deadline, "worker never served /metrics"
            await asyncio.sleep(0.2)

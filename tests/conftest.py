"""Shared pytest fixtures: data folder, real RabbitMQ and Redis, a running gateway."""

from __future__ import annotations

import os
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlparse

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
REDIS_URL = os.environ.get("FEDQ_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
AMQP_URL = os.environ.get("FEDQ_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")


def _unavailable(what: str) -> None:
    """Skip locally, fail under CI: there the services must be up."""
    if os.environ.get("CI"):
        pytest.fail(f"{what} is required under CI but unavailable")
    pytest.skip(f"{what} unavailable")


def _reachable(url: str) -> bool:
    parsed = urlparse(url)
    try:
        with socket.create_connection((parsed.hostname, parsed.port), timeout=2):
            return True
    except OSError:
        return False


@pytest.fixture(scope="session")
def data_root() -> Path:
    """Read-only data sets: ``$FEDQ_TEST_DATA``, else ``../shared/data`` next to the repo."""
    root = Path(os.environ.get("FEDQ_TEST_DATA", REPO_ROOT.parent / "shared" / "data"))
    if not (root / "MNIST" / "raw").is_dir():
        _unavailable(f"test data under {root} (set FEDQ_TEST_DATA)")
    return root


@pytest.fixture(scope="session")
def redis_url() -> str:
    """URL of the real Redis."""
    if not _reachable(REDIS_URL):
        _unavailable(f"Redis at {REDIS_URL}")
    return REDIS_URL


@pytest.fixture(scope="session")
def amqp_url() -> str:
    """URL of the real RabbitMQ."""
    if not _reachable(AMQP_URL):
        _unavailable(f"RabbitMQ at {AMQP_URL}")
    return AMQP_URL


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[object]:
    """A client on the real Redis with every fedq key removed before and after."""
    from fedq.state import connect_redis
    from fedq.state.rounds import reset_federation

    client = await connect_redis(redis_url)
    await reset_federation(client)
    yield client
    await reset_federation(client)
    await client.aclose()


@pytest.fixture
async def queue(amqp_url: str) -> AsyncIterator[object]:
    """The real RabbitMQ update queue, purged before and after."""
    from fedq.queue.amqp import AmqpQueue

    q = await AmqpQueue.connect(amqp_url)
    await q.purge_updates()
    yield q
    await q.purge_updates()
    await q.close()

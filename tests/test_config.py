"""Configuration from the environment: invalid values stop a service with a clear message."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from clients.service import ClientSettings
from coordinator.settings import CoordinatorSettings, GatewaySettings, ServiceUrls
from fedq.config import EnvReader, SettingsError
from tests.conftest import REPO_ROOT
from workers.settings import WorkerSettings

BAD = [
    (CoordinatorSettings, {"FEDQ_ROUNDS": "three"}, "FEDQ_ROUNDS='three': expected an integer"),
    (CoordinatorSettings, {"FEDQ_ROUNDS": "0"}, "FEDQ_ROUNDS=0: expected an integer >= 1"),
    (CoordinatorSettings, {"FEDQ_DP_MODE": "strong"}, "FEDQ_DP_MODE='strong': expected one of"),
    (CoordinatorSettings, {"FEDQ_DELTA": "2"}, "FEDQ_DELTA=2.0: expected a number in"),
    (CoordinatorSettings, {"FEDQ_EVALUATE": "perhaps"}, "FEDQ_EVALUATE='perhaps'"),
    (CoordinatorSettings, {"FEDQ_QUORUM_FRACTION": "1.5"}, "FEDQ_QUORUM_FRACTION=1.5"),
    (GatewaySettings, {"FEDQ_GRPC_PORT": "port"}, "FEDQ_GRPC_PORT='port'"),
    (GatewaySettings, {"FEDQ_CHUNK_BYTES": "100"}, "FEDQ_CHUNK_BYTES=100"),
    (WorkerSettings, {"FEDQ_WORKER_FLUSH_S": "-1"}, "FEDQ_WORKER_FLUSH_S=-1.0"),
    (WorkerSettings, {"FEDQ_WORKER_BATCH_UPDATES": "0"}, "FEDQ_WORKER_BATCH_UPDATES=0"),
    (ServiceUrls, {"FEDQ_DELIVERY_LIMIT": "0"}, "FEDQ_DELIVERY_LIMIT=0"),
]


@pytest.mark.parametrize(
    ("settings", "environ", "message"),
    BAD,
    ids=[next(iter(e)) + "=" + next(iter(e.values())) for _, e, _ in BAD],
)
def test_an_invalid_value_names_the_variable_and_what_was_expected(settings, environ, message):
    with pytest.raises(SettingsError) as caught:
        settings.from_env(EnvReader(environ))

    assert message in str(caught.value)


def test_defaults_hold_when_nothing_is_set():
    coordinator = CoordinatorSettings.from_env(EnvReader({}))
    gateway = GatewaySettings.from_env(EnvReader({}))

    assert coordinator.plan.dp_mode == "sample" and coordinator.delta == 1e-5
    assert gateway.port == 50051


def test_secrets_do_not_appear_in_reprs():
    settings = CoordinatorSettings.from_env(EnvReader({"FEDQ_ADMIN_TOKEN": "s3cret"}))
    urls = ServiceUrls.from_env(EnvReader({"FEDQ_AMQP_URL": "amqp://u:pw@host:5672/"}))

    assert "s3cret" not in repr(settings)
    assert "pw" not in repr(urls)


def test_a_client_partition_outside_the_partitions_is_refused():
    with pytest.raises(SettingsError, match="partition index 3 is outside 0..1"):
        ClientSettings.from_env(
            EnvReader(
                {
                    "FEDQ_CLIENT_ID": "c",
                    "FEDQ_CLIENT_PARTITIONS": "2",
                    "FEDQ_CLIENT_PARTITION_INDEX": "3",
                }
            )
        )


@pytest.mark.parametrize("service", ["worker", "gateway", "coordinator"])
def test_a_service_with_a_bad_setting_exits_at_start_naming_the_variable(service):
    env = {
        **os.environ,
        "FEDQ_WORKER_BATCH_UPDATES": "lots",
        "FEDQ_GRPC_PORT": "x",
        "FEDQ_ROUNDS": "-2",
        "PYTHONPATH": str(REPO_ROOT),
    }

    done = subprocess.run(
        [sys.executable, "-m", "fedq.cli", service],
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert done.returncode == 2
    assert "configuration error: FEDQ_" in done.stderr


def test_a_standalone_service_without_urls_says_what_to_set():
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDQ_")}
    env["PYTHONPATH"] = str(REPO_ROOT)

    done = subprocess.run(
        [sys.executable, "-m", "fedq.cli", "worker"],
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert done.returncode == 2
    assert "FEDQ_AMQP_URL and FEDQ_REDIS_URL must be set" in done.stderr

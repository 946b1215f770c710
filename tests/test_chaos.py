"""Chaos: kill a worker, a gateway and the leading coordinator, restart RabbitMQ and Redis.

Every service runs as its own process against a Redis (append-only file on, fsync
always, as deployed) and a RabbitMQ node started for this test on other ports.
Clients send updates that depend only on (client, round), so the model the
federation must end with is computed here directly, and the one it ends with after
all the faults has to be bit-identical to it.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from coordinator.privacy import Charge, epsilon
from coordinator.rounds.aggregation import apply_mean_update
from fedq.models import build_model, model_arrays
from fedq.state.partials import RoundSum, to_fixed_point
from fedq.tensors import ModelSpec
from proto.codec import decode_tensors
from tests.chaos_clients import EXAMPLES, client_update
from tests.conftest import REPO_ROOT, _unavailable

REDIS_PORT, AMQP_PORT, DIST_PORT = 6391, 5691, 25691
NODE = "fedqchaos@localhost"
CLIENTS, ROUNDS = 8, 5


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


async def _async_port_open(port: int) -> bool:
    return await asyncio.to_thread(_port_open, port)


def _wait_port(port: int, *, timeout_s: float, up: bool = True) -> None:
    deadline = time.monotonic() + timeout_s
    while _port_open(port) != up:
        if time.monotonic() > deadline:
            raise TimeoutError(f"port {port} not {'up' if up else 'down'} after {timeout_s}s")
        time.sleep(0.2)


class PrivateRedis:
    """A Redis with its append-only file on, in a folder of its own."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def start(self) -> None:
        subprocess.run(
            [
                "redis-server",
                "--daemonize",
                "yes",
                "--bind",
                "127.0.0.1",
                "--port",
                str(REDIS_PORT),
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--save",
                "",
                "--dir",
                str(self.folder),
                "--logfile",
                str(self.folder / "redis.log"),
            ],
            check=True,
        )
        _wait_port(REDIS_PORT, timeout_s=20)

    def stop(self) -> None:
        subprocess.run(["redis-cli", "-p", str(REDIS_PORT), "shutdown"], capture_output=True)
        _wait_port(REDIS_PORT, timeout_s=20, up=False)


class PrivateRabbit:
    """A RabbitMQ node of its own (name, ports and data folder)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        (folder / "enabled_plugins").write_text("[].\n")
        (folder / "rabbitmq.conf").write_text(f"listeners.tcp.default = {AMQP_PORT}\n")
        shutil.chown(folder, "rabbitmq", "rabbitmq")
        for item in folder.iterdir():
            shutil.chown(item, "rabbitmq", "rabbitmq")
        self.env = {
            **os.environ,
            "RABBITMQ_NODENAME": NODE,
            "RABBITMQ_NODE_PORT": str(AMQP_PORT),
            "RABBITMQ_DIST_PORT": str(DIST_PORT),
            "RABBITMQ_MNESIA_BASE": str(folder / "mnesia"),
            "RABBITMQ_LOG_BASE": str(folder / "log"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(folder / "enabled_plugins"),
            "RABBITMQ_CONFIG_FILE": str(folder / "rabbitmq"),
            "RABBITMQ_PID_FILE": str(folder / "pid"),
        }

    def start(self) -> None:
        subprocess.run(["rabbitmq-server", "-detached"], env=self.env, check=True)
        _wait_port(AMQP_PORT, timeout_s=90)

    def restart_app(self) -> None:
        """Stop and start the broker application: every connection drops."""
        self._ctl("stop_app")
        _wait_port(AMQP_PORT, timeout_s=30, up=False)
        time.sleep(1.0)
        self._ctl("start_app")
        _wait_port(AMQP_PORT, timeout_s=60)

    def stop(self) -> None:
        self._ctl("stop")

    def _ctl(self, *args: str) -> None:
        subprocess.run(
            ["rabbitmqctl", "-n", NODE, *args], env=self.env, capture_output=True, timeout=120
        )


@pytest.fixture
def services(tmp_path: Path) -> Iterator[tuple[PrivateRedis, PrivateRabbit]]:
    if not (shutil.which("redis-server") and shutil.which("rabbitmq-server")):
        _unavailable("redis-server and rabbitmq-server binaries for the chaos test")
    if _port_open(REDIS_PORT) or _port_open(AMQP_PORT):
        pytest.fail(f"ports {REDIS_PORT}/{AMQP_PORT} are taken; a chaos run may be left over")
    (tmp_path / "redis").mkdir()
    # The broker runs as the rabbitmq user, which cannot enter pytest's private tmp_path.
    rabbit_folder = Path(tempfile.mkdtemp(prefix="fedq-chaos-rabbit-"))
    rabbit_folder.chmod(0o755)
    redis_server, rabbit = PrivateRedis(tmp_path / "redis"), PrivateRabbit(rabbit_folder)
    redis_server.start()
    try:
        rabbit.start()
    except Exception:
        redis_server.stop()
        raise
    try:
        yield redis_server, rabbit
    finally:
        rabbit.stop()
        redis_server.stop()
        shutil.rmtree(rabbit_folder, ignore_errors=True)


class Processes:
    """The federation's service processes, with logs kept for a failing run."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.running: dict[str, subprocess.Popen[bytes]] = {}
        self.env = {
            **os.environ,
            "PYTHONPATH": str(REPO_ROOT),
            "FEDQ_REDIS_URL": f"redis://127.0.0.1:{REDIS_PORT}/0",
            "FEDQ_AMQP_URL": f"amqp://guest:guest@127.0.0.1:{AMQP_PORT}/",
            "FEDQ_ROUNDS": str(ROUNDS),
            "FEDQ_CLIENTS_PER_ROUND": str(CLIENTS),
            "FEDQ_QUORUM_FRACTION": "1.0",
            "FEDQ_ROUND_TIMEOUT_S": "300",
            "FEDQ_EVALUATE": "false",
            "FEDQ_DP_MODE": "sample",
            # Lossless, so the expected model can be computed here from the raw updates.
            "FEDQ_CODEC": "blosc2",
            "FEDQ_LOCAL_STEPS": "5",
            "FEDQ_EPSILON_BUDGET": "1000",
            "FEDQ_LEADER_TTL_S": "5",
            "FEDQ_METRICS_PORT": "0",
            "FEDQ_WORKER_FLUSH_S": "0.1",
            "FEDQ_WORKER_BATCH_UPDATES": "2",
            "FEDQ_API_HOST": "127.0.0.1",
            "FEDQ_GRPC_HOST": "127.0.0.1",
        }

    def start(self, name: str, *command: str, **env: str) -> None:
        log = open(self.folder / f"{name}.log", "ab")  # noqa: SIM115 - closed with the process
        self.running[name] = subprocess.Popen(
            [sys.executable, "-m", *command],
            env={**self.env, **env},
            cwd=REPO_ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
        )

    def check_alive(self) -> None:
        """Fail at once, with its log, when a service died by itself."""
        for name, process in self.running.items():
            if process.poll() is not None and name != "clients":
                tail = (self.folder / f"{name}.log").read_text(errors="replace")[-3000:]
                pytest.fail(f"{name} exited with {process.returncode}:\n{tail}")

    def kill(self, name: str) -> None:
        process = self.running.pop(name)
        process.send_signal(signal.SIGKILL)
        process.wait()

    def stop_all(self) -> None:
        for process in self.running.values():
            if process.poll() is None:
                process.terminate()
        for process in self.running.values():
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()


class Monitor:
    """Reads the federation's state, riding out the Redis restart."""

    def __init__(self, procs: Processes) -> None:
        self.redis = aioredis.Redis(port=REDIS_PORT, socket_connect_timeout=2)
        self.procs = procs

    async def read(self, command: str, *args: object) -> object:
        for _ in range(200):
            try:
                return await self.redis.execute_command(command, *args)
            except (RedisError, OSError):
                await asyncio.sleep(0.2)
        raise TimeoutError(f"Redis did not answer {command}")

    async def current_round(self) -> int:
        return int(await self.read("HGET", "fedq:federation", "current_round") or 0)

    async def round_field(self, round_id: int, name: str) -> str:
        raw = await self.read("HGET", f"fedq:round:{{{round_id}}}", name)
        return raw.decode() if raw else ""

    async def accepted(self, round_id: int) -> int:
        return int(await self.read("SCARD", f"fedq:round:{{{round_id}}}:accepted"))

    async def wait_for(self, what: str, check, *, timeout_s: float = 180.0) -> None:  # noqa: ANN001
        deadline = time.monotonic() + timeout_s
        while not await check():
            self.procs.check_alive()
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out waiting for {what}")
            await asyncio.sleep(0.1)

    async def mid_round(self, round_id: int) -> None:
        """Wait until round ``round_id`` is open and has some but not all updates."""

        async def ready() -> bool:
            return (
                await self.current_round() == round_id
                and await self.round_field(round_id, "status") == "open"
                and await self.accepted(round_id) >= 1
            )

        await self.wait_for(f"round {round_id} in progress", ready)


def _expected_final_model() -> dict[str, np.ndarray]:
    arrays = model_arrays(build_model("mnist_cnn", seed=0))
    spec = ModelSpec.from_arrays(arrays)
    for round_id in range(1, ROUNDS + 1):
        total = np.zeros(spec.update_size, dtype=np.int64)
        for i in range(CLIENTS):
            total += to_fixed_point(
                spec.flatten_update(client_update(i, round_id, arrays)), EXAMPLES
            )
        arrays = apply_mean_update(arrays, spec, RoundSum(total, EXAMPLES * CLIENTS, CLIENTS))
    return arrays


async def test_the_federation_survives_every_fault_with_a_bit_identical_model(
    services, tmp_path: Path
):
    redis_server, rabbit = services
    procs = Processes(tmp_path)
    monitor = Monitor(procs)
    try:
        procs.start("coordinator-a", "fedq.cli", "coordinator", FEDQ_API_PORT="18181")
        procs.start("coordinator-b", "fedq.cli", "coordinator", FEDQ_API_PORT="18182")
        procs.start("gateway-1", "fedq.cli", "gateway", FEDQ_GRPC_PORT="18251")
        procs.start("gateway-2", "fedq.cli", "gateway", FEDQ_GRPC_PORT="18252")
        procs.start("worker-1", "fedq.cli", "worker")
        procs.start("worker-2", "fedq.cli", "worker")
        for port in (18251, 18252, 18181):
            await monitor.wait_for(
                f"port {port}", lambda p=port: _async_port_open(p), timeout_s=300
            )
        procs.start(
            "clients",
            "tests.chaos_clients",
            "--gateways",
            "127.0.0.1:18251,127.0.0.1:18252",
            "--clients",
            str(CLIENTS),
            "--work-s",
            "1.5",
        )

        await monitor.mid_round(1)
        procs.kill("worker-1")
        procs.start("worker-3", "fedq.cli", "worker")

        await monitor.mid_round(2)
        procs.kill("gateway-1")

        await monitor.mid_round(3)
        leader = (await monitor.read("GET", "fedq:leader")).decode()
        victim = next(
            n
            for n, p in procs.running.items()
            if n.startswith("coordinator") and leader.endswith(f"-{p.pid}")
        )
        procs.kill(victim)

        await monitor.mid_round(4)
        await asyncio.to_thread(rabbit.restart_app)

        await monitor.mid_round(5)
        await asyncio.to_thread(redis_server.stop)
        await asyncio.to_thread(redis_server.start)

        async def finished() -> bool:
            return await monitor.read("HGET", "fedq:federation", "status") == b"finished"

        await monitor.wait_for("the federation to finish", finished, timeout_s=300)

        rounds = [await monitor.round_field(r, "status") for r in range(1, ROUNDS + 1)]
        aggregated = [int(await monitor.round_field(r, "aggregated")) for r in range(1, ROUNDS + 1)]
        examples = [int(await monitor.round_field(r, "examples")) for r in range(1, ROUNDS + 1)]
        blob = await monitor.read("GET", f"fedq:model:{ROUNDS + 1}")
        ledgers = {i: await monitor.read("HLEN", f"fedq:ledger:chaos-{i}") for i in range(CLIENTS)}
    finally:
        procs.stop_all()
        await monitor.redis.aclose()

    assert rounds == ["finalized"] * ROUNDS
    assert aggregated == [CLIENTS] * ROUNDS, "an update was lost or counted twice"
    assert examples == [CLIENTS * EXAMPLES] * ROUNDS
    assert all(count == ROUNDS for count in ledgers.values()), ledgers
    final = decode_tensors(blob, max_bytes=1 << 24)
    expected = _expected_final_model()
    assert all(final[name].tobytes() == expected[name].tobytes() for name in expected)

    charges = [Charge(r, "sample", 1.0, 64 / EXAMPLES, 5) for r in range(1, ROUNDS + 1)]
    assert epsilon(charges, delta=1e-5) > 0

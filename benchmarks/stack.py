"""Services for benchmarks: separate gateway and worker processes on the real broker.

Benchmarks use their own RabbitMQ virtual host and Redis database (``FEDQ_BENCH_*``)
so that they never purge the queues or keys of a test run on the same machine.
The round manager runs in the benchmark's own process.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import numpy as np
import redis.asyncio as aioredis

from coordinator.privacy import PrivacyLedger
from coordinator.rounds import RoundManager
from coordinator.settings import CoordinatorSettings
from fedq.plan import TrainingPlan
from fedq.state import PartialSumStore, RoundStore
from fedq.state.rounds import reset_federation

__all__ = [
    "AMQP_URL",
    "REDIS_URL",
    "Bench",
    "cpu_seconds",
    "free_port",
    "load_average",
    "peak_rss_bytes",
    "proc_field_kib",
    "rss_bytes",
    "start_bench",
]

REPO_ROOT = Path(__file__).resolve().parent.parent
AMQP_URL = os.environ.get("FEDQ_BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/fedq-bench")
REDIS_URL = os.environ.get("FEDQ_BENCH_REDIS_URL", "redis://127.0.0.1:6379/7")


def rss_bytes(pid: int) -> int:
    """Resident memory of a process now."""
    return proc_field_kib(Path(f"/proc/{pid}/status"), "VmRSS") * 1024


def peak_rss_bytes(pid: int) -> int:
    """Peak resident memory of a process since it started (VmHWM)."""
    return proc_field_kib(Path(f"/proc/{pid}/status"), "VmHWM") * 1024


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time a process has used so far."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def load_average() -> tuple[float, float, float] | None:
    """The machine's 1-, 5- and 15-minute load averages, or None where /proc has none."""
    try:
        one, five, fifteen = Path("/proc/loadavg").read_text().split()[:3]
        return float(one), float(five), float(fifteen)
    except (OSError, ValueError):
        return None


def proc_field_kib(path: Path, name: str) -> int:
    """A ``Name:  value kB`` field of a /proc file (status, meminfo, smaps_rollup); 0 if absent."""
    try:
        for line in path.read_text().splitlines():
            if line.startswith(name + ":"):
                return int(line.split()[1])
    except OSError:
        return 0
    return 0


@dataclass
class Bench:
    """A federation with an open round, gateways and workers as child processes."""

    redis: Any
    store: RoundStore
    partials: PartialSumStore
    manager: RoundManager
    gateways: list[subprocess.Popen[bytes]] = field(default_factory=list)
    workers: list[subprocess.Popen[bytes]] = field(default_factory=list)
    ports: list[int] = field(default_factory=list)

    def processes(self) -> dict[str, subprocess.Popen[bytes]]:
        """Every child process by a readable name."""
        named = {f"gateway-{i}": p for i, p in enumerate(self.gateways)}
        named.update({f"worker-{i}": p for i, p in enumerate(self.workers)})
        return named

    def start_workers(self, count: int, **env: str) -> None:
        """Start ``count`` more ``fedq worker`` processes."""
        for _ in range(count):
            self.workers.append(_spawn("worker", env))

    async def close(self) -> None:
        """Stop every child (SIGTERM, then SIGKILL) and close Redis."""
        for process in [*self.gateways, *self.workers]:
            if process.poll() is None:
                process.terminate()
        for process in [*self.gateways, *self.workers]:
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
        await self.redis.aclose()


async def start_bench(
    initial: dict[str, np.ndarray],
    *,
    clients: list[str],
    gateways: int = 1,
    gateway_env: dict[str, str] | None = None,
    examples: int = 100,
) -> tuple[Bench, dict[str, str]]:
    """Fresh federation, gateways started, ``clients`` joined, round 1 open.

    Returns the bench and each client's token.
    """
    from fedq.queue.amqp import AmqpQueue

    # A long read timeout: committing a 100M-parameter sum keeps Redis busy for seconds.
    redis = aioredis.from_url(REDIS_URL, socket_timeout=600, socket_connect_timeout=5)
    await reset_federation(redis)
    ensure_vhost(AMQP_URL)
    queue = await AmqpQueue.connect(AMQP_URL)
    await queue.purge_updates()
    await queue.close()

    settings = CoordinatorSettings(
        rounds=1,
        clients_per_round=len(clients),
        round_timeout_s=3600,
        evaluate=False,
        plan=TrainingPlan(round=0, dp_mode="none"),
    )
    store, partials = RoundStore(redis), PartialSumStore(redis)
    ledger = PrivacyLedger(redis, delta=settings.delta, default_budget=settings.epsilon_budget)
    manager = RoundManager(store=store, partials=partials, settings=settings, ledger=ledger)
    await manager.ensure_federation(model_name="bench-model", initial=initial)

    bench = Bench(redis, store, partials, manager)
    for _ in range(gateways):
        port = free_port()
        bench.ports.append(port)
        bench.gateways.append(
            _spawn("gateway", {"FEDQ_GRPC_PORT": str(port), **(gateway_env or {})})
        )
    for port in bench.ports:
        await _wait_for_port(port)

    tokens = await _join(bench.ports, clients, examples=examples)
    await manager.tick()
    return bench, tokens


def ensure_vhost(url: str) -> None:
    """Create the benchmark's RabbitMQ virtual host when it is missing and ``rabbitmqctl`` runs.

    Raises:
        RuntimeError: the virtual host is missing and could not be created here.
    """
    parts = urlsplit(url)
    vhost = unquote(parts.path[1:]) if len(parts.path) > 1 else "/"
    if vhost == "/":
        return
    user = unquote(parts.username or "guest")
    ctl = shutil.which("rabbitmqctl")
    if ctl is None:
        return  # a remote broker: the connection itself says whether the vhost exists
    listed = subprocess.run([ctl, "-q", "list_vhosts"], capture_output=True, text=True)
    if listed.returncode == 0 and vhost in listed.stdout.split():
        return
    for command in (["add_vhost", vhost], ["set_permissions", "-p", vhost, user, ".*", ".*", ".*"]):
        done = subprocess.run([ctl, *command], capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(
                f"RabbitMQ virtual host {vhost!r} is missing and rabbitmqctl {command[0]} "
                f"failed: {done.stderr.strip()[:200]}; create it or set FEDQ_BENCH_AMQP_URL"
            )


async def _join(ports: list[int], clients: list[str], *, examples: int) -> dict[str, str]:
    import grpc

    from proto import fedq_v1_pb2 as pb
    from proto import fedq_v1_pb2_grpc as pb_grpc

    tokens = {}
    async with grpc.aio.insecure_channel(f"127.0.0.1:{ports[0]}") as channel:
        stub = pb_grpc.FederationStub(channel)
        for client_id in clients:
            reply = await stub.Join(pb.JoinRequest(client_id=client_id, num_examples=examples))
            tokens[client_id] = reply.token
    return tokens


def _spawn(service: str, extra: dict[str, str]) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "FEDQ_AMQP_URL": AMQP_URL,
        "FEDQ_REDIS_URL": REDIS_URL,
        "FEDQ_METRICS_PORT": "0",
        "FEDQ_EVALUATE": "false",
        "FEDQ_LOG_LEVEL": "WARNING",
        "PYTHONPATH": str(REPO_ROOT),
        **extra,
    }
    return subprocess.Popen(
        [sys.executable, "-m", "fedq.cli", service],
        env=env,
        cwd=REPO_ROOT,
        stdout=subprocess.DEVNULL,
        stderr=open(f"/tmp/fedq-bench-{service}-{time.time_ns()}.log", "wb"),  # noqa: SIM115
    )


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _wait_for_port(port: int, *, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return
        except OSError:
            await asyncio.sleep(0.2)
    raise RuntimeError(f"gateway on port {port} did not start within {timeout_s}s")

"""The federation as separate OS processes on the real RabbitMQ and Redis, observed.

Starts, as children of the benchmark, against the RabbitMQ virtual host and Redis
database of ``FEDQ_BENCH_AMQP_URL`` and ``FEDQ_BENCH_REDIS_URL`` (reset first):

- ``fedq coordinator`` (round manager and REST API; it evaluates every new model on
  the test set), one ``fedq gateway`` and ``workers`` ``fedq worker`` processes;
- N ``fedq client`` processes, client ``i`` training on part ``i`` of an IID split of
  the training set (``--partitions N --partition-index i``), one torch thread each.

The services read the embedded run's ``CoordinatorSettings`` from ``FEDQ_*``
variables (``coordinator_env``), so both runs use the same plans. Clients are
started a few at a time (at most ``startup_batch`` started but not yet joined) and,
by default, forked from a fork server that has imported torch and Opacus and trained
once (``benchmarks.client_preload``): the clients then share those libraries' memory,
which separately started Python programs each hold privately (about 0.5 GB after a
DP-SGD round: 50 of them do not fit in 24 GiB). ``client_start="exec"`` starts each
as a program of its own instead, warmed up the same way before it joins.

Round 1 opens only once all N clients have joined (``FEDQ_MIN_CLIENTS`` defaults to
the clients per round, here N). The run is observed until a model reaches
``stop_at``, the federation finishes, or ``timeout_s`` passes; it is stopped early,
with ``ProcessRunError``, when a service dies, a client fails, the clients do not
join, or the machine's available memory falls below ``min_available_bytes``.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TextIO

from benchmarks.child_processes import ChildProcesses
from benchmarks.process_clock import stop_reason
from benchmarks.round_timing import observe_rounds
from benchmarks.service_env import coordinator_env
from benchmarks.stack import AMQP_URL, REDIS_URL, REPO_ROOT, ensure_vhost, free_port
from benchmarks.tree_memory import MemoryPeaks, available_bytes, sample_memory
from coordinator.privacy import PrivacyLedger
from coordinator.settings import CoordinatorSettings
from fedq.queue.amqp import AmqpQueue
from fedq.state import RoundStore, connect_redis
from fedq.state.rounds import reset_federation
from fedq.tasks import cancel_and_wait

__all__ = ["ProcessOptions", "ProcessRun", "ProcessRunError", "run_process_federation"]

CLIENT_STARTS = ("fork", "exec")
_PRELOAD = "benchmarks.client_preload"
_WAIT_S = 0.5  # between checks of the run's progress
_JOIN_STALL_S = 300.0  # no client joined for this long: give up
_READY_S = 120.0  # services must be ready within this
_EVALUATION_GRACE_S = 120.0  # after the last round, for its model's evaluation


class ProcessRunError(RuntimeError):
    """The process run had to stop before it could be measured; the message says why."""

    memory: dict[str, Any] | None = None  # what the sampler saw until then


@dataclass(frozen=True)
class ProcessOptions:
    """How the processes are started and when observing them stops."""

    clients: int
    workers: int = 2
    client_start: str = "fork"
    startup_batch: int = 4  # clients started but not yet joined, at most
    stop_at: float = 1.0  # stop once a model reaches this test accuracy
    timeout_s: float = 3600.0  # from the last join
    min_available_bytes: int = 2 << 30
    log_dir: Path | None = None  # None: a temporary folder, removed unless the run fails
    progress: TextIO | None = None  # one line per evaluated round

    def __post_init__(self) -> None:
        if self.clients < 1 or self.workers < 1 or self.startup_batch < 1:
            raise ValueError("clients, workers and startup_batch must be at least 1")
        if self.client_start not in CLIENT_STARTS:
            raise ValueError(f"client_start {self.client_start!r}: expected fork or exec")


@dataclass
class ProcessRun:
    """What the process run recorded; times are ``time.time()`` seconds."""

    clients: int
    client_start: str
    services_started_at: float
    clients_started_at: float
    finished_at: float
    stopped: str
    rounds: list[dict[str, Any]]  # RoundRecord.to_public() of every round
    joined_at: list[float]
    finalized_at: dict[int, float]  # first seen finalized by the observer
    memory: dict[str, Any]
    privacy: list[dict[str, Any]] = field(default_factory=list)


def run_process_federation(settings: CoordinatorSettings, options: ProcessOptions) -> ProcessRun:
    """Run the federation as processes until it can stop; every child is stopped on return.

    Raises:
        ProcessRunError: a child failed, the clients did not join, or memory ran low.
    """
    log_dir = options.log_dir or Path(tempfile.mkdtemp(prefix="fedq-processes-"))
    with ChildProcesses(log_dir, preload=[_PRELOAD]) as children:
        run = asyncio.run(_run(settings, options, children))
    if options.log_dir is None:
        shutil.rmtree(log_dir, ignore_errors=True)  # kept only when the run failed
    return run


async def _run(
    settings: CoordinatorSettings, options: ProcessOptions, children: ChildProcesses
) -> ProcessRun:
    ensure_vhost(AMQP_URL)
    redis = await connect_redis(REDIS_URL)
    queue = await AmqpQueue.connect(AMQP_URL)
    try:
        await reset_federation(redis)
        await queue.purge_updates()
        return await _observed_run(
            settings, options, children, store=RoundStore(redis), queue=queue
        )
    finally:
        await queue.close()
        await redis.aclose()


async def _observed_run(
    settings: CoordinatorSettings,
    options: ProcessOptions,
    children: ChildProcesses,
    *,
    store: RoundStore,
    queue: AmqpQueue,
) -> ProcessRun:
    grpc_port = free_port()
    env = _service_env(settings, api_port=free_port(), grpc_port=grpc_port)
    peaks = MemoryPeaks(available_before_bytes=available_bytes())
    services_started_at = time.time()
    _start_services(children, env=env, workers=options.workers)

    finalized_at: dict[int, float] = {}
    tasks = [
        asyncio.create_task(
            sample_memory(peaks, root=os.getpid(), clients=lambda: children.pids("client-"))
        ),
        asyncio.create_task(observe_rounds(store, finalized_at, {}, since=services_started_at)),
    ]
    try:
        await _wait_ready(children, store, queue, grpc_port=grpc_port, options=options)
        clients_started_at = time.time()
        await _start_clients(children, store, settings, options, env=env, grpc_port=grpc_port)
        joined_s = time.time() - clients_started_at
        _report(options, f"{options.clients} client processes joined in {joined_s:.1f}s")
        stopped = await _wait_for_stop(children, store, options, peaks=peaks)
        finished_at = time.time()
    except ProcessRunError as exc:
        exc.memory = peaks.to_dict()
        raise
    finally:
        await cancel_and_wait(*tasks)

    return ProcessRun(
        clients=options.clients,
        client_start=options.client_start,
        services_started_at=services_started_at,
        clients_started_at=clients_started_at,
        finished_at=finished_at,
        stopped=stopped,
        rounds=await _round_records(store),
        joined_at=sorted(c.joined_at for c in await store.clients()),
        finalized_at=finalized_at,
        memory=peaks.to_dict(),
        privacy=await _privacy(store, settings),
    )


def _service_env(settings: CoordinatorSettings, *, api_port: int, grpc_port: int) -> dict[str, str]:
    """The environment of every child: the settings, the services' URLs, one torch thread."""
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("FEDQ_")}
    return {
        **inherited,
        **coordinator_env(replace(settings, api_host="127.0.0.1", api_port=api_port)),
        "FEDQ_AMQP_URL": AMQP_URL,
        "FEDQ_REDIS_URL": REDIS_URL,
        "FEDQ_GRPC_HOST": "127.0.0.1",
        "FEDQ_GRPC_PORT": str(grpc_port),
        "FEDQ_METRICS_PORT": "0",
        "FEDQ_CLIENT_PROBE": "false",  # as in the embedded run: no speed probe, no fitted plans
        "FEDQ_LOG_LEVEL": "INFO",
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "PYTHONPATH": str(REPO_ROOT),
    }


def _start_services(children: ChildProcesses, *, env: dict[str, str], workers: int) -> None:
    fedq = [sys.executable, "-m", "fedq.cli"]
    children.spawn("coordinator", [*fedq, "coordinator"], env=env)
    children.spawn("gateway", [*fedq, "gateway"], env=env)
    for i in range(workers):
        children.spawn(f"worker-{i}", [*fedq, "worker"], env=env)


async def _wait_ready(
    children: ChildProcesses,
    store: RoundStore,
    queue: AmqpQueue,
    *,
    grpc_port: int,
    options: ProcessOptions,
) -> None:
    """Until the federation exists, the gateway listens and every worker consumes."""
    deadline = time.monotonic() + _READY_S
    while time.monotonic() < deadline:
        _check_children(children)
        federation = await store.federation()
        consumers = (await queue.stats()).consumers
        if federation is not None and consumers >= options.workers and _listens(grpc_port):
            return
        await asyncio.sleep(_WAIT_S)
    raise ProcessRunError(
        f"services not ready within {_READY_S:g}s; logs in {children.log_dir}:\n"
        + children.log_tail("coordinator")
    )


async def _start_clients(
    children: ChildProcesses,
    store: RoundStore,
    settings: CoordinatorSettings,
    options: ProcessOptions,
    *,
    env: dict[str, str],
    grpc_port: int,
) -> None:
    """Start the clients, ``startup_batch`` at a time, until every one has joined."""
    started = joined = 0
    progress_at = time.monotonic()
    while joined < options.clients:
        _check_children(children)
        _check_memory(children, available=available_bytes(), options=options)
        while started < options.clients and started - joined < options.startup_batch:
            _start_client(children, started, settings, options, env=env, grpc_port=grpc_port)
            started += 1

        await asyncio.sleep(_WAIT_S)
        now_joined = len(await store.clients())
        if now_joined > joined:
            joined, progress_at = now_joined, time.monotonic()
        elif time.monotonic() - progress_at > _JOIN_STALL_S:
            raise ProcessRunError(
                f"{joined} of {options.clients} clients joined, none in the last "
                f"{_JOIN_STALL_S:g}s; logs in {children.log_dir}"
            )


def _start_client(
    children: ChildProcesses,
    index: int,
    settings: CoordinatorSettings,
    options: ProcessOptions,
    *,
    env: dict[str, str],
    grpc_port: int,
) -> None:
    name = f"client-{index:03d}"
    argv = [
        "client",
        "--client-id", name,
        "--gateways", f"127.0.0.1:{grpc_port}",
        "--dataset", settings.dataset,
        "--data-dir", settings.data_dir,
        "--partitions", str(options.clients),
        "--partition-index", str(index),
        "--partition", "iid",
    ]  # fmt: skip
    if options.client_start == "fork":
        children.fork(name, f"{_PRELOAD}:run_fedq", argv, env)
    else:
        children.spawn(name, [sys.executable, "-m", _PRELOAD, *argv], env=env)


async def _wait_for_stop(
    children: ChildProcesses, store: RoundStore, options: ProcessOptions, *, peaks: MemoryPeaks
) -> str:
    """Watch the run until it can stop; returns why it stopped."""
    deadline = time.monotonic() + options.timeout_s
    finished_since: float | None = None
    reported: set[int] = set()
    while True:
        _check_children(children)
        if peaks.samples:
            _check_memory(children, available=peaks.available_now_bytes, options=options)

        federation = await store.federation()
        finished = federation is not None and federation.status == "finished"
        rounds = await _round_records(store)
        _report_rounds(options, rounds, reported)
        reason = stop_reason(rounds, stop_at=options.stop_at, finished=finished)
        if finished and finished_since is None:
            finished_since = time.monotonic()
        if (
            reason is None
            and finished_since
            and time.monotonic() - finished_since > _EVALUATION_GRACE_S
        ):
            reason = "round cap reached; not every model was evaluated"
        if reason is None and time.monotonic() > deadline:
            reason = f"time limit of {options.timeout_s:g}s reached"
        if reason is not None:
            return reason
        await asyncio.sleep(_WAIT_S)


def _report(options: ProcessOptions, line: str) -> None:
    if options.progress is not None:
        print(line, file=options.progress, flush=True)


def _report_rounds(
    options: ProcessOptions, rounds: list[dict[str, Any]], reported: set[int]
) -> None:
    for r in rounds:
        if r["round"] in reported or r["test_accuracy"] is None:
            continue
        reported.add(r["round"])
        open_s = (r["closed_at"] or r["opened_at"]) - r["opened_at"]
        _report(
            options,
            f"round {r['round']:>3}  updates {r['updates_aggregated']:>3}  "
            f"accuracy {r['test_accuracy']:.4f}  open {open_s:6.1f}s",
        )


def _check_children(children: ChildProcesses) -> None:
    """Raise when a service has ended, or a client ended with an error."""
    for name, code in children.exited().items():
        if name.startswith("client-") and code == 0:
            continue  # a client leaves by itself once the federation has finished
        raise ProcessRunError(
            f"{name} exited with status {code}; its log ({children.log_path(name)}) ends:\n"
            + children.log_tail(name)
        )


def _check_memory(children: ChildProcesses, *, available: int, options: ProcessOptions) -> None:
    if available >= options.min_available_bytes:
        return
    raise ProcessRunError(
        f"the machine's available memory fell to {available / 2**30:.1f} GiB (floor "
        f"{options.min_available_bytes / 2**30:.1f} GiB) with {children.running()} child "
        "processes running; stopped them to protect the machine"
    )


async def _round_records(store: RoundStore) -> list[dict[str, Any]]:
    federation = await store.federation()
    if federation is None:
        return []
    found = [await store.round(r) for r in range(1, federation.current_round + 1)]
    return [r.to_public() for r in found if r is not None]


async def _privacy(store: RoundStore, settings: CoordinatorSettings) -> list[dict[str, Any]]:
    if settings.plan.dp_mode == "none":
        return []
    ledger = PrivacyLedger(
        store.redis,
        delta=settings.delta,
        default_budget=settings.epsilon_budget,
        accountant=settings.accountant,
    )
    return list(await ledger.report())


def _listens(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0

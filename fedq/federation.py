"""One command, whole federation: coordinator, gateway, workers and N clients on one machine.

With no service URLs the queue and the store are in-process stand-ins behind the
same interfaces; with AMQP and Redis URLs the same code uses the real services.
Clients share one process and a small training pool, so fifty of them cost one
PyTorch import rather than fifty.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any, TextIO

import numpy as np
import torch

from clients.capabilities import UploadMeter, measure
from clients.client import FederatedClient, RoundOutcome
from clients.connection import GatewayLink, RetryPolicy
from clients.simulation import SimulatedConditions, conditions_for
from clients.training import train_locally
from coordinator.gateway import GatewayServer
from coordinator.privacy import PrivacyLedger
from coordinator.rounds import RoundManager
from coordinator.settings import CoordinatorSettings, GatewaySettings, ServiceUrls
from fedq.datasets import load_dataset, partition
from fedq.evaluation import evaluate
from fedq.models import build_model, default_model_for, make_dp_compatible, model_arrays
from fedq.queue import UpdateQueue, open_queue
from fedq.state import PartialSumStore, RoundStore, connect_redis
from fedq.state.rounds import reset_federation
from fedq.tasks import cancel_and_wait
from workers import AggregationWorker, WorkerSettings

__all__ = ["FederationOptions", "FederationSummary", "run_federation"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FederationOptions:
    """What the one-command federation runs."""

    clients: int = 10
    workers: int = 2
    partition: str = "iid"
    alpha: float = 0.5
    train_threads: int = 0  # 0: one per CPU core
    api_port: int | None = None  # None: no REST API
    resume: bool = False
    timeout_s: float = 3600.0
    progress: TextIO | None = None
    probe: bool = True  # clients probe their speed and report it when they join
    speed_spread: float = 0.0  # simulated slowdown of each client: seeded, in [1, 1 + spread]
    link_delay_ms: float = 0.0  # simulated link delay: seeded, in [0.5, 1.5] × this

    def __post_init__(self) -> None:
        if self.speed_spread < 0 or self.link_delay_ms < 0:
            raise ValueError("speed_spread and link_delay_ms must be >= 0")


@dataclass
class FederationSummary:
    """Per-round results of a finished federation."""

    rounds: list[dict[str, Any]] = field(default_factory=list)
    privacy: list[dict[str, Any]] = field(default_factory=list)
    outcomes: dict[str, list[RoundOutcome]] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def final_accuracy(self) -> float | None:
        """Test accuracy of the last finalized round."""
        done = [r for r in self.rounds if r.get("test_accuracy") is not None]
        return done[-1]["test_accuracy"] if done else None

    @property
    def max_epsilon(self) -> float:
        """Largest ε any client spent."""
        return max((p["epsilon_spent"] for p in self.privacy), default=0.0)


async def run_federation(
    settings: CoordinatorSettings,
    urls: ServiceUrls,
    options: FederationOptions,
    *,
    worker_settings: WorkerSettings | None = None,
) -> FederationSummary:
    """Run a whole federation to its last round and return its summary."""
    started = time.monotonic()
    settings = _with_defaults(settings, options)
    model_name = settings.model or default_model_for(settings.dataset)

    redis = await connect_redis(urls.redis_url)
    queue = await open_queue(urls.amqp_url, delivery_limit=urls.delivery_limit)
    if not options.resume:
        await _fresh_state(redis, queue)

    store, partials = RoundStore(redis), PartialSumStore(redis)
    ledger = PrivacyLedger(
        redis,
        delta=settings.delta,
        default_budget=settings.epsilon_budget,
        accountant=settings.accountant,
    )
    test_data = load_dataset(settings.dataset, root=settings.data_dir or None, train=False)
    manager = RoundManager(
        store=store,
        partials=partials,
        settings=settings,
        ledger=ledger,
        evaluator=(lambda arrays: evaluate(model_name, arrays, test_data))
        if settings.evaluate
        else None,
    )
    initial_model = build_model(model_name, seed=settings.seed)
    if settings.plan.dp_mode != "none":
        # Clients train the DP-compatible variant (e.g. GroupNorm for BatchNorm), so the
        # global weights must have its layout, not the factory's.
        initial_model = make_dp_compatible(initial_model)
    initial = model_arrays(initial_model)
    await manager.ensure_federation(model_name=model_name, initial=initial)

    gateway = GatewayServer(
        store=store, queue=queue, ledger=ledger, settings=GatewaySettings(host="127.0.0.1", port=0)
    )
    port = await gateway.start()
    api = await _start_api(options, store=store, ledger=ledger, queue=queue, settings=settings)

    workers = [
        AggregationWorker(
            queue=queue,
            redis=redis,
            settings=worker_settings or WorkerSettings(),
            name=f"worker-{i}",
        )
        for i in range(options.workers)
    ]
    worker_tasks = [asyncio.create_task(w.run(), name=w.worker_id) for w in workers]

    train_pool = ThreadPoolExecutor(max_workers=_train_threads(options), thread_name_prefix="train")
    clients = _make_clients(settings, options, model_name=model_name, port=port, pool=train_pool)
    summary = FederationSummary()
    try:
        await _drive(manager, clients, store=store, ledger=ledger, options=options, summary=summary)
    finally:
        await cancel_and_wait(*worker_tasks)
        await gateway.stop(grace_s=1.0)
        if api is not None:
            await api.stop()
        for client in clients:
            await client.link.close()
        train_pool.shutdown(wait=False, cancel_futures=True)

    summary.rounds = [r.to_public() for r in await _rounds(store)]
    summary.privacy = await ledger.report()
    summary.seconds = time.monotonic() - started
    await queue.close()
    await redis.aclose()
    return summary


def _with_defaults(
    settings: CoordinatorSettings, options: FederationOptions
) -> CoordinatorSettings:
    per_round = min(settings.clients_per_round, options.clients)
    return replace(
        settings,
        clients_per_round=per_round,
        min_clients=min(settings.start_clients, options.clients),
    )


async def _fresh_state(redis: Any, queue: UpdateQueue) -> None:
    removed = await reset_federation(redis)
    purge = getattr(queue, "purge_updates", None)
    if purge is not None:
        await purge()
    if removed:
        log.info("started a fresh federation (removed %d keys of an earlier one)", removed)


def _train_threads(options: FederationOptions) -> int:
    threads = options.train_threads or max(1, torch.get_num_threads())
    torch.set_num_threads(1)  # one intra-op thread per training thread: no oversubscription
    return threads


def _make_clients(
    settings: CoordinatorSettings,
    options: FederationOptions,
    *,
    model_name: str,
    port: int,
    pool: ThreadPoolExecutor,
) -> list[FederatedClient]:
    train = load_dataset(settings.dataset, root=settings.data_dir or None, train=True)
    labels = train.tensors[1].numpy()
    parts = partition(
        labels, options.clients, scheme=options.partition, alpha=options.alpha, seed=settings.seed
    )

    clients = []
    for i, indices in enumerate(parts):
        subset = torch.utils.data.TensorDataset(
            *(t[torch.from_numpy(indices)] for t in train.tensors)
        )
        conditions = conditions_for(
            i,
            seed=settings.seed,
            speed_spread=options.speed_spread,
            link_delay_ms=options.link_delay_ms,
        )
        upload = UploadMeter()
        clients.append(
            FederatedClient(
                client_id=f"client-{i:03d}",
                link=GatewayLink([f"127.0.0.1:{port}"], policy=RetryPolicy(), seed=i),
                num_examples=len(indices),
                trainer=_trainer_for(subset),
                executor=pool,
                model_name=model_name,
                probe=_probe_for(subset, upload, conditions) if options.probe else None,
                upload=upload,
                conditions=conditions if conditions != SimulatedConditions() else None,
                continuous=settings.mode == "async",
            )
        )
    return clients


def _probe_for(
    data: torch.utils.data.TensorDataset, upload: UploadMeter, conditions: SimulatedConditions
) -> Any:
    def probe(model_name: str) -> Any:
        return measure(model_name, data, upload=upload, slowdown=conditions.slowdown)

    return probe


def _trainer_for(data: torch.utils.data.TensorDataset) -> Any:
    def trainer(model_name: str, arrays: dict[str, np.ndarray], plan: Any) -> Any:
        return train_locally(model_name, arrays, data, plan)

    return trainer


async def _drive(
    manager: RoundManager,
    clients: list[FederatedClient],
    *,
    store: RoundStore,
    ledger: PrivacyLedger,
    options: FederationOptions,
    summary: FederationSummary,
) -> None:
    client_tasks = {c.client_id: asyncio.create_task(c.run(), name=c.client_id) for c in clients}
    manager_task = asyncio.create_task(manager.run(), name="round-manager")
    printed: set[int] = set()
    progress = asyncio.create_task(_report_progress(store, ledger, options.progress, printed))
    try:
        await asyncio.wait_for(manager_task, timeout=options.timeout_s)
        done = await asyncio.wait_for(
            asyncio.gather(*client_tasks.values(), return_exceptions=True), timeout=60
        )
        for client_id, result in zip(client_tasks, done, strict=True):
            if isinstance(result, BaseException):
                log.error("client %s failed: %s", client_id, result)
            else:
                summary.outcomes[client_id] = result
    finally:
        await cancel_and_wait(progress, manager_task, *client_tasks.values())
        await _print_new_rounds(store, ledger, options.progress, printed=printed)


async def _report_progress(
    store: RoundStore, ledger: PrivacyLedger, out: TextIO | None, printed: set[int]
) -> None:
    while True:
        await _print_new_rounds(store, ledger, out, printed=printed)
        await asyncio.sleep(0.5)


async def _print_new_rounds(
    store: RoundStore, ledger: PrivacyLedger, out: TextIO | None, *, printed: set[int]
) -> None:
    if out is None:
        return
    for record in await _rounds(store):
        done = record.status in ("finalized", "abandoned")
        if (
            record.round in printed
            or not done
            or (record.status == "finalized" and record.accuracy is None)
        ):
            continue
        printed.add(record.round)
        accuracy = f"{record.accuracy:.4f}" if record.accuracy is not None else "-"
        spent = [p["epsilon_spent"] for p in await ledger.report()]
        print(
            f"round {record.round:>3}  {record.status:<9}"
            f"  participants {len(record.participants):>3}"
            f"  updates {record.aggregated:>3}/{record.target:<3}  accuracy {accuracy}"
            f"  ε max {max(spent, default=0.0):.3f}  {record.closed_at - record.opened_at:6.1f}s",
            file=out,
            flush=True,
        )


async def _rounds(store: RoundStore) -> list[Any]:
    federation = await store.federation()
    if federation is None:
        return []
    found = [await store.round(r) for r in range(1, federation.current_round + 1)]
    return [r for r in found if r is not None]


async def _start_api(options: FederationOptions, **parts: Any) -> Any:
    if options.api_port is None:
        return None
    from coordinator.api.server import ApiServer

    server = ApiServer(port=options.api_port, host="127.0.0.1", **parts)
    await server.start()
    return server

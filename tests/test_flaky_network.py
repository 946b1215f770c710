"""A round over a network that drops, cuts and delays connections still counts each update once.

Clients reach the gateway through seeded fault-injecting proxies (tests/faultproxy.py).
gRPC carries every call of a client on one HTTP/2 connection, so the proxies cut
connections after a random number of bytes: cuts land in the middle of model
downloads and update uploads, and the clients must resume, fail over and resubmit.
"""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from clients.client import FederatedClient
from clients.connection import GatewayLink, RetryPolicy
from clients.training import LocalResult
from coordinator.settings import CoordinatorSettings, GatewaySettings
from fedq.plan import TrainingPlan
from fedq.state.partials import to_fixed_point
from fedq.tasks import cancel_and_wait
from fedq.tensors import ModelSpec
from tests.faultproxy import FaultPlan, FaultProxy
from tests.support import start_stack, update_for
from workers import AggregationWorker, WorkerSettings

CLIENTS = [f"flaky{i}" for i in range(8)]
# About a third of connections are dropped or cut, one in two is slowed down. A client's
# download and upload are ~256 KiB each, so a cut within 400 KB always hits one mid-stream.
FAULTS = FaultPlan(
    drop_rate=0.1,
    cut_rate=0.25,
    delay_rate=0.5,
    delay_s=(0.0005, 0.003),
    cut_bytes=(200, 400_000),
)
POLICY = RetryPolicy(attempts=12, base_s=0.02, max_s=0.3, call_timeout_s=20.0)
ROUND_TIMEOUT_S = 45.0


def _examples(i: int) -> int:
    return 40 + 17 * i


def _initial() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    return {
        "w": rng.standard_normal(64 * 1024).astype(np.float32),
        "b": np.zeros(10, np.float32),
    }


def _trainer(delta: dict[str, np.ndarray], examples: int):
    def train(model_name: str, arrays: dict[str, np.ndarray], plan: TrainingPlan) -> LocalResult:
        assert set(arrays) == {"w", "b"}
        return LocalResult(
            delta=delta,
            num_examples=examples,
            loss=0.0,
            steps=plan.local_steps,
            noise_std=0.0,
            seconds=0.0,
        )

    return train


async def _drive(stack, queue, proxies, clients) -> None:
    """Tick the round manager until the federation finishes and every client returned."""
    runs = [asyncio.create_task(c.run()) for c in clients]
    deadline = time.monotonic() + ROUND_TIMEOUT_S
    try:
        while not (await stack.manager.tick() and all(r.done() for r in runs)):
            if time.monotonic() > deadline:
                record = await stack.store.round(1)
                waiting = [c.client_id for c, r in zip(clients, runs, strict=True) if not r.done()]
                raise AssertionError(
                    f"round did not finish: {record}, clients {waiting} still running, "
                    f"proxies {_counts(proxies)}, queue {await queue.stats()}"
                )
            for run in runs:
                if run.done() and run.exception() is not None:
                    raise run.exception()
            await asyncio.sleep(0.05)
        await asyncio.gather(*runs)
    finally:
        await cancel_and_wait(*runs)


def _counts(proxies) -> list[dict[str, int]]:
    return [p.counters.as_dict() for p in proxies]


@pytest.fixture
async def stack(redis, queue):
    settings = CoordinatorSettings(
        rounds=1,
        clients_per_round=len(CLIENTS),
        round_timeout_s=ROUND_TIMEOUT_S,
        evaluate=False,
        plan=TrainingPlan(round=0, dp_mode="none", codec="blosc2"),
    )
    s = await start_stack(
        redis,
        queue,
        clients=CLIENTS,
        initial=_initial(),
        settings=settings,
        gateway_settings=GatewaySettings(chunk_bytes=16 * 1024, poll_s=0.05),
    )
    yield s
    await s.close()


async def test_every_update_is_counted_once_when_connections_drop_and_break(stack, redis, queue):
    updates = {c: update_for(stack.initial, seed=i, scale=0.05) for i, c in enumerate(CLIENTS)}
    # Seeds whose first connections are hit, so that every run sees faults early.
    proxies = [FaultProxy(stack.gateway.port, plan=FAULTS, seed=seed) for seed in (5, 7)]
    for proxy in proxies:
        await proxy.start()
    clients = [
        FederatedClient(
            client_id=c,
            link=GatewayLink([p.address for p in proxies], policy=POLICY, seed=i),
            num_examples=_examples(i),
            trainer=_trainer(updates[c], _examples(i)),
        )
        for i, c in enumerate(CLIENTS)
    ]
    worker = AggregationWorker(
        queue=queue, redis=redis, settings=WorkerSettings(batch_updates=2, flush_s=0.05)
    )
    worker_task = asyncio.create_task(worker.run())

    try:
        await _drive(stack, queue, proxies, clients)
    finally:
        await cancel_and_wait(worker_task)
        for client in clients:
            await client.link.close()
        for proxy in proxies:
            await proxy.close()

    spec = ModelSpec.from_arrays(stack.initial)
    total = await stack.partials.round_sum(1, size=spec.update_size)
    expected = sum(
        to_fixed_point(spec.flatten_update(updates[c]), _examples(i)) for i, c in enumerate(CLIENTS)
    )
    faults = _counts(proxies)
    print("fault proxy counters:", faults)
    assert sum(f["dropped"] + f["cut"] for f in faults) >= 3, faults
    # "duplicate": the gateway had accepted an upload whose reply the proxy cut off.
    outcomes = {c.client_id: [o.outcome for o in c.outcomes] for c in clients}
    assert all(o in (["accepted"], ["duplicate"]) for o in outcomes.values()), outcomes
    assert total.count == len(CLIENTS)
    assert total.examples == sum(_examples(i) for i in range(len(CLIENTS)))
    assert np.array_equal(total.total, expected)
    assert await stack.partials.applied_ids(1) == await stack.store.accepted_ids(1)
    assert (await stack.store.round(1)).status == "finalized"


async def test_the_proxy_makes_the_same_decisions_for_the_same_seed():
    plan = FaultPlan(drop_rate=0.3, cut_rate=0.3, delay_rate=0.5)
    first, second, other = (FaultProxy(1, plan=plan, seed=s) for s in (5, 5, 6))

    fates = [
        [(f.drop, f.cut_after, f.delay_s) for f in map(p._decide, range(50))]
        for p in (first, second, other)
    ]

    assert fates[0] == fates[1] != fates[2]
    assert 5 < sum(drop for drop, _, _ in fates[0]) < 25

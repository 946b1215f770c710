"""Heterogeneous clients: plans fitted to speed, fair selection, stragglers, work weights."""

from __future__ import annotations

import asyncio
import io
import time

import grpc
import numpy as np
import pytest

from clients.client import FederatedClient
from clients.connection import GatewayLink, RetryPolicy
from clients.simulation import conditions_for
from clients.training import LocalResult
from coordinator.privacy import PrivacyLedger
from coordinator.privacy.accountant import Charge, epsilon
from coordinator.rounds import RoundManager
from coordinator.rounds.plans import PlanLimits, fit_plan
from coordinator.rounds.selection import select_participants
from coordinator.settings import CoordinatorSettings, ServiceUrls
from fedq.federation import FederationOptions, run_federation
from fedq.plan import TrainingPlan
from fedq.state import PartialSumStore, RoundStore
from fedq.state.partials import SCALE_BITS, to_fixed_point
from fedq.state.participation import SelectionCounts
from fedq.state.rounds import ClientRecord
from fedq.tasks import cancel_and_wait
from proto.codec import decode_tensors, encode_tensors
from tests.support import as_stream, small_model, start_stack, update_for, upload_chunks
from workers import AggregationWorker, WorkerSettings
from workers.weights import staleness_weight, work_weight

BASE = TrainingPlan(round=1, dp_mode="sample", batch_size=64, local_steps=50, sample_rate=0.1)


def _fit(speed: float, *, budget_s: float = 60.0) -> TrainingPlan:
    return fit_plan(
        BASE,
        {"samples_per_second": speed},
        num_examples=6000,
        budget_s=budget_s,
        limits=PlanLimits(min_steps=2, max_steps=50, safety=0.5),
    )


def test_plans_scale_with_reported_speed():
    steps = [_fit(speed).local_steps for speed in (10, 50, 100, 200, 1e6)]

    assert steps == sorted(steps) and steps[0] < steps[-1]
    assert _fit(100).local_steps == 100 * 60 * 0.5 // 64  # floor(speed × budget × safety / batch)
    assert _fit(1e6).local_steps == 50  # clamped to the maximum


def test_a_client_too_slow_for_min_steps_gets_a_smaller_batch_and_matching_sample_rate():
    plan = _fit(2.0, budget_s=60)  # 60 samples in the budget: 2 steps of 30

    assert (plan.local_steps, plan.batch_size) == (2, 30)
    assert plan.sample_rate == pytest.approx(30 / 6000)


def test_a_client_without_a_reported_speed_keeps_the_base_plan():
    assert fit_plan(BASE, {}, num_examples=6000, budget_s=1, limits=PlanLimits()) == BASE


def test_selection_prefers_the_clients_selected_least_often():
    clients = [ClientRecord(f"c{i}", 100, 0.0, 0.0) for i in range(6)]
    counts = {"c0": 3, "c1": 3, "c2": 0, "c3": 1, "c4": 0, "c5": 3}

    chosen = select_participants(clients, count=3, round_id=7, seed=1, counts=counts)

    assert [c.client_id for c in chosen] == ["c2", "c3", "c4"]


async def test_selection_is_seeded_and_fair_over_rounds(redis):
    clients = [ClientRecord(f"c{i}", 100, 0.0, 0.0) for i in range(6)]
    selections = SelectionCounts(redis)

    history = []
    for round_id in range(1, 7):
        counts = await selections.counts(c.client_id for c in clients)
        chosen = select_participants(clients, count=2, round_id=round_id, seed=5, counts=counts)
        await selections.record(round_id, [c.client_id for c in chosen])
        history.append([c.client_id for c in chosen])
    recounted = await selections.record(6, history[-1])

    assert await selections.counts(c.client_id for c in clients) == {
        c.client_id: 2 for c in clients
    }
    assert not recounted  # a round is counted once
    assert history[0] == [
        c.client_id for c in select_participants(clients, count=2, round_id=1, seed=5)
    ]


async def test_the_ledger_charges_a_fast_and_a_slow_client_for_their_own_plans(redis):
    settings = CoordinatorSettings(
        rounds=2,
        clients_per_round=2,
        round_timeout_s=60,
        evaluate=False,
        plan=TrainingPlan(round=0, dp_mode="sample", batch_size=64, local_steps=50),
    )
    store = RoundStore(redis)
    ledger = PrivacyLedger(redis, delta=settings.delta, default_budget=1e6)
    manager = RoundManager(
        store=store, partials=PartialSumStore(redis), settings=settings, ledger=ledger
    )
    await manager.ensure_federation(model_name="test-model", initial=small_model())
    for client_id, speed in (("fast", 1e5), ("slow", 40.0)):
        await store.register_client(
            client_id, num_examples=6000, capabilities={"samples_per_second": speed}
        )

    await manager.tick()

    fast, slow = await store.plan_for(1, "fast"), await store.plan_for(1, "slow")
    assert fast.local_steps == 50 and slow.local_steps < fast.local_steps
    for client_id, plan in (("fast", fast), ("slow", slow)):
        expected = epsilon([Charge.from_plan(plan)], delta=settings.delta)
        assert await ledger.spent(client_id) == pytest.approx(expected, rel=1e-9)
    assert await ledger.spent("slow") < await ledger.spent("fast")


def test_work_and_staleness_weights_are_integers_that_only_shrink():
    assert work_weight(100, steps_done=25, planned_steps=50) == 50
    assert work_weight(100, steps_done=0, planned_steps=50) == 100  # not reported
    assert work_weight(100, steps_done=80, planned_steps=50) == 100  # never more than n
    assert work_weight(3, steps_done=1, planned_steps=50) == 1
    assert staleness_weight(100, staleness=0) == 100
    assert staleness_weight(100, staleness=3) == 50
    assert staleness_weight(1000, staleness=1) == 707


async def test_updates_are_weighted_by_the_share_of_their_planned_steps(redis, queue):
    stack = await start_stack(redis, queue, clients=["full", "half"])
    shapes = {k: v for k, v in stack.initial.items() if v.dtype.kind == "f"}
    updates = {"full": update_for(shapes, seed=1), "half": update_for(shapes, seed=2)}
    try:
        for client_id, steps in (("full", 50), ("half", 25)):
            chunks = upload_chunks(
                client_id=client_id,
                token=stack.tokens[client_id],
                round_id=1,
                update_id=f"{client_id}-1",
                payload=encode_tensors(updates[client_id]),
                num_examples=100,
            )
            chunks[0].header.metrics["steps"] = steps
            await stack.stub.SubmitUpdate(as_stream(chunks))
        model = await _finalize(stack, redis, queue)
    finally:
        await stack.close()

    for name in shapes:
        flat = to_fixed_point(updates["full"][name].ravel(), 100) + to_fixed_point(
            updates["half"][name].ravel(), 50
        )
        mean = flat.astype(np.float64) / 2.0**SCALE_BITS / 150
        expected = stack.initial[name].astype(np.float64) + mean.reshape(shapes[name].shape)
        assert model[name].tobytes() == expected.astype(np.float32).tobytes()


async def _finalize(stack, redis, queue) -> dict[str, np.ndarray]:
    worker = AggregationWorker(
        queue=queue, redis=redis, settings=WorkerSettings(batch_updates=2, flush_s=0.05)
    )
    task = asyncio.create_task(worker.run())
    try:
        for _ in range(600):
            await stack.manager.tick()
            record = await stack.store.round(1)
            if record.status == "finalized":
                break
            await asyncio.sleep(0.05)
    finally:
        await cancel_and_wait(task)
    blob, _ = await stack.store.model(2)
    return decode_tensors(blob, max_bytes=1 << 20)


async def test_a_slow_client_is_dropped_and_the_round_closes_at_its_deadline(redis, queue):
    settings = CoordinatorSettings(
        rounds=1,
        clients_per_round=3,
        quorum_fraction=0.6,
        round_timeout_s=3.0,
        max_extensions=0,
        evaluate=False,
        plan=TrainingPlan(round=0, dp_mode="none", codec="blosc2"),
    )
    stack = await start_stack(redis, queue, clients=["a", "b", "slow"], settings=settings)
    opened = await stack.store.round(1)
    worker = AggregationWorker(
        queue=queue, redis=redis, settings=WorkerSettings(batch_updates=1, flush_s=0.05)
    )
    port = stack.gateway.port
    clients = [
        FederatedClient(
            client_id=client_id,
            link=GatewayLink([f"127.0.0.1:{port}"], policy=RetryPolicy(attempts=2), seed=0),
            num_examples=100,
            trainer=_sleepy_trainer(stack.initial, sleep_s=6.0 if client_id == "slow" else 0.0),
        )
        for client_id in ("a", "b", "slow")
    ]
    tasks = [asyncio.create_task(worker.run()), asyncio.create_task(stack.manager.run())]
    try:
        outcomes = await asyncio.wait_for(asyncio.gather(*(c.run() for c in clients)), 60)
        record = await stack.store.round(1)
    finally:
        await cancel_and_wait(*tasks)
        for c in clients:
            await c.link.close()
        await stack.close()

    assert record.status == "finalized" and record.aggregated == 2
    assert "deadline passed with quorum" in record.note
    assert record.closed_at >= opened.deadline
    fast, slow = outcomes[0] + outcomes[1], outcomes[2]
    assert [o.outcome for o in fast] == ["accepted", "accepted"]
    assert [o.outcome for o in slow] == ["refused"]
    assert slow[0].message.startswith("FAILED_PRECONDITION: round 1 is ")
    assert slow[0].message.endswith("; it no longer takes updates")


@pytest.mark.parametrize("status", ["closing", "finalized"])
async def test_a_late_upload_is_refused_with_failed_precondition(redis, queue, status):
    stack = await start_stack(redis, queue, clients=["late"])
    try:
        await stack.store.update_round(1, status=status)
        late = upload_chunks(
            client_id="late",
            token=stack.tokens["late"],
            round_id=1,
            update_id="late-1",
            payload=encode_tensors(update_for(stack.initial, seed=1)),
        )
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stack.stub.SubmitUpdate(as_stream(late))
    finally:
        await stack.close()

    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert refused.value.details() == f"round 1 is {status}; it no longer takes updates"


def _sleepy_trainer(initial: dict[str, np.ndarray], *, sleep_s: float):
    def trainer(model_name: str, arrays: dict[str, np.ndarray], plan: TrainingPlan) -> LocalResult:
        time.sleep(sleep_s)
        delta = update_for(initial, seed=plan.seed % 1000)
        return LocalResult(delta, 100, 0.0, plan.local_steps, 0.0, sleep_s)

    return trainer


def test_simulated_conditions_are_seeded_and_bounded():
    first = [conditions_for(i, seed=3, speed_spread=4.0, link_delay_ms=50) for i in range(20)]
    again = [conditions_for(i, seed=3, speed_spread=4.0, link_delay_ms=50) for i in range(20)]

    assert first == again
    assert all(1.0 <= c.slowdown <= 5.0 for c in first)
    assert all(0.025 <= c.link_delay_s <= 0.075 for c in first)
    assert len({c.slowdown for c in first}) == 20


async def test_fedprox_with_slow_clients_trains_mnist_above_90_percent(
    redis, queue, data_root, redis_url, amqp_url
):
    settings = CoordinatorSettings(
        dataset="mnist",
        data_dir=str(data_root),
        rounds=3,
        clients_per_round=5,
        round_timeout_s=120,
        seed=4,
        plan=TrainingPlan(
            round=0,
            dp_mode="none",
            batch_size=64,
            local_steps=30,
            learning_rate=0.5,
            fedprox_mu=0.01,
        ),
    )

    summary = await run_federation(
        settings,
        ServiceUrls(amqp_url=amqp_url, redis_url=redis_url),
        FederationOptions(
            clients=5, workers=1, progress=io.StringIO(), speed_spread=1.0, link_delay_ms=20
        ),
    )

    assert [r["status"] for r in summary.rounds] == ["finalized"] * 3
    assert summary.final_accuracy > 0.90
    assert all(o.outcome == "accepted" for outs in summary.outcomes.values() for o in outs)


def test_capabilities_report_speed_memory_and_codecs():
    import torch

    from clients.capabilities import UploadMeter, measure

    data = torch.utils.data.TensorDataset(torch.randn(64, 1, 28, 28), torch.randint(0, 10, (64,)))
    meter = UploadMeter()
    meter.record(1_000_000, 0.5)

    fast = measure("mnist_cnn", data, upload=meter)
    slow = measure("mnist_cnn", data, upload=meter, slowdown=1000.0)

    assert fast.samples_per_second > 0 and slow.samples_per_second < fast.samples_per_second
    assert fast.memory_bytes > 0
    assert fast.upload_bytes_per_second == pytest.approx(2_000_000)
    assert "q8" in fast.codecs

"""Asynchronous mode: buffered versions, staleness limits and discounts, MNIST end to end."""

from __future__ import annotations

import asyncio
import io

import grpc
import numpy as np
import pytest

from coordinator.settings import CoordinatorSettings, ServiceUrls
from fedq.federation import FederationOptions, run_federation
from fedq.plan import TrainingPlan
from fedq.state.partials import SCALE_BITS, to_fixed_point
from fedq.tasks import cancel_and_wait
from proto import fedq_v1_pb2 as pb
from proto.codec import decode_tensors, encode_tensors
from tests.support import as_stream, start_stack, update_for, upload_chunks
from workers import AggregationWorker, WorkerSettings

CLIENTS = ["a", "b", "c"]


def _async_settings(**changes) -> CoordinatorSettings:
    values = dict(
        rounds=5,
        clients_per_round=3,
        round_timeout_s=60,
        evaluate=False,
        mode="async",
        async_buffer=2,
        async_max_staleness=1,
        plan=TrainingPlan(round=0, dp_mode="none"),
    )
    values.update(changes)
    return CoordinatorSettings(**values)


async def _upload(stack, client_id: str, *, base: int, update, update_id: str):
    chunks = upload_chunks(
        client_id=client_id,
        token=stack.tokens[client_id],
        round_id=base,
        update_id=update_id,
        payload=encode_tensors(update),
    )
    return await stack.stub.SubmitUpdate(as_stream(chunks))


async def _advance(stack, worker_task_owner, *, to_version: int) -> None:
    for _ in range(600):
        await stack.manager.tick()
        federation = await stack.store.federation()
        record = await stack.store.round(federation.current_round)
        if federation.current_round >= to_version and record.status == "open":
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"version {to_version} did not open")


async def test_a_version_is_made_of_k_updates_and_stale_ones_are_discounted(redis, queue):
    stack = await start_stack(redis, queue, clients=CLIENTS, settings=_async_settings())
    worker = AggregationWorker(
        queue=queue, redis=redis, settings=WorkerSettings(batch_updates=1, flush_s=0.05)
    )
    task = asyncio.create_task(worker.run())
    shapes = {k: v for k, v in stack.initial.items() if v.dtype.kind == "f"}
    updates = {c: update_for(shapes, seed=i) for i, c in enumerate(CLIENTS)}
    try:
        await _upload(stack, "a", base=1, update=updates["a"], update_id="a-v1")
        await _upload(stack, "b", base=1, update=updates["b"], update_id="b-v1")
        await _advance(stack, task, to_version=2)

        # c trained on version 1; it arrives while version 2 is open: staleness 1.
        reply = await _upload(stack, "c", base=1, update=updates["c"], update_id="c-v1")
        again = await _upload(stack, "c", base=1, update=updates["c"], update_id="c-v1")
        await _upload(stack, "a", base=2, update=updates["a"], update_id="a-v2")
        await _advance(stack, task, to_version=3)
        with pytest.raises(grpc.aio.AioRpcError) as too_stale:
            await _upload(stack, "b", base=1, update=updates["b"], update_id="b-late")
        v2 = await stack.store.round(2)
        blob2, _ = await stack.store.model(2)
        blob3, _ = await stack.store.model(3)
    finally:
        await cancel_and_wait(task)
        await stack.close()

    assert reply.outcome == pb.SubmitReply.ACCEPTED
    assert again.outcome == pb.SubmitReply.DUPLICATE
    assert v2.aggregated == 2 and v2.examples == 100 + 71  # round(100 / sqrt(2)) = 71
    assert too_stale.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "too stale" in too_stale.value.details()

    model2 = decode_tensors(blob2, max_bytes=1 << 20)
    model3 = decode_tensors(blob3, max_bytes=1 << 20)
    for name in shapes:
        total = to_fixed_point(updates["c"][name].ravel(), 71) + to_fixed_point(
            updates["a"][name].ravel(), 100
        )
        mean = total.astype(np.float64) / 2.0**SCALE_BITS / 171
        expected = model2[name].astype(np.float64) + mean.reshape(shapes[name].shape)
        assert model3[name].tobytes() == expected.astype(np.float32).tobytes()


async def test_the_synchronous_path_is_the_default(redis, queue):
    stack = await start_stack(redis, queue, clients=["a"])
    try:
        federation = await stack.store.federation()
    finally:
        await stack.close()

    assert federation.mode == "sync"


async def test_asynchronous_mode_trains_mnist_above_90_percent(
    redis, queue, data_root, redis_url, amqp_url
):
    settings = CoordinatorSettings(
        dataset="mnist",
        data_dir=str(data_root),
        rounds=12,
        clients_per_round=6,
        round_timeout_s=120,
        mode="async",
        async_buffer=3,
        async_max_staleness=4,
        seed=2,
        plan=TrainingPlan(
            round=0,
            dp_mode="none",
            batch_size=64,
            local_steps=35,
            learning_rate=0.5,
            codec="blosc2",
        ),
    )

    summary = await run_federation(
        settings,
        ServiceUrls(amqp_url=amqp_url, redis_url=redis_url),
        FederationOptions(clients=6, workers=1, progress=io.StringIO(), speed_spread=2.0),
    )

    assert [r["status"] for r in summary.rounds] == ["finalized"] * 12
    assert all(r["updates_aggregated"] >= 3 for r in summary.rounds)
    accuracies = [r["test_accuracy"] for r in summary.rounds]
    assert max(accuracies[-3:]) > 0.90, accuracies

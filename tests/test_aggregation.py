"""Workers and partial sums: exact FedAvg, worker-count independence, exactly-once counting."""

from __future__ import annotations

import asyncio
import signal
import time

import numpy as np
import pytest

from fedq.config import SettingsError
from fedq.queue.message import QueuedUpdate
from fedq.state import PartialSumStore, RoundStore
from fedq.state.partials import SCALE_BITS, to_fixed_point
from fedq.tasks import cancel_and_wait
from fedq.tensors import ModelSpec
from proto.codec import decode_tensors, encode_tensors
from tests.support import start_stack, start_worker_process, submit, update_for
from workers import AggregationWorker, WorkerSettings

CLIENTS = [f"c{i:02d}" for i in range(12)]


def _examples(i: int) -> int:
    return 50 + 37 * i


async def _submit_all(stack, updates):
    for i, (client_id, update) in enumerate(updates.items()):
        await submit(
            stack, client_id, update, update_id=f"{client_id}-r1", num_examples=_examples(i)
        )


async def _aggregate_with_workers(stack, redis, queue, *, workers: int) -> dict[str, np.ndarray]:
    settings = WorkerSettings(batch_updates=3, flush_s=0.05)
    tasks = [
        asyncio.create_task(
            AggregationWorker(queue=queue, redis=redis, settings=settings, name=f"w{i}").run()
        )
        for i in range(workers)
    ]
    try:
        for _ in range(400):
            if await stack.manager.tick():
                break
            record = await stack.store.round(1)
            if record.status == "finalized":
                break
            await asyncio.sleep(0.05)
    finally:
        await cancel_and_wait(*tasks)

    blob, _ = await stack.store.model(2)
    return decode_tensors(blob, max_bytes=1 << 20)


async def _run_round(redis, queue, updates, *, workers: int):
    stack = await start_stack(redis, queue, clients=list(updates))
    try:
        await _submit_all(stack, updates)
        return stack.initial, await _aggregate_with_workers(stack, redis, queue, workers=workers)
    finally:
        await stack.close()


def _reset(redis):
    from fedq.state.rounds import reset_federation

    return reset_federation(redis)


async def test_aggregated_model_is_the_example_weighted_mean_of_the_updates(redis, queue):
    updates = {
        c: update_for(
            {"layer.weight": np.zeros((8, 4), np.float32), "layer.bias": np.zeros(8, np.float32)},
            seed=i,
        )
        for i, c in enumerate(CLIENTS)
    }

    initial, model = await _run_round(redis, queue, updates, workers=2)

    weights = np.array([_examples(i) for i in range(len(CLIENTS))], dtype=np.float64)
    for name in ("layer.weight", "layer.bias"):
        stacked = np.stack([updates[c][name].astype(np.float64) for c in CLIENTS])
        expected = initial[name] + np.tensordot(weights, stacked, axes=1) / weights.sum()
        resolution = 2.0**-SCALE_BITS
        assert np.max(np.abs(model[name] - expected)) <= resolution + 1e-6
    assert np.array_equal(model["steps"], initial["steps"])


async def test_one_worker_and_three_workers_give_bit_identical_models(redis, queue):
    updates = {
        c: update_for(
            {"layer.weight": np.zeros((8, 4), np.float32), "layer.bias": np.zeros(8, np.float32)},
            seed=100 + i,
            scale=0.3,
        )
        for i, c in enumerate(CLIENTS)
    }

    _, one = await _run_round(redis, queue, updates, workers=1)
    await _reset(redis)
    await queue.purge_updates()
    _, three = await _run_round(redis, queue, updates, workers=3)

    for name in one:
        assert one[name].tobytes() == three[name].tobytes()


def test_fixed_point_sums_do_not_depend_on_order():
    rng = np.random.default_rng(0)
    updates = [(rng.standard_normal(1000), int(rng.integers(1, 5000))) for _ in range(50)]

    forward = sum(to_fixed_point(u, n) for u, n in updates)
    backward = sum(to_fixed_point(u, n) for u, n in reversed(updates))
    halves = sum(to_fixed_point(u, n) for u, n in updates[::2]) + sum(
        to_fixed_point(u, n) for u, n in updates[1::2]
    )

    assert np.array_equal(forward, backward) and np.array_equal(forward, halves)


async def test_a_redelivered_update_is_counted_once(redis, queue):
    stack = await start_stack(redis, queue, clients=["a", "b"])
    try:
        update = update_for(stack.initial, seed=1)
        await submit(stack, "a", update, update_id="a-r1", num_examples=10)
        message = QueuedUpdate(
            update_id="a-r1",
            round=1,
            client_id="a",
            num_examples=10,
            codec="blosc2",
            payload=encode_tensors(update),
            accepted_at=0.0,
        )
        await queue.publish(message.encode(), message_id="a-r1", headers={})
        await queue.publish(message.encode(), message_id="a-r1", headers={})

        worker = AggregationWorker(
            queue=queue, redis=redis, settings=WorkerSettings(batch_updates=1, flush_s=0.05)
        )
        task = asyncio.create_task(worker.run())
        for _ in range(100):
            if (await queue.stats()).ready == 0 and worker.committed_updates >= 1:
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)
        await cancel_and_wait(task)

        spec = (await stack.store.federation()).spec
        total = await PartialSumStore(redis).round_sum(1, size=spec.update_size)
        assert total.count == 1 and total.examples == 10
        assert await PartialSumStore(redis).applied_ids(1) == {"a-r1"}
        assert await PartialSumStore(redis).applied_count(1) == 1
    finally:
        await stack.close()


async def test_a_partial_batch_commits_once_deliveries_pause(redis, queue):
    stack = await start_stack(redis, queue, clients=["a", "b"])
    slow_flush = WorkerSettings(batch_updates=100, flush_s=600.0, flush_idle_s=0.05)
    worker = AggregationWorker(queue=queue, redis=redis, settings=slow_flush)
    task = asyncio.create_task(worker.run())
    try:
        for i, client_id in enumerate(["a", "b"]):
            update = update_for(stack.initial, seed=i)
            await submit(stack, client_id, update, update_id=f"{client_id}-r1", num_examples=10)

        deadline = time.monotonic() + 20
        while await PartialSumStore(redis).applied_count(1) < 2:
            assert time.monotonic() < deadline, "two updates waited for a full batch"
            await asyncio.sleep(0.05)
        assert worker.committed_updates == 2
    finally:
        await cancel_and_wait(task)
        await stack.close()


def test_worker_settings_refuse_a_non_positive_idle_flush():
    with pytest.raises(SettingsError, match="FEDQ_WORKER_FLUSH_IDLE_S"):
        WorkerSettings(flush_idle_s=0)


async def test_a_commit_refuses_update_ids_already_counted(redis):
    store, partials = RoundStore(redis), PartialSumStore(redis)
    await redis.hset("fedq:round:{1}", mapping={"status": "open"})
    vector = np.arange(4, dtype=np.int64)

    first = await partials.commit(
        1, owner="w1", total=vector, examples=3, count=1, update_ids=["u1"]
    )
    second = await partials.commit(
        1, owner="w2", total=vector, examples=3, count=1, update_ids=["u1"]
    )
    await redis.hset("fedq:round:{1}", "status", "finalized")
    late = await partials.commit(
        1, owner="w3", total=vector, examples=1, count=1, update_ids=["u9"]
    )

    assert first.status == "ok"
    assert second.status == "duplicate" and second.duplicates == ["u1"]
    assert late.status == "closed"
    assert (await partials.round_sum(1, size=4)).count == 1
    assert store is not None


async def test_sigkill_of_a_worker_mid_round_loses_nothing_and_counts_nothing_twice(
    redis, queue, redis_url, amqp_url
):
    clients = [f"k{i:02d}" for i in range(30)]
    initial = {"w": np.zeros(400_000, np.float32), "b": np.zeros(10, np.float32)}
    stack = await start_stack(redis, queue, clients=clients, initial=initial)
    updates = {c: update_for(initial, seed=i, scale=0.01) for i, c in enumerate(clients)}
    for i, (c, u) in enumerate(updates.items()):
        await submit(stack, c, u, update_id=f"{c}-r1", num_examples=_examples(i))

    victim = start_worker_process(redis_url, amqp_url, FEDQ_WORKER_BATCH_UPDATES="2")
    survivor = None
    try:
        deadline = time.monotonic() + 60
        while int(await redis.hget("fedq:round:{1}", "aggregated") or 0) < 4:
            assert time.monotonic() < deadline, "the worker committed nothing"
            await asyncio.sleep(0.01)
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        aggregated_at_kill = int(await redis.hget("fedq:round:{1}", "aggregated"))
        assert aggregated_at_kill < len(clients), "kill came after all updates were counted"

        survivor = start_worker_process(redis_url, amqp_url, FEDQ_WORKER_BATCH_UPDATES="2")
        while len(await stack.partials.applied_ids(1)) < len(clients):
            assert time.monotonic() < deadline + 60, "updates were lost"
            await asyncio.sleep(0.1)
    finally:
        for process in (victim, survivor):
            if process is not None and process.poll() is None:
                process.terminate()
                process.wait(10)
        await stack.close()

    spec = ModelSpec.from_arrays(initial)
    total = await stack.partials.round_sum(1, size=spec.update_size)
    expected = sum(
        to_fixed_point(spec.flatten_update(u), _examples(i)) for i, u in enumerate(updates.values())
    )
    assert total.count == len(clients)
    assert total.examples == sum(_examples(i) for i in range(len(clients)))
    assert np.array_equal(total.total, expected)

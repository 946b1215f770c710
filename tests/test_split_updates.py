"""Updates larger than one broker message: queued in parts, counted exactly once."""

from __future__ import annotations

import asyncio
import hashlib
import signal
import time

import numpy as np

from coordinator.settings import GatewaySettings
from fedq.queue.message import QueuedUpdate
from fedq.state.partials import to_fixed_point
from fedq.tasks import cancel_and_wait
from fedq.tensors import ModelSpec
from proto import fedq_v1_pb2 as pb
from proto.codec import encode_tensors
from tests.support import start_stack, start_worker_process, submit
from workers import AggregationWorker, WorkerSettings

PARAMETERS = 2_000_000
MESSAGE_BYTES = 1 << 20


def _model() -> dict[str, np.ndarray]:
    return {"big.weight": np.zeros(PARAMETERS, np.float32), "big.bias": np.zeros(10, np.float32)}


def _update(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "big.weight": (rng.standard_normal(PARAMETERS) * 0.01).astype(np.float32),
        "big.bias": (rng.standard_normal(10) * 0.01).astype(np.float32),
    }


def _expected(update: dict[str, np.ndarray], examples: int) -> np.ndarray:
    return to_fixed_point(ModelSpec.from_arrays(_model()).flatten_update(update), examples)


def _parts(update_id: str, payload: bytes, *, step: int, examples: int) -> list[QueuedUpdate]:
    digest = hashlib.sha256(payload).hexdigest()
    count = -(-len(payload) // step)
    return [
        QueuedUpdate(
            update_id=update_id,
            round=1,
            client_id="big",
            num_examples=examples,
            codec="blosc2",
            payload=payload[i * step : (i + 1) * step],
            accepted_at=0.0,
            part=i,
            parts=count,
            digest=digest,
        )
        for i in range(count)
    ]


async def _publish(queue, parts: list[QueuedUpdate]) -> None:
    for part in parts:
        await queue.publish(part.encode(), message_id=part.update_id, headers={"part": part.part})


async def _wait_for(condition, *, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not await condition():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.05)


async def test_an_update_larger_than_one_message_is_queued_in_parts_and_counted_once(redis, queue):
    stack = await start_stack(
        redis,
        queue,
        clients=["big"],
        initial=_model(),
        gateway_settings=GatewaySettings(max_message_bytes=MESSAGE_BYTES),
    )
    update = _update(1)
    try:
        reply = await submit(stack, "big", update, update_id="big-r1", num_examples=40)
        queued = (await queue.stats()).ready
        # A second copy of every part, as after a redelivery or a client's retry.
        payload = encode_tensors(update)
        await _publish(queue, _parts("big-r1", payload, step=MESSAGE_BYTES - 4096, examples=40))

        worker = AggregationWorker(
            queue=queue, redis=redis, settings=WorkerSettings(batch_updates=2, flush_s=0.05)
        )
        task = asyncio.create_task(worker.run())
        try:

            async def drained() -> bool:
                return (await queue.stats()).ready == 0 and worker.committed_updates >= 1

            await _wait_for(drained, timeout_s=60, what="the split update was not counted")

            # Deliveries still in the worker's hands finish after the queue looks empty.
            async def parts_discarded() -> bool:
                return not [k async for k in redis.scan_iter(match="fedq:round:{1}:parts:*")]

            await _wait_for(parts_discarded, timeout_s=20, what="a parts hash was left behind")
            await asyncio.sleep(0.5)
        finally:
            await cancel_and_wait(task)
    finally:
        await stack.close()

    assert reply.outcome == pb.SubmitReply.ACCEPTED
    assert queued == -(-len(payload) // (MESSAGE_BYTES - 4096)) > 1
    total = await stack.partials.round_sum(1, size=PARAMETERS + 10)
    assert total.count == 1 and total.examples == 40
    assert np.array_equal(total.total, _expected(update, 40))
    assert (await queue.stats()).dead == 0
    assert not [k async for k in redis.scan_iter(match="fedq:round:{1}:parts:*")]


async def test_a_worker_killed_between_parts_loses_nothing_and_counts_nothing_twice(
    redis, queue, redis_url, amqp_url
):
    stack = await start_stack(redis, queue, clients=["big"], initial=_model())
    update = _update(2)
    parts = _parts("big-r1", encode_tensors(update), step=MESSAGE_BYTES - 4096, examples=25)
    half = len(parts) // 2
    victim = survivor = None
    try:
        await _publish(queue, parts[:half])
        victim = start_worker_process(redis_url, amqp_url)

        async def first_half_stored() -> bool:
            held = [k async for k in redis.scan_iter(match="fedq:round:{1}:parts:*")]
            return bool(held) and await redis.hlen(held[0]) == half

        await _wait_for(first_half_stored, timeout_s=60, what="the worker stored no parts")
        victim.send_signal(signal.SIGKILL)
        victim.wait()

        # The rest arrives after the crash, with a redelivered copy of an early part.
        await _publish(queue, [*parts[half:], parts[0]])
        survivor = start_worker_process(redis_url, amqp_url)

        async def counted() -> bool:
            return bool(await stack.partials.applied_ids(1)) and (await queue.stats()).ready == 0

        await _wait_for(counted, timeout_s=60, what="the update was lost")
        await asyncio.sleep(1.0)
    finally:
        for process in (victim, survivor):
            if process is not None and process.poll() is None:
                process.terminate()
                process.wait(10)
        await stack.close()

    assert len(parts) > 2
    total = await stack.partials.round_sum(1, size=PARAMETERS + 10)
    assert total.count == 1 and total.examples == 25
    assert np.array_equal(total.total, _expected(update, 25))
    assert (await queue.stats()).dead == 0

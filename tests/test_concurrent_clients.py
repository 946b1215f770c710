"""Fifty clients submitting at once through the gateway, the broker and two workers."""

from __future__ import annotations

import asyncio
import time

import grpc
import numpy as np

from fedq.state.partials import to_fixed_point
from fedq.tasks import cancel_and_wait
from fedq.tensors import ModelSpec
from proto import fedq_v1_pb2 as pb
from proto import fedq_v1_pb2_grpc as pb_grpc
from proto.codec import decode_tensors, encode_tensors
from tests.support import as_stream, start_stack, upload_chunks
from workers import AggregationWorker, WorkerSettings

CLIENTS = [f"cc{i:02d}" for i in range(50)]


def _model() -> dict[str, np.ndarray]:
    return {
        "conv.weight": np.zeros((32, 1, 5, 5), np.float32),
        "fc.weight": np.zeros((10, 2000), np.float32),
        "fc.bias": np.zeros(10, np.float32),
    }


def _payload(i: int) -> tuple[str, bytes]:
    rng = np.random.default_rng(i)
    update = {
        n: (rng.standard_normal(a.shape) * 0.01).astype(np.float32) for n, a in _model().items()
    }
    codec = "q8" if i % 2 else "blosc2"
    return codec, encode_tensors(update, codec=codec, rng=rng)


async def _client(port: int, client_id: str, token: str, i: int) -> pb.SubmitReply:
    codec, payload = _payload(i)
    chunks = upload_chunks(
        client_id=client_id,
        token=token,
        round_id=1,
        update_id=f"{client_id}-r1",
        payload=payload,
        num_examples=10 + i,
        codec=codec,
        chunk_bytes=16 << 10,
    )
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        return await pb_grpc.FederationStub(channel).SubmitUpdate(as_stream(chunks), timeout=60)


async def test_fifty_concurrent_clients_are_each_counted_exactly_once(redis, queue):
    stack = await start_stack(redis, queue, clients=CLIENTS, initial=_model())
    settings = WorkerSettings(batch_updates=4, flush_s=0.05)
    workers = [
        AggregationWorker(queue=queue, redis=redis, settings=settings, name=f"cw{i}")
        for i in range(2)
    ]
    tasks = [asyncio.create_task(w.run()) for w in workers]
    try:
        replies = await asyncio.gather(
            *(_client(stack.gateway.port, c, stack.tokens[c], i) for i, c in enumerate(CLIENTS))
        )
        deadline = time.monotonic() + 60
        while len(await stack.partials.applied_ids(1)) < len(CLIENTS):
            assert time.monotonic() < deadline, "some accepted updates were never counted"
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)  # time for a stray second count to show up
    finally:
        await cancel_and_wait(*tasks)
        await stack.close()

    spec = ModelSpec.from_arrays(_model())
    expected = sum(
        to_fixed_point(
            spec.flatten_update(decode_tensors(_payload(i)[1], max_bytes=1 << 20)), 10 + i
        )
        for i in range(len(CLIENTS))
    )
    total = await stack.partials.round_sum(1, size=spec.update_size)
    assert all(r.outcome == pb.SubmitReply.ACCEPTED for r in replies)
    assert await stack.partials.applied_ids(1) == {f"{c}-r1" for c in CLIENTS}
    assert total.count == len(CLIENTS)
    assert total.examples == sum(10 + i for i in range(len(CLIENTS)))
    assert np.array_equal(total.total, expected)
    assert sum(w.committed_updates for w in workers) == len(CLIENTS)

"""A 20M-parameter model through FetchModel, SubmitUpdate and a worker."""

from __future__ import annotations

import asyncio
import hashlib

import numpy as np

from clients.client import FederatedClient
from clients.connection import GatewayLink, RetryPolicy
from fedq.tasks import cancel_and_wait
from proto import fedq_v1_pb2 as pb
from proto.codec import decode_tensors, encode_tensors
from tests.support import start_stack
from workers import AggregationWorker, WorkerSettings

PARAMETERS = 20_000_000


async def test_a_20m_parameter_model_is_fetched_submitted_and_aggregated(redis, queue):
    rng = np.random.default_rng(0)
    initial = {"big.weight": rng.standard_normal(PARAMETERS, dtype=np.float32)}
    stack = await start_stack(redis, queue, clients=["big"], initial=initial)
    link = GatewayLink([f"127.0.0.1:{stack.gateway.port}"], policy=RetryPolicy())
    client = FederatedClient(
        client_id="big", link=link, num_examples=100, trainer=None, token=stack.tokens["big"]
    )
    try:
        blob = await client.fetch_model(1)
        fetched = decode_tensors(blob, max_bytes=PARAMETERS * 4)
        update = {"big.weight": np.full(PARAMETERS, 0.5, dtype=np.float32)}
        reply = await client.submit(
            1, update_id="big-r1", payload=encode_tensors(update), num_examples=100
        )

        worker = AggregationWorker(queue=queue, redis=redis, settings=WorkerSettings())
        task = asyncio.create_task(worker.run())
        for _ in range(600):
            if await stack.partials.applied_ids(1):
                break
            await asyncio.sleep(0.05)
        await cancel_and_wait(task)
    finally:
        await link.close()
        await stack.close()

    assert len(blob) > 4 << 20, "the model must need more than one gRPC message"
    assert hashlib.sha256(blob).hexdigest() == (await stack.store.model(1))[1]
    assert np.array_equal(fetched["big.weight"], initial["big.weight"])
    assert reply.outcome == pb.SubmitReply.ACCEPTED
    total = await stack.partials.round_sum(1, size=PARAMETERS)
    assert total.count == 1 and np.all(total.mean_update() == 0.5)

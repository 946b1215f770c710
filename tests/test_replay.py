"""Replaying finished rounds from the update archive: stream on RabbitMQ, files when embedded."""

from __future__ import annotations

import asyncio
import time

import fakeredis
import numpy as np
import pytest

from coordinator.settings import GatewaySettings
from fedq.archive.disk import DiskArchive
from fedq.archive.stream import StreamArchive
from fedq.cli import _parser
from fedq.queue.memory import MemoryQueue
from fedq.queue.message import QueuedUpdate
from fedq.replay import ReplayError, replay_round, robust_update, run_replay_command
from fedq.tasks import cancel_and_wait
from proto.codec import encode_tensors
from tests.support import small_model, start_stack, submit, update_for
from workers import AggregationWorker, WorkerSettings

# Two ordinary clients and one whose update is a hundred times larger.
SKEWED = {"a": (0.01, 10), "b": (0.01, 20), "c": (1.0, 30)}


async def _finish_round(redis, queue, **stack_options) -> object:
    """Round 1 with the skewed updates, aggregated by an in-process worker."""
    stack = await start_stack(redis, queue, clients=list(SKEWED), **stack_options)
    settings = WorkerSettings(batch_updates=2, flush_s=0.05)
    task = asyncio.create_task(
        AggregationWorker(queue=queue, redis=redis, settings=settings, name="replay-w").run()
    )
    try:
        for i, (client_id, (scale, examples)) in enumerate(SKEWED.items()):
            update = update_for(stack.initial, seed=i, scale=scale)
            await submit(
                stack, client_id, update, update_id=f"{client_id}-r1", num_examples=examples
            )
        for _ in range(600):  # 30 s at most, for a busy machine
            await stack.manager.tick()
            if (await stack.store.round(1)).status == "finalized":
                break
            await asyncio.sleep(0.05)
    finally:
        await cancel_and_wait(task)
        await stack.close()
    assert (await stack.store.round(1)).status == "finalized"
    return stack


async def test_a_finished_round_replays_from_the_stream_to_its_recorded_digest(
    redis, queue, redis_url, amqp_url, capsys
):
    # An earlier federation left a different update under the same id in the archive.
    stale_update = encode_tensors(update_for(small_model(), seed=99, scale=3.0))
    stale = QueuedUpdate("a-r1", 1, "a", 10, "blosc2", stale_update, time.time() - 30)
    await queue.publish(stale.encode(), message_id="a-r1", headers={"round": 1})
    await queue.purge_updates()
    stack = await _finish_round(redis, queue)

    archive = await StreamArchive.connect(amqp_url, idle_s=0.5)
    async with archive:
        fedavg = await replay_round(1, store=stack.store, partials=stack.partials, archive=archive)
        median = await replay_round(
            1, store=stack.store, partials=stack.partials, archive=archive, rule="median"
        )
    args = _parser().parse_args(
        ["replay", "--round", "1", "--redis-url", redis_url, "--amqp-url", amqp_url]
    )
    args.idle_s = 0.5
    status = await run_replay_command(args)

    assert fedavg.matches and fedavg.digest == (await stack.store.round(1)).next_digest
    assert (fedavg.replayed, fedavg.applied, fedavg.missing) == (3, 3, ())
    assert fedavg.l2_distance == 0.0
    assert median.digest != fedavg.digest and median.l2_distance > 0.01
    assert status == 0 and capsys.readouterr().out.strip().endswith("match")


async def test_the_disk_archive_replays_an_embedded_round_of_split_updates(tmp_path):
    redis = fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer())
    queue = MemoryQueue(archive=DiskArchive(tmp_path))
    # Updates of about 100 KiB, queued as two messages each.
    initial = {"w": np.zeros(25_000, np.float32), "b": np.zeros(8, np.float32)}
    split = GatewaySettings(max_message_bytes=64 << 10)
    try:
        stack = await _finish_round(redis, queue, initial=initial, gateway_settings=split)
        archive = DiskArchive(tmp_path)
        with archive.round_path(1).open("ab") as file:
            file.write(b"\xc5\x00\x10partial")  # a record cut short by a crash
        fedavg = await replay_round(1, store=stack.store, partials=stack.partials, archive=archive)
        trimmed = await replay_round(
            1,
            store=stack.store,
            partials=stack.partials,
            archive=archive,
            rule="trimmed-mean",
            trim=0.34,
        )
    finally:
        await queue.close()
        await redis.aclose()

    assert fedavg.matches and fedavg.replayed == 3
    parts = [u.parts async for u in archive.read_round(1)]
    assert parts == [2] * 6
    assert [p.name for p in tmp_path.iterdir()] == ["round-000001.msgpack"]
    assert not trimmed.matches and trimmed.l2_distance > 0.01


def test_robust_rules_ignore_an_outlier_that_the_mean_follows():
    updates = np.array([[1.0, -1.0], [2.0, -2.0], [3.0, -3.0], [400.0, 500.0]])

    median = robust_update(updates, "median")
    trimmed = robust_update(updates, "trimmed-mean", trim=0.25)

    assert np.array_equal(median, [2.5, -1.5])
    assert np.array_equal(trimmed, [2.5, -1.5])
    with pytest.raises(ReplayError, match="trim"):
        robust_update(updates, "trimmed-mean", trim=0.5)

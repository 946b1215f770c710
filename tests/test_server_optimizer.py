"""The server's step: FedAvg unchanged by default, FedAvgM kept across rounds and replays."""

from __future__ import annotations

import fakeredis
import numpy as np
import pytest

from coordinator.rounds.aggregation import apply_mean_update
from coordinator.rounds.server_optimizer import (
    ServerOptimizer,
    decode_velocity,
    encode_velocity,
)
from coordinator.settings import CoordinatorSettings
from fedq.archive.disk import DiskArchive
from fedq.config import EnvReader, SettingsError
from fedq.plan import TrainingPlan
from fedq.queue.memory import MemoryQueue
from fedq.replay import replay_round
from fedq.state import RoundStore
from fedq.state.partials import RoundSum, to_fixed_point
from fedq.tensors import ModelSpec
from proto.codec import decode_tensors
from tests.support import small_model
from tests.test_replay import SKEWED, _finish_round


def _model() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"w": rng.normal(size=(4, 3)).astype(np.float32), "b": np.zeros(3, np.float32)}


def _round_sum(spec: ModelSpec, seed: int) -> RoundSum:
    update = np.random.default_rng(seed).normal(scale=0.1, size=spec.update_size)
    return RoundSum(to_fixed_point(update, 7), examples=7, count=1)


def test_the_default_step_is_fedavg_bit_for_bit():
    model = _model()
    spec = ModelSpec.from_arrays(model)
    round_sum = _round_sum(spec, 1)

    step = ServerOptimizer().step(model, spec, round_sum.mean_update(), None)
    fedavg = apply_mean_update(model, spec, round_sum)

    assert step.velocity is None
    for name in model:
        assert step.model[name].tobytes() == fedavg[name].tobytes()


def test_momentum_carries_the_last_rounds_update_into_the_next_step():
    model = _model()
    spec = ModelSpec.from_arrays(model)
    first, second = _round_sum(spec, 1).mean_update(), _round_sum(spec, 2).mean_update()
    optimizer = ServerOptimizer(learning_rate=0.5, momentum=0.9)

    one = optimizer.step(model, spec, first, None)
    kept = decode_velocity(encode_velocity(one.velocity), size=spec.update_size)
    two = optimizer.step(one.model, spec, second, kept)

    assert np.array_equal(one.velocity, first)
    assert np.allclose(two.velocity, 0.9 * first + second)
    moved = spec.flatten_update(two.model) - spec.flatten_update(one.model)
    assert np.allclose(moved, 0.5 * (0.9 * first + second), atol=1e-6)


def test_bad_server_settings_are_refused_with_the_variable_named():
    with pytest.raises(ValueError, match="momentum 1.0"):
        ServerOptimizer(momentum=1.0)
    with pytest.raises(SettingsError, match="FEDQ_SERVER_MOMENTUM"):
        CoordinatorSettings.from_env(EnvReader({"FEDQ_SERVER_MOMENTUM": "1.5"}))
    with pytest.raises(SettingsError, match="FEDQ_SERVER_LEARNING_RATE"):
        CoordinatorSettings.from_env(EnvReader({"FEDQ_SERVER_LEARNING_RATE": "0"}))
    with pytest.raises(ValueError, match="velocity has 3 values, expected 4"):
        decode_velocity(np.zeros(3).tobytes(), size=4)


async def test_a_round_with_momentum_stores_its_velocity_and_replays_to_its_digest(tmp_path):
    redis = fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer())
    queue = MemoryQueue(archive=DiskArchive(tmp_path))
    settings = CoordinatorSettings(
        rounds=3,
        clients_per_round=len(SKEWED),
        round_timeout_s=60,
        evaluate=False,
        plan=TrainingPlan(round=0, dp_mode="none", codec="blosc2"),
        server_learning_rate=0.7,
        server_momentum=0.5,
    )
    try:
        # The velocity an earlier round left behind.
        size = ModelSpec.from_arrays(small_model()).update_size
        earlier = np.linspace(-0.01, 0.01, num=size)
        await RoundStore(redis).put_velocity(1, encode_velocity(earlier))
        stack = await _finish_round(redis, queue, settings=settings)
        federation = await stack.store.federation()
        spec = federation.spec
        round_sum = await stack.partials.round_sum(1, size=spec.update_size)
        start = decode_tensors((await stack.store.model(1))[0], max_bytes=1 << 20)
        after = decode_tensors((await stack.store.model(2))[0], max_bytes=1 << 20)
        kept = decode_velocity(await stack.store.velocity(2), size=spec.update_size)
        replayed = await replay_round(
            1, store=stack.store, partials=stack.partials, archive=DiskArchive(tmp_path)
        )
    finally:
        await queue.close()
        await redis.aclose()

    assert (federation.server_learning_rate, federation.server_momentum) == (0.7, 0.5)
    assert np.allclose(kept, 0.5 * earlier + round_sum.mean_update())
    moved = spec.flatten_update(after) - spec.flatten_update(start)
    assert np.allclose(moved, 0.7 * kept, atol=1e-6)
    assert replayed.matches

"""Tests for local client training and evaluation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from clients.training import LocalResult, train_locally
from fedq.datasets import load_dataset, partition
from fedq.evaluation import evaluate
from fedq.models import build_model, model_arrays
from fedq.plan import TrainingPlan

MODEL = "mnist_cnn"


@pytest.fixture(scope="module")
def mnist_train(data_root):
    return load_dataset("mnist", root=data_root, train=True)


@pytest.fixture(scope="module")
def mnist_test(data_root):
    return load_dataset("mnist", root=data_root, train=False)


@pytest.fixture(scope="module")
def small_data(mnist_train):
    images, labels = mnist_train.tensors
    return TensorDataset(images[:512], labels[:512])


@pytest.fixture(scope="module")
def global_arrays():
    return model_arrays(build_model(MODEL, seed=0))


def _flat(delta):
    return np.concatenate([a.ravel().astype(np.float64) for a in delta.values()])


@pytest.mark.parametrize("dp_mode", ["none", "sample", "client"])
def test_every_dp_mode_returns_finite_float32_deltas_named_like_the_model(
    dp_mode, small_data, global_arrays
):
    plan = TrainingPlan(round=1, dp_mode=dp_mode, local_steps=5, sample_rate=0.1, seed=1)

    result = train_locally(MODEL, global_arrays, small_data, plan, threads=2)

    assert isinstance(result, LocalResult)
    assert list(result.delta) == list(global_arrays)
    for name, array in result.delta.items():
        assert array.shape == global_arrays[name].shape and array.dtype == np.float32
        assert np.isfinite(array).all()
    assert result.num_examples == 512 and result.steps == 5
    assert np.isfinite(result.loss) and result.seconds > 0
    assert np.any(_flat(result.delta) != 0)


def test_client_mode_adds_noise_with_the_configured_std(small_data, global_arrays):
    plan = TrainingPlan(
        round=1,
        dp_mode="client",
        noise_multiplier=0.5,
        clip_norm=0.2,
        local_steps=10,
        learning_rate=0.5,
        seed=5,
    )
    clean = train_locally(MODEL, global_arrays, small_data, plan.with_round(1, dp_mode="none"))

    noisy = train_locally(MODEL, global_arrays, small_data, plan)

    expected = _flat(clean.delta)
    expected *= min(1.0, plan.clip_norm / np.linalg.norm(expected))
    residual = _flat(noisy.delta) - expected
    assert residual.size > 20_000
    assert noisy.noise_std == pytest.approx(0.1)
    assert residual.std() == pytest.approx(0.1, rel=0.05)
    assert abs(residual.mean()) < 0.01


def test_client_mode_with_secure_rng_draws_fresh_noise_of_the_configured_std(
    small_data, global_arrays
):
    plan = TrainingPlan(
        round=1,
        dp_mode="client",
        noise_multiplier=1.0,
        clip_norm=0.3,
        local_steps=2,
        secure_rng=True,
    )

    first = _flat(train_locally(MODEL, global_arrays, small_data, plan).delta)
    second = _flat(train_locally(MODEL, global_arrays, small_data, plan).delta)

    # Same training, different noise: the difference of two draws has std sqrt(2) * 0.3.
    assert (first - second).std() == pytest.approx(np.sqrt(2) * 0.3, rel=0.05)


def test_sample_mode_is_reproducible_for_a_seed_and_changes_with_it(small_data, global_arrays):
    plan = TrainingPlan(round=1, dp_mode="sample", local_steps=4, sample_rate=0.125, seed=11)

    first = train_locally(MODEL, global_arrays, small_data, plan)
    again = train_locally(MODEL, global_arrays, small_data, plan)
    other = train_locally(MODEL, global_arrays, small_data, plan.with_round(1, seed=12))

    assert np.array_equal(_flat(first.delta), _flat(again.delta))
    assert not np.array_equal(_flat(first.delta), _flat(other.delta))
    assert first.noise_std == pytest.approx(plan.noise_multiplier * plan.clip_norm / 64)


def test_sample_mode_survives_empty_poisson_batches(global_arrays, mnist_train):
    images, labels = mnist_train.tensors
    tiny = TensorDataset(images[:20], labels[:20])
    plan = TrainingPlan(round=1, dp_mode="sample", sample_rate=0.05, local_steps=10)

    result = train_locally(MODEL, global_arrays, tiny, plan)

    assert all(np.isfinite(a).all() for a in result.delta.values())


def test_fedprox_keeps_the_update_closer_to_the_global_model(small_data, global_arrays):
    plain = TrainingPlan(round=1, dp_mode="none", local_steps=20, learning_rate=0.5)
    proximal = plain.with_round(1, fedprox_mu=1.0)

    free = train_locally(MODEL, global_arrays, small_data, plain)
    pulled = train_locally(MODEL, global_arrays, small_data, proximal)

    assert np.linalg.norm(_flat(pulled.delta)) < 0.95 * np.linalg.norm(_flat(free.delta))


def test_empty_client_data_is_refused(global_arrays):
    empty = TensorDataset(torch.zeros(0, 1, 28, 28), torch.zeros(0, dtype=torch.int64))

    with pytest.raises(ValueError, match="client data set is empty"):
        train_locally(MODEL, global_arrays, empty, TrainingPlan(round=3))


def test_one_round_on_6000_examples_reaches_85_percent_test_accuracy(
    mnist_train, mnist_test, global_arrays
):
    images, labels = mnist_train.tensors
    part = partition(labels.numpy(), 10, seed=0)[0]
    local = TensorDataset(images[part], labels[part])
    plan = TrainingPlan(
        round=1, dp_mode="none", batch_size=64, local_steps=100, learning_rate=0.5, seed=0
    )

    result = train_locally(MODEL, global_arrays, local, plan, threads=2)
    trained = {k: v + result.delta[k] for k, v in global_arrays.items()}
    accuracy, loss = evaluate(MODEL, trained, mnist_test)

    assert len(local) == 6000
    assert accuracy > 0.85
    assert loss < 0.6


def test_untrained_model_scores_near_chance(mnist_test, global_arrays):
    accuracy, loss = evaluate(MODEL, global_arrays, mnist_test, batch_size=4096)

    assert 0.0 <= accuracy < 0.25
    assert loss == pytest.approx(np.log(10), rel=0.1)

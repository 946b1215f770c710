"""Differential privacy end to end: custom models, the DP-SGD noise scale, client-level DP."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from clients.training import train_locally
from coordinator.settings import CoordinatorSettings, ServiceUrls
from fedq.cli import main
from fedq.federation import FederationOptions, run_federation
from fedq.models import build_model, make_dp_compatible, model_arrays
from fedq.plan import TrainingPlan

CUSTOM_MODEL = "tests.custom_models:small_bn_cnn"


async def test_a_custom_batchnorm_model_trains_a_dp_sgd_round_through_the_federation(data_root):
    settings = CoordinatorSettings(
        dataset="mnist",
        model=CUSTOM_MODEL,
        data_dir=str(data_root),
        rounds=1,
        clients_per_round=2,
        round_timeout_s=120,
        plan=TrainingPlan(
            round=0, dp_mode="sample", batch_size=32, local_steps=5, learning_rate=0.5
        ),
    )

    summary = await run_federation(
        settings, ServiceUrls(), FederationOptions(clients=2, workers=1, train_threads=2)
    )

    assert [r["status"] for r in summary.rounds] == ["finalized"]
    assert summary.rounds[0]["updates_aggregated"] == 2
    assert 0.0 <= summary.final_accuracy <= 1.0
    assert len(summary.privacy) == 2
    assert all(0 < p["epsilon_spent"] < math.inf for p in summary.privacy)


def test_sample_mode_update_is_the_clipped_gradient_plus_noise_of_the_configured_scale():
    # With sample_rate 1 Poisson sampling takes every example, so the noiseless step is
    # known: the sum of per-sample gradients clipped to C, over the expected batch size.
    # The noise is set about as large as that step, so a wrong clipped part shows too.
    examples, clip, noise, lr = 64, 0.5, 0.1, 0.1
    generator = torch.Generator().manual_seed(7)
    data = TensorDataset(
        torch.randn(examples, 1, 28, 28, generator=generator),
        torch.randint(0, 10, (examples,), generator=generator),
    )
    arrays = model_arrays(build_model("mnist_cnn", seed=3))
    plan = TrainingPlan(
        round=1,
        dp_mode="sample",
        noise_multiplier=noise,
        clip_norm=clip,
        sample_rate=1.0,
        batch_size=examples,
        local_steps=1,
        learning_rate=lr,
        seed=11,
    )

    result = train_locally("mnist_cnn", arrays, data, plan)
    step = -np.concatenate([result.delta[name].ravel() for name in arrays]) / lr
    clipped_mean = _clipped_mean_gradient(arrays, data, clip=clip, batch=examples)
    residual = step.astype(np.float64) - clipped_mean

    expected_std = noise * clip / examples
    assert result.noise_std == pytest.approx(expected_std)
    assert np.std(residual) == pytest.approx(expected_std, rel=0.10)
    assert abs(np.mean(residual)) < 0.05 * expected_std
    assert np.std(step) > 1.1 * expected_std  # the clipped step is not negligible


def test_fedq_run_with_client_level_dp_finishes_a_round_and_reports_epsilon(
    data_root, capsys, monkeypatch
):
    for name in ("FEDQ_AMQP_URL", "FEDQ_REDIS_URL", "FEDQ_DP_MODE", "FEDQ_CLIENTS_PER_ROUND"):
        monkeypatch.delenv(name, raising=False)

    status = main(
        [
            "--log-level",
            "WARNING",
            "run",
            "--dataset",
            "mnist",
            "--data-dir",
            str(data_root),
            "--clients",
            "2",
            "--rounds",
            "1",
            "--dp-mode",
            "client",
            "--noise-multiplier",
            "1.0",
            "--local-steps",
            "5",
            "--batch-size",
            "32",
        ]
    )

    out = capsys.readouterr().out
    assert status == 0
    assert re.search(r"round\s+1\s+finalized", out)
    spent = re.search(r"client-level DP, noise multiplier 1\.0, .*ε per client max ([0-9.]+)", out)
    assert spent is not None, out
    assert 0 < float(spent.group(1)) < math.inf
    assert "final test accuracy" in out


def _clipped_mean_gradient(
    arrays: dict[str, np.ndarray], data: TensorDataset, *, clip: float, batch: int
) -> np.ndarray:
    """Sum of per-sample gradients, each clipped to ``clip`` in L2 norm, over ``batch``."""
    model = make_dp_compatible(build_model("mnist_cnn"))
    model.load_state_dict({k: torch.as_tensor(v) for k, v in arrays.items()})
    params = [p for p in model.parameters() if p.requires_grad]

    total = np.zeros(sum(p.numel() for p in params))
    for inputs, label in zip(*data.tensors, strict=True):
        loss = F.cross_entropy(model(inputs[None]), label[None])
        grads = torch.autograd.grad(loss, params)
        flat = torch.cat([g.reshape(-1) for g in grads]).double().numpy()
        total += flat * min(1.0, clip / max(np.linalg.norm(flat), 1e-12))
    return total / batch

"""Centralized training on the whole training set, with a training clock and evaluations.

The baseline of ``benchmarks.time_to_accuracy``: the federation's model trained in one
process on all 60,000 MNIST examples, with plain minibatch SGD or Opacus DP-SGD
(Poisson sampling, per-sample clipping, Gaussian noise, RDP accountant). The test
accuracy is measured every ``eval_every`` steps; the clock stops while it is, so
each evaluation is stamped with the training seconds that produced its model.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from fedq.evaluation import evaluate
from fedq.models import build_model, make_dp_compatible, model_arrays

__all__ = ["CentralSettings", "fastest_threads", "train_centrally"]

log = logging.getLogger(__name__)

MODEL = "mnist_cnn"
_CALIBRATION_STEPS = 30


@dataclass(frozen=True)
class CentralSettings:
    """One centralized run: optimisation, DP, and when to stop."""

    dp: bool
    batch_size: int
    learning_rate: float
    noise_multiplier: float
    clip_norm: float
    delta: float
    eval_every: int  # optimizer steps between test evaluations
    max_train_s: float  # training-clock cap
    stop_at: float  # stop once the test accuracy reaches this
    seed: int = 0
    threads: int = 1  # torch intra-op threads

    def __post_init__(self) -> None:
        if self.eval_every < 1 or self.batch_size < 1 or self.threads < 1:
            raise ValueError("eval_every, batch_size and threads must be at least 1")
        if self.max_train_s <= 0:
            raise ValueError(f"max_train_s {self.max_train_s} must be > 0")


def train_centrally(
    train: TensorDataset, test: TensorDataset, settings: CentralSettings
) -> dict[str, Any]:
    """Train until ``stop_at`` or ``max_train_s``; returns the evaluations and the ε spent."""
    torch.set_num_threads(settings.threads)
    model = build_model(MODEL, seed=settings.seed)
    if settings.dp:
        model = make_dp_compatible(model)
    model.train()
    steps, optimizer, engine = _training_steps(model, train, settings)

    evaluations: list[dict[str, Any]] = []
    clock_s, eval_s, step, examples = 0.0, 0.0, 0, 0
    stopped = f"training-clock cap of {settings.max_train_s:g}s reached"
    resumed = time.perf_counter()
    for batch_examples in steps:
        step, examples = step + 1, examples + batch_examples
        if step % settings.eval_every:
            continue

        clock_s += time.perf_counter() - resumed
        record, seconds = _evaluate(model, test, step=step, examples=examples, clock_s=clock_s)
        evaluations.append(record)
        eval_s += seconds
        log.info("central step %d: accuracy %.4f at %.1fs", step, record["accuracy"], clock_s)
        if record["accuracy"] >= settings.stop_at:
            stopped = f"accuracy {settings.stop_at:g} reached"
            break
        if clock_s >= settings.max_train_s:
            break
        resumed = time.perf_counter()

    epsilon = engine.get_epsilon(settings.delta) if engine is not None else None
    return {
        "settings": asdict(settings),
        "evaluations": evaluations,
        "steps": step,
        "epochs": round(examples / len(train), 3),
        "train_seconds": round(clock_s, 2),
        "evaluation_seconds": round(eval_s, 2),
        "stopped": stopped,
        "epsilon": epsilon,
        "optimizer": type(optimizer).__name__,
    }


def fastest_threads(train: TensorDataset, *, batch_size: int, candidates: list[int]) -> dict:
    """Time a few plain SGD steps with each thread count; returns the timings and the best."""
    seconds = {}
    for threads in candidates:
        torch.set_num_threads(threads)
        model = build_model(MODEL, seed=0)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
        inputs, labels = train.tensors[0][:batch_size], train.tensors[1][:batch_size]

        started = time.perf_counter()
        for _ in range(_CALIBRATION_STEPS):
            _sgd_step(model, optimizer, inputs, labels)
        seconds[threads] = (time.perf_counter() - started) / _CALIBRATION_STEPS

    best = min(seconds, key=seconds.__getitem__)
    return {"seconds_per_step": seconds, "threads": best}


def _training_steps(
    model: torch.nn.Module, train: TensorDataset, settings: CentralSettings
) -> tuple[Iterator[int], torch.optim.Optimizer, Any]:
    """An endless iterator of training steps (yielding batch sizes), its optimizer, engine."""
    generator = torch.Generator().manual_seed(settings.seed)
    loader = DataLoader(train, batch_size=settings.batch_size, shuffle=True, generator=generator)
    optimizer = torch.optim.SGD(model.parameters(), lr=settings.learning_rate, momentum=0.0)
    if not settings.dp:
        return _steps(model, optimizer, loader), optimizer, None

    from opacus import PrivacyEngine  # slow import: only when DP is on

    engine = PrivacyEngine(accountant="rdp")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        private_model, optimizer, loader = engine.make_private(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=settings.noise_multiplier,
            max_grad_norm=settings.clip_norm,
            poisson_sampling=True,
        )
    return _steps(private_model, optimizer, loader), optimizer, engine


def _steps(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, loader: DataLoader
) -> Iterator[int]:
    while True:
        for inputs, labels in loader:
            _sgd_step(model, optimizer, inputs, labels)
            yield len(labels)


def _sgd_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    inputs: torch.Tensor,
    labels: torch.Tensor,
) -> None:
    # Sum over the real batch, divided by its size: "mean" reduction, but an empty
    # Poisson batch gives 0 instead of NaN (as the clients' DP-SGD does).
    optimizer.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(inputs), labels, reduction="sum") / max(len(labels), 1)
    loss.backward()
    optimizer.step()


def _evaluate(
    model: torch.nn.Module, test: TensorDataset, *, step: int, examples: int, clock_s: float
) -> tuple[dict[str, Any], float]:
    started = time.perf_counter()
    accuracy, loss = evaluate(MODEL, model_arrays(model), test)
    record = {
        "step": step,
        "examples": examples,
        "seconds": round(clock_s, 3),
        "accuracy": accuracy,
        "loss": round(loss, 5),
    }
    return record, time.perf_counter() - started

"""Local training of one client for one round, in any of the plan's DP modes.

Everything here is synchronous and CPU-bound: call ``train_locally`` from an executor
thread, never on the event loop. Randomness comes from generators seeded by
``plan.seed`` (unless ``plan.secure_rng``), so a round can be replayed exactly; the
global torch RNG is not touched.
"""

from __future__ import annotations

import logging
import math
import os
import time
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedq.models import build_model, load_arrays, make_dp_compatible
from fedq.plan import TrainingPlan

__all__ = ["LocalResult", "TrainingError", "train_locally"]

log = logging.getLogger(__name__)

# Independent random streams derived from plan.seed.
_STREAM_BATCHES = 0
_STREAM_GRAD_NOISE = 1
_STREAM_UPDATE_NOISE = 2
_SEED_MASK = 2**64 - 1  # SeedSequence wants non-negative integers


class TrainingError(RuntimeError):
    """Local training cannot run as the plan asks (e.g. secure RNG unavailable)."""


@dataclass(frozen=True)
class LocalResult:
    """What one client's local training produced.

    Attributes:
        delta: ``new - global`` for every floating-point state-dict entry, float32,
            keyed and ordered like the state dict. Clipped and noised in client mode.
        num_examples: size of the local data set (the weight in federated averaging).
        loss: mean training cross-entropy over the steps (the proximal term excluded).
            It is computed from private data and is *not* privatised.
        steps: optimizer steps taken.
        noise_std: in ``"client"`` mode, the std of the Gaussian noise added to every
            coordinate of ``delta`` (``noise_multiplier * clip_norm``); in ``"sample"``
            mode, the std of the noise in each step's averaged gradient
            (``noise_multiplier * clip_norm / expected_batch_size``); 0 without DP.
        seconds: wall-clock time of the whole call.
    """

    delta: dict[str, np.ndarray]
    num_examples: int
    loss: float
    steps: int
    noise_std: float
    seconds: float


def train_locally(
    model_name: str,
    global_arrays: Mapping[str, np.ndarray],
    data: TensorDataset,
    plan: TrainingPlan,
    *,
    threads: int | None = None,
) -> LocalResult:
    """Train the global model on local data for ``plan.local_steps`` SGD steps.

    Args:
        model_name: registry name or import path understood by ``build_model``.
        global_arrays: the round's global weights, as from ``model_arrays``.
        data: the client's examples (inputs, labels).
        plan: optimisation and DP parameters of the round.
        threads: torch intra-op threads; this setting is process-wide.

    Raises:
        ValueError: empty data set or invalid ``threads``.
        ModelError: the weights do not fit the model, or it cannot be made DP-compatible.
        TrainingError: ``plan.secure_rng`` is set but no secure generator is available.
    """
    if len(data) == 0:
        raise ValueError(f"client data set is empty; round {plan.round} needs at least 1 example")
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads {threads} must be at least 1")
        torch.set_num_threads(threads)

    started = time.perf_counter()
    model = build_model(model_name)
    if plan.dp_mode != "none":
        model = make_dp_compatible(model)
    load_arrays(model, global_arrays)
    model.train()

    if plan.dp_mode == "sample":
        loss, noise_std = _train_dp_sgd(model, data, plan)
    else:
        loss, noise_std = _train_plain(model, data, plan), 0.0

    delta = _float_delta(model, global_arrays)
    if plan.dp_mode == "client":
        noise_std = _clip_and_noise(delta, plan)

    seconds = time.perf_counter() - started
    log.info(
        "round %d: %d steps on %d examples (dp=%s) loss %.4f in %.2fs",
        plan.round,
        plan.local_steps,
        len(data),
        plan.dp_mode,
        loss,
        seconds,
    )
    return LocalResult(delta, len(data), loss, plan.local_steps, noise_std, seconds)


def _train_plain(model: nn.Module, data: TensorDataset, plan: TrainingPlan) -> float:
    """Minibatch SGD without per-sample clipping (modes "none" and "client")."""
    generator = _torch_generator(plan.seed, _STREAM_BATCHES)
    optimizer = torch.optim.SGD(model.parameters(), lr=plan.learning_rate, momentum=0.0)
    prox = _Proximal(model, plan)

    losses = []
    for index in _shuffled_batches(len(data), plan.batch_size, plan.local_steps, generator):
        inputs, labels = data[index]
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(inputs), labels)
        loss.backward()
        prox.step(optimizer)
        losses.append(loss.item())
    return float(np.mean(losses))


def _train_dp_sgd(model: nn.Module, data: TensorDataset, plan: TrainingPlan) -> tuple[float, float]:
    """Opacus DP-SGD with Poisson sampling; returns (mean loss, per-step noise std)."""
    secure = plan.secure_rng
    batch_generator = None if secure else _torch_generator(plan.seed, _STREAM_BATCHES)
    noise_generator = None if secure else _torch_generator(plan.seed, _STREAM_GRAD_NOISE)
    batch_size = max(1, round(plan.sample_rate * len(data)))
    loader = DataLoader(data, batch_size=batch_size, shuffle=True, generator=batch_generator)

    # NOTE: catch_warnings swaps the process-wide filter list, so two threads training at
    # once may restore each other's filters; at worst an Opacus warning gets printed.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        private_model, optimizer, private_loader = _privacy_engine(secure).make_private(
            module=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=plan.learning_rate, momentum=0.0),
            data_loader=loader,
            noise_multiplier=plan.noise_multiplier,
            max_grad_norm=plan.clip_norm,
            poisson_sampling=True,
            noise_generator=noise_generator,
        )
        losses = _dp_sgd_steps(private_model, optimizer, private_loader, plan, prox=model)

    noise_std = plan.noise_multiplier * plan.clip_norm / optimizer.expected_batch_size
    return (float(np.mean(losses)) if losses else math.nan), noise_std


def _dp_sgd_steps(
    private_model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: DataLoader,
    plan: TrainingPlan,
    *,
    prox: nn.Module,
) -> list[float]:
    proximal = _Proximal(prox, plan)
    losses = []
    for inputs, labels in _cycle(loader, plan.local_steps):
        optimizer.zero_grad(set_to_none=True)
        # Summing and dividing by the real batch size equals "mean" reduction, but an
        # empty Poisson batch gives 0 instead of NaN; the step still adds noise.
        loss = F.cross_entropy(private_model(inputs), labels, reduction="sum")
        loss = loss / max(len(labels), 1)
        loss.backward()
        proximal.step(optimizer)
        if len(labels):
            losses.append(loss.item())
    return losses


def _privacy_engine(secure: bool):  # -> opacus.PrivacyEngine (imported lazily: slow import)
    from opacus import PrivacyEngine

    try:
        return PrivacyEngine(secure_mode=secure)
    except ImportError as exc:
        raise TrainingError(
            "plan.secure_rng is set but Opacus' secure mode needs the torchcsprng package; "
            "install it on this client or have the coordinator send secure_rng=False"
        ) from exc


class _Proximal:
    """FedProx: adds the gradient of (mu/2)*||w - w_global||^2 to every SGD step.

    Applied around ``optimizer.step()`` rather than through the loss so that it also
    works with Opacus, whose optimizer rebuilds gradients from per-sample gradients.
    The term depends only on the weights, so it costs no privacy.
    """

    def __init__(self, model: nn.Module, plan: TrainingPlan) -> None:
        self._mu = plan.fedprox_mu
        self._lr = plan.learning_rate
        self._params = [p for p in model.parameters() if p.requires_grad]
        self._anchor = [p.detach().clone() for p in self._params] if self._mu > 0 else []

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """Take one SGD step that includes the proximal pull towards the global weights."""
        if not self._anchor:
            optimizer.step()
            return

        with torch.no_grad():
            pulls = [self._mu * (p - a) for p, a in zip(self._params, self._anchor, strict=True)]
        optimizer.step()
        with torch.no_grad():
            for param, pull in zip(self._params, pulls, strict=True):
                param.sub_(pull, alpha=self._lr)


def _shuffled_batches(
    size: int, batch_size: int, steps: int, generator: torch.Generator
) -> Iterator[torch.Tensor]:
    """Index batches for ``steps`` steps: epochs of a fresh permutation each."""
    batch_size = min(batch_size, size)
    order = torch.randperm(size, generator=generator)
    position = 0
    for _ in range(steps):
        if position + batch_size > size:
            order, position = torch.randperm(size, generator=generator), 0
        yield order[position : position + batch_size]
        position += batch_size


def _cycle(loader: DataLoader, steps: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Exactly ``steps`` batches, restarting the loader as often as needed."""
    taken = 0
    while taken < steps:
        for batch in loader:
            yield batch
            taken += 1
            if taken == steps:
                return


def _float_delta(
    model: nn.Module, global_arrays: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
    delta = {}
    for name, tensor in model.state_dict().items():
        if not tensor.is_floating_point():
            continue
        new = tensor.detach().cpu().numpy().astype(np.float64)
        delta[name] = (new - np.asarray(global_arrays[name], dtype=np.float64)).astype(np.float32)
    return delta


def _clip_and_noise(delta: dict[str, np.ndarray], plan: TrainingPlan) -> float:
    """Clip the whole update to ``clip_norm`` and add Gaussian noise in place; return its std."""
    flat = np.concatenate([a.ravel().astype(np.float64) for a in delta.values()])
    norm = float(np.linalg.norm(flat))
    if norm > plan.clip_norm:
        flat *= plan.clip_norm / norm

    std = plan.noise_multiplier * plan.clip_norm
    flat += std * _standard_normal(flat.size, seed=plan.seed, secure=plan.secure_rng)

    start = 0
    for name, array in delta.items():
        delta[name] = flat[start : start + array.size].reshape(array.shape).astype(np.float32)
        start += array.size
    log.debug("client update norm %.4f clipped to %.4f, noise std %.4f", norm, plan.clip_norm, std)
    return std


def _standard_normal(size: int, *, seed: int, secure: bool) -> np.ndarray:
    if not secure:
        seeds = np.random.SeedSequence([seed & _SEED_MASK, _STREAM_UPDATE_NOISE])
        return np.random.default_rng(seeds).standard_normal(size)

    # Box-Muller on 53-bit uniforms read from the OS entropy source, so the noise cannot
    # be replayed from a seed.
    raw = np.frombuffer(os.urandom(16 * size), dtype=np.uint64).reshape(2, size)
    u1 = ((raw[0] >> np.uint64(11)).astype(np.float64) + 1.0) * 2.0**-53  # in (0, 1]
    u2 = (raw[1] >> np.uint64(11)).astype(np.float64) * 2.0**-53
    return np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)


def _subseed(seed: int, stream: int) -> int:
    state = np.random.SeedSequence([seed & _SEED_MASK, stream]).generate_state(1, np.uint64)
    return int(state[0])


def _torch_generator(seed: int, stream: int) -> torch.Generator:
    return torch.Generator().manual_seed(_subseed(seed, stream))

"""The server's step from one global model to the next: FedAvg, optionally with momentum.

FedAvgM keeps a velocity ``v`` across rounds and moves the model by it:

    v[r+1] = β · v[r] + Δ[r]          (Δ: the round's example-weighted mean update)
    w[r+1] = w[r] + η · v[r+1]        (η: server learning rate)

With β = 0 and η = 1 this is plain FedAvg, and no velocity is stored. The step only
post-processes updates that are already differentially private, so it costs no ε.
Everything is float64 numpy arithmetic on the exact integer sum, so the same updates
give a bit-identical model and velocity whoever computes them (a new leader after a
failover, or a replay).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from coordinator.rounds.aggregation import apply_flat_update
from fedq.tensors import ModelSpec

__all__ = ["ServerOptimizer", "ServerStep", "decode_velocity", "encode_velocity"]


@dataclass(frozen=True)
class ServerStep:
    """The next global model and the velocity to keep (``None`` for plain FedAvg)."""

    model: dict[str, np.ndarray]
    velocity: np.ndarray | None


@dataclass(frozen=True)
class ServerOptimizer:
    """Server learning rate η and momentum β of the federation."""

    learning_rate: float = 1.0
    momentum: float = 0.0

    def __post_init__(self) -> None:
        if not self.learning_rate > 0:
            raise ValueError(f"server learning rate {self.learning_rate}: expected > 0")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"server momentum {self.momentum}: expected [0, 1)")

    @property
    def keeps_velocity(self) -> bool:
        return self.momentum > 0

    def step(
        self,
        global_arrays: Mapping[str, np.ndarray],
        spec: ModelSpec,
        mean_update: np.ndarray,
        velocity: np.ndarray | None,
    ) -> ServerStep:
        """Apply one round's mean update (flat float64, trainable tensors only)."""
        if not self.keeps_velocity:
            step = mean_update if self.learning_rate == 1.0 else self.learning_rate * mean_update
            return ServerStep(apply_flat_update(global_arrays, spec, step), None)

        if velocity is None:
            velocity = np.zeros_like(mean_update)
        if velocity.shape != mean_update.shape:
            raise ValueError(
                f"stored server velocity has {velocity.size} values, the model {mean_update.size}"
            )
        new_velocity = self.momentum * velocity + mean_update
        model = apply_flat_update(global_arrays, spec, self.learning_rate * new_velocity)
        return ServerStep(model, new_velocity)


def encode_velocity(velocity: np.ndarray) -> bytes:
    """Little-endian float64 bytes, as kept in the store."""
    return velocity.astype("<f8", copy=False).tobytes()


def decode_velocity(blob: bytes | None, *, size: int) -> np.ndarray | None:
    """The stored velocity, checked against the model's size (``None`` when absent)."""
    if blob is None:
        return None
    velocity = np.frombuffer(blob, dtype="<f8").astype(np.float64)
    if velocity.size != size:
        raise ValueError(f"stored server velocity has {velocity.size} values, expected {size}")
    return velocity

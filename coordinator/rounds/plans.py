"""Fitting each participant's plan to the round's deadline from the speed it reported.

A client reports ``samples_per_second`` (a short probe of the actual model on its own
data) and, when it knows it, ``upload_bytes_per_second``. The time left for training
is the round's time budget less the expected upload time, times a safety factor that
leaves room for fetching the model, contention and noise in the probe::

    train_s = (budget_s - update_bytes / upload_bytes_per_second) * safety
    steps   = clamp(floor(samples_per_second * train_s / batch_size), min_steps, max_steps)

When even ``min_steps`` full batches do not fit, the batch shrinks instead (never below
``_MIN_BATCH``), so a slow client still finishes on time rather than being dropped.
The sample rate follows the batch size, and the privacy ledger is charged for exactly
the plan returned here. A client that reported no speed gets the base plan unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from fedq.plan import TrainingPlan

__all__ = ["PlanLimits", "fit_plan"]

_MIN_BATCH = 8


@dataclass(frozen=True)
class PlanLimits:
    """Bounds of an adapted plan."""

    min_steps: int = 1
    max_steps: int = 50
    safety: float = 0.5

    def __post_init__(self) -> None:
        if not 1 <= self.min_steps <= self.max_steps:
            raise ValueError(f"need 1 <= min_steps {self.min_steps} <= max_steps {self.max_steps}")
        if not 0 < self.safety <= 1:
            raise ValueError(f"safety {self.safety} must be in (0, 1]")


def fit_plan(
    plan: TrainingPlan,
    capabilities: dict[str, Any],
    *,
    num_examples: int,
    budget_s: float,
    limits: PlanLimits,
    update_bytes: int = 0,
) -> TrainingPlan:
    """``plan`` with the local steps (and if need be the batch) that fit ``budget_s``."""
    speed = float(capabilities.get("samples_per_second") or 0.0)
    if speed <= 0 or not math.isfinite(speed):
        return plan

    upload = float(capabilities.get("upload_bytes_per_second") or 0.0)
    transfer_s = update_bytes / upload if upload > 0 else 0.0
    samples = speed * max(0.0, budget_s - transfer_s) * limits.safety

    batch = plan.batch_size
    steps = math.floor(samples / batch)
    if steps < limits.min_steps:
        batch = max(min(_MIN_BATCH, plan.batch_size), math.floor(samples / limits.min_steps))
        batch = min(batch, plan.batch_size)
    steps = min(max(math.floor(samples / batch), limits.min_steps), limits.max_steps)

    examples = max(1, num_examples)
    return replace(
        plan,
        local_steps=steps,
        batch_size=min(batch, examples),
        sample_rate=min(1.0, batch / examples),
    )

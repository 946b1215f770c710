"""Simulated client heterogeneity for the one-command federation.

Each client gets a seeded slowdown factor and a link delay, so that a straggler
scenario can be reproduced exactly from ``--speed-spread``, ``--link-delay-ms`` and
``--seed``. A slowdown of ``s`` makes local training take ``s`` times its real
duration (the client waits ``(s - 1) ×`` the training time after training, without
holding a training thread), and a client reports ``1/s`` of its probed speed. The
link delay is waited before each model download and each upload.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

__all__ = ["SimulatedConditions", "conditions_for"]


@dataclass(frozen=True)
class SimulatedConditions:
    """How much slower one simulated client trains, and the latency of its link."""

    slowdown: float = 1.0
    link_delay_s: float = 0.0

    def __post_init__(self) -> None:
        if self.slowdown < 1 or self.link_delay_s < 0:
            raise ValueError(
                f"slowdown {self.slowdown} must be >= 1 and link delay {self.link_delay_s} >= 0"
            )

    def extra_training_s(self, trained_s: float) -> float:
        """Seconds to wait after ``trained_s`` of real training."""
        return (self.slowdown - 1.0) * max(trained_s, 0.0)


def conditions_for(
    index: int, *, seed: int, speed_spread: float, link_delay_ms: float
) -> SimulatedConditions:
    """Client ``index``'s conditions: slowdown in [1, 1 + spread], delay in [0.5, 1.5] × D."""
    if speed_spread < 0 or link_delay_ms < 0:
        raise ValueError("speed spread and link delay must be >= 0")
    rng = random.Random(f"{seed}:conditions:{index}")
    slowdown = 1.0 + speed_spread * rng.random()
    delay_s = link_delay_ms / 1000.0 * (0.5 + rng.random())
    return SimulatedConditions(slowdown=slowdown, link_delay_s=delay_s)

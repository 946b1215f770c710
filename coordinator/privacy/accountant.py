"""Turn the rounds a client took part in into an (ε, δ) guarantee with Opacus accountants."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from opacus.accountants import GaussianAccountant, IAccountant, PRVAccountant, RDPAccountant

from fedq.plan import DP_MODES, TrainingPlan

__all__ = ["ACCOUNTANTS", "Charge", "epsilon", "tradeoff_table"]

log = logging.getLogger(__name__)

ACCOUNTANTS: dict[str, type[IAccountant]] = {
    "rdp": RDPAccountant,
    "prv": PRVAccountant,
    # NOTE: Opacus warns that GDP can underestimate ε; it is offered for comparison only.
    "gdp": GaussianAccountant,
}


@dataclass(frozen=True)
class Charge:
    """The privacy cost of one round for one client: ``steps`` subsampled Gaussian releases."""

    round: int
    dp_mode: str
    noise_multiplier: float
    sample_rate: float
    steps: int

    def __post_init__(self) -> None:
        if self.dp_mode not in DP_MODES:
            raise ValueError(f"dp_mode {self.dp_mode!r}: expected one of {', '.join(DP_MODES)}")
        if self.dp_mode == "none":
            return

        if not self.noise_multiplier > 0:
            raise ValueError(f"noise_multiplier {self.noise_multiplier} must be > 0 with DP")
        if not 0 < self.sample_rate <= 1:
            raise ValueError(f"sample_rate {self.sample_rate} must be in (0, 1]")
        if self.steps < 1:
            raise ValueError(f"steps {self.steps} must be at least 1")

    @classmethod
    def from_plan(cls, plan: TrainingPlan) -> Charge:
        """The charge a client incurs by running ``plan``."""
        if plan.dp_mode == "sample":
            # DP-SGD inside the client: every local step is one Poisson-subsampled release.
            return cls(
                plan.round, "sample", plan.noise_multiplier, plan.sample_rate, plan.local_steps
            )
        if plan.dp_mode == "client":
            # Client-level DP: the clipped whole update is released once with Gaussian noise,
            # so the unit protected is the client and there is no subsampling to amplify it.
            return cls(plan.round, "client", plan.noise_multiplier, 1.0, 1)

        return cls(plan.round, "none", 0.0, plan.sample_rate, plan.local_steps)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for JSON."""
        return {
            "round": self.round,
            "dp_mode": self.dp_mode,
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
            "steps": self.steps,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Charge:
        """Inverse of ``to_dict``."""
        return cls(
            round=int(data["round"]),
            dp_mode=str(data["dp_mode"]),
            noise_multiplier=float(data["noise_multiplier"]),
            sample_rate=float(data["sample_rate"]),
            steps=int(data["steps"]),
        )


def epsilon(charges: Sequence[Charge], *, delta: float, accountant: str = "rdp") -> float:
    """ε spent by the composition of ``charges`` at the given δ.

    Returns 0.0 for no charges, and ``math.inf`` if any charge was made without DP or
    with noise so small that the accountant's arithmetic overflows (a noise multiplier
    near 1e-150 and below: no guarantee is left to state).

    Raises:
        ValueError: ``delta`` is not in (0, 1), ``accountant`` is unknown, or ``gdp`` was asked
            to compose different noise multipliers or sample rates.
    """
    _check_delta(delta)
    _check_accountant(accountant)
    if not charges:
        return 0.0
    if any(c.dp_mode == "none" for c in charges):
        return math.inf

    try:
        return _epsilon_of_history(_merge(charges), delta=delta, accountant=accountant)
    except (ZeroDivisionError, OverflowError):
        return math.inf


def tradeoff_table(
    noise_multipliers: Sequence[float],
    *,
    sample_rate: float,
    local_steps: int,
    rounds: int,
    delta: float,
    accountant: str = "rdp",
) -> list[dict[str, Any]]:
    """ε after ``rounds`` rounds of ``local_steps`` steps at ``sample_rate``, per noise level."""
    _check_delta(delta)
    _check_accountant(accountant)
    if local_steps < 1 or rounds < 0:
        raise ValueError(f"local_steps {local_steps} must be >= 1 and rounds {rounds} >= 0")

    rows = []
    for noise in noise_multipliers:
        eps = 0.0  # no round run, nothing spent
        if rounds:
            charges = [Charge(0, "sample", float(noise), sample_rate, local_steps * rounds)]
            eps = epsilon(charges, delta=delta, accountant=accountant)
        rows.append(
            {
                "noise_multiplier": float(noise),
                "sample_rate": sample_rate,
                "local_steps": local_steps,
                "rounds": rounds,
                "delta": delta,
                "epsilon": eps,
            }
        )
    return rows


def _merge(charges: Sequence[Charge]) -> list[tuple[float, float, int]]:
    """Opacus history with one entry per distinct (noise multiplier, sample rate)."""
    # Composition is commutative, so equal mechanisms may be merged even when not adjacent;
    # this keeps PRV's convolution count small for long ledgers.
    steps: dict[tuple[float, float], int] = {}
    for c in charges:
        key = (c.noise_multiplier, c.sample_rate)
        steps[key] = steps.get(key, 0) + c.steps
    return [(noise, rate, n) for (noise, rate), n in steps.items()]


def _epsilon_of_history(
    history: list[tuple[float, float, int]], *, delta: float, accountant: str
) -> float:
    """Fill an Opacus accountant's history and ask it for ε."""
    if accountant == "gdp" and len(history) > 1:
        raise ValueError(
            f"gdp accountant needs one noise multiplier and sample rate, got {len(history)} "
            "different ones; use 'rdp' or 'prv'"
        )

    acct = ACCOUNTANTS[accountant]()
    acct.history = history
    # PRV takes log(1 - q), which is log(0) for client-level charges (q = 1); the result
    # is still right, numpy just warns about it.
    with np.errstate(divide="ignore"):
        eps = float(acct.get_epsilon(delta=delta))

    log.debug("ε %.4f from %d mechanisms (%s, δ=%g)", eps, len(history), accountant, delta)
    return eps


def _check_delta(delta: float) -> None:
    if not 0 < delta < 1:
        raise ValueError(f"delta {delta} must be in (0, 1)")


def _check_accountant(accountant: str) -> None:
    if accountant not in ACCOUNTANTS:
        raise ValueError(
            f"accountant {accountant!r}: expected one of {', '.join(sorted(ACCOUNTANTS))}"
        )

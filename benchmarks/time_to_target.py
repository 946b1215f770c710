"""Time to a target accuracy, the one-machine-per-client projection, and the verdict.

Pure arithmetic on measured numbers, kept apart from the runs so that it can be
tested on synthetic inputs:

- ``first_time_to_target``: the first time an accuracy curve reaches a target, and
  ``times_to_targets`` for several targets, keyed by ``target_key``.
- ``projected_round_seconds``: one federated round if every client had a machine of
  its own: the slowest client's training, the slowest client's transfers (model
  download and update upload), then the coordinator's aggregation and the opening of
  the next round.
- ``reduction`` and ``verdict_line``: ``1 - federated / centralized`` against the
  25 % latency-reduction claim, with the measured reason when it is missed.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from itertools import accumulate
from typing import Any

__all__ = [
    "CLAIMED_REDUCTION",
    "cumulative",
    "first_time_to_target",
    "projected_round_seconds",
    "reduction",
    "target_key",
    "times_to_targets",
    "verdict_line",
]

CLAIMED_REDUCTION = 0.25


def first_time_to_target(
    points: Iterable[tuple[float, float | None]], target: float
) -> float | None:
    """Seconds of the first ``(seconds, accuracy)`` point at or above ``target``, else None.

    Points are taken in the order given (time order); a point without an accuracy
    (a round that was not evaluated) never counts.
    """
    for seconds, accuracy in points:
        if accuracy is not None and accuracy >= target:
            return seconds
    return None


def target_key(target: float) -> str:
    """How a target accuracy is written as a JSON key: ``0.91`` -> ``"0.91"``."""
    return f"{target:.2f}"


def times_to_targets(
    points: Sequence[tuple[float, float | None]], targets: Iterable[float]
) -> dict[str, float | None]:
    """``first_time_to_target`` for each target, keyed by ``target_key``."""
    return {target_key(t): first_time_to_target(points, t) for t in targets}


def projected_round_seconds(
    *,
    train_max_s: float,
    transfer_max_s: float,
    aggregation_s: float,
    opening_s: float = 0.0,
) -> float:
    """One round with one machine per client: slowest training + slowest transfer + server.

    ``opening_s`` is the coordinator's work before the round's training can start
    (selection, privacy ledger charges); 0 for the first round, whose start is the
    zero of the clock.
    """
    parts = (train_max_s, transfer_max_s, aggregation_s, opening_s)
    if any(p < 0 for p in parts):
        raise ValueError(f"round time parts must be >= 0, got {parts}")
    return train_max_s + transfer_max_s + aggregation_s + opening_s


def cumulative(seconds: Sequence[float]) -> list[float]:
    """Running totals: the time at which each round's model exists."""
    return list(accumulate(seconds))


def reduction(federated_s: float | None, centralized_s: float | None) -> float | None:
    """``1 - federated / centralized``; None when either time is missing."""
    if federated_s is None or centralized_s is None or centralized_s <= 0:
        return None
    return 1.0 - federated_s / centralized_s


def verdict_line(row: dict[str, Any]) -> str:
    """One sentence on a comparison row: reduction, the 25 % claim, and why if missed.

    ``row`` has ``label``, ``target``, ``centralized_s``, ``federated_s``,
    ``rounds_to_target``, ``round_s`` (mean round time up to the target),
    ``train_max_s`` (mean slowest client training per round; may be None when
    measured), ``clients`` and ``kind`` (``"measured"`` on this machine or
    ``"projected"`` to one machine per client), and ``unmeasured`` (why the run
    could not be measured) when it could not.
    """
    head = f"{row['label']}, {row['target']:.0%}:"
    if row.get("unmeasured"):
        return f"{head} no verdict: {row['unmeasured']}"
    central, federated = row["centralized_s"], row["federated_s"]
    if central is None:
        return f"{head} no verdict: centralized training did not reach the target."
    if federated is None:
        return f"{head} no: the federation did not reach the target within its round cap."

    cut = reduction(federated, central)
    assert cut is not None
    numbers = f"{federated:.1f}s against {central:.1f}s centralized, reduction {cut:.0%}"
    if cut >= CLAIMED_REDUCTION:
        return f"{head} yes, {numbers}."

    rounds, round_s, train_s = row["rounds_to_target"], row["round_s"], row["train_max_s"]
    needed = (1 - CLAIMED_REDUCTION) * central / rounds
    if row.get("kind") == "measured":
        why = (
            f"its {row['clients']} client processes share this machine's CPU cores, so a "
            f"round took {round_s:.2f}s"
        )
        if train_s is not None:
            why += f" while its slowest client trained {train_s:.2f}s"
    else:
        why = (
            f"{rounds} rounds of {round_s:.2f}s ({train_s:.2f}s slowest client training, "
            f"{round_s - train_s:.2f}s transfer and coordination)"
        )
    return (
        f"{head} no, {numbers}: {why}; 25% at {rounds} rounds needs rounds of at most "
        f"{needed:.2f}s."
    )

"""The arithmetic behind the time-to-accuracy benchmark, on synthetic curves."""

from __future__ import annotations

import pytest

from benchmarks.time_to_target import (
    cumulative,
    first_time_to_target,
    projected_round_seconds,
    reduction,
    verdict_line,
)


def test_first_time_to_target_takes_the_first_point_at_or_above_it() -> None:
    curve = [(1.0, 0.5), (2.0, None), (3.0, 0.91), (4.0, 0.89), (5.0, 0.95)]

    assert first_time_to_target(curve, 0.91) == 3.0
    assert first_time_to_target(curve, 0.93) == 5.0
    assert first_time_to_target(curve, 0.97) is None


def test_a_round_without_an_accuracy_never_reaches_the_target() -> None:
    assert first_time_to_target([(1.0, None), (2.0, None)], 0.0) is None


def test_projected_round_adds_its_parts_and_refuses_negative_ones() -> None:
    assert projected_round_seconds(
        train_max_s=2.0, transfer_max_s=0.5, aggregation_s=0.25, opening_s=0.25
    ) == pytest.approx(3.0)

    with pytest.raises(ValueError, match="must be >= 0"):
        projected_round_seconds(train_max_s=1.0, transfer_max_s=-0.1, aggregation_s=0.0)


def test_cumulative_gives_the_time_each_round_model_exists() -> None:
    assert cumulative([1.0, 2.0, 0.5]) == [1.0, 3.0, 3.5]


def test_reduction_is_one_minus_the_ratio_and_none_without_both_times() -> None:
    assert reduction(60.0, 100.0) == pytest.approx(0.4)
    assert reduction(None, 100.0) is None
    assert reduction(60.0, None) is None
    assert reduction(60.0, 0.0) is None


def _row(**changes: object) -> dict[str, object]:
    row: dict[str, object] = {
        "label": "10 clients, DP off, projected",
        "target": 0.91,
        "centralized_s": 100.0,
        "federated_s": 60.0,
        "rounds_to_target": 10,
        "round_s": 6.0,
        "train_max_s": 5.0,
        "clients": 10,
        "kind": "projected",
    }
    row.update(changes)
    return row


def test_verdict_says_yes_when_the_reduction_reaches_25_percent() -> None:
    line = verdict_line(_row())

    assert "yes" in line and "reduction 40%" in line


def test_verdict_says_why_when_the_reduction_falls_short() -> None:
    projected = verdict_line(_row(federated_s=90.0, round_s=9.0))
    measured = verdict_line(_row(federated_s=150.0, round_s=15.0, kind="measured"))

    assert projected.startswith("10 clients, DP off, projected, 91%: no,")
    assert "reduction 10%" in projected and "rounds of at most 7.50s" in projected
    assert "share this machine's CPU cores" in measured and "reduction -50%" in measured


def test_verdict_names_the_run_that_missed_the_target() -> None:
    assert "centralized training did not reach" in verdict_line(_row(centralized_s=None))
    assert "federation did not reach" in verdict_line(_row(federated_s=None))

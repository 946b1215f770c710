"""The arithmetic and clocks behind the time-to-accuracy benchmark, on synthetic records."""

from __future__ import annotations

import signal
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

from benchmarks.child_processes import ChildProcesses
from benchmarks.federated_records import process_record
from benchmarks.process_clock import (
    clock_zero,
    measured_rounds,
    startup_times,
    stop_reason,
    stored_at,
)
from benchmarks.process_federation import ProcessRun, ProcessRunError
from benchmarks.service_env import coordinator_env
from benchmarks.time_to_target import (
    cumulative,
    first_time_to_target,
    projected_round_seconds,
    reduction,
    times_to_targets,
    verdict_line,
)
from benchmarks.tree_memory import MemoryPeaks, pss_estimate_bytes
from coordinator.settings import CoordinatorSettings
from fedq.config import EnvReader
from fedq.plan import TrainingPlan


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


def test_times_to_targets_are_keyed_by_the_target_written_with_two_decimals() -> None:
    curve = [(1.0, 0.5), (2.0, 0.92)]

    assert times_to_targets(curve, (0.91, 0.97)) == {"0.91": 2.0, "0.97": None}


def test_verdict_without_a_measurement_says_why() -> None:
    line = verdict_line(_row(kind="measured", unmeasured="the process run stopped: out of memory"))

    assert line == (
        "10 clients, DP off, projected, 91%: no verdict: the process run stopped: out of memory"
    )


def test_measured_verdict_leaves_out_training_time_it_does_not_have() -> None:
    line = verdict_line(_row(federated_s=150.0, round_s=15.0, kind="measured", train_max_s=None))

    assert "a round took 15.00s;" in line and "trained" not in line


# -- the process run's clock ------------------------------------------------------------------


def _record(number: int, **changes: object) -> dict[str, object]:
    record: dict[str, object] = {
        "round": number,
        "status": "finalized",
        "opened_at": 100.0 + 10 * number,
        "closed_at": 106.0 + 10 * number,
        "test_accuracy": 0.5 + number / 100,
        "updates_aggregated": 3,
    }
    record.update(changes)
    return record


def test_clock_starts_when_round_1_opens_with_every_client_joined() -> None:
    rounds = [_record(2), _record(1)]

    assert clock_zero(rounds, [50.0, 90.0, 110.0], clients=3) == 110.0


def test_clock_refuses_a_round_1_that_opened_before_every_client_joined() -> None:
    with pytest.raises(ValueError, match="2 of 3 clients joined"):
        clock_zero([_record(1)], [50.0, 90.0, 111.0], clients=3)

    with pytest.raises(ValueError, match="round 1 never opened"):
        clock_zero([], [50.0], clients=1)


def test_startup_times_count_what_comes_before_the_zero() -> None:
    times = startup_times(
        services_started_at=10.0, clients_started_at=25.0, joined_at=[40.0, 55.0], zero=55.25
    )

    assert times == {
        "services_s": 15.0,
        "clients_to_last_join_s": 30.0,
        "last_join_to_round_1_s": 0.25,
    }


def test_measured_rounds_split_each_round_and_skip_unfinished_ones() -> None:
    rounds = [
        _record(1),
        _record(2),
        _record(3, status="abandoned"),
        _record(4, status="open", closed_at=None, test_accuracy=None),
    ]
    stamps = {1: 117.0, 2: 127.5}

    first, second = measured_rounds(rounds, stamps, zero=110.0, finished_at=200.0)

    assert first == {
        "round": 1,
        "accuracy": 0.51,
        "updates": 3,
        "measured_s": 7.0,
        "round_s": 7.0,
        "clients_s": 6.0,
        "aggregation_s": 1.0,
        "opening_s": 0.0,
    }
    assert (second["measured_s"], second["round_s"], second["opening_s"]) == (17.5, 7.5, 3.0)


def test_a_round_not_seen_stored_counts_until_the_next_round_opened() -> None:
    rounds = [_record(1), _record(2)]

    assert stored_at(1, {}, rounds, finished_at=500.0) == 120.0
    assert stored_at(2, {}, rounds, finished_at=500.0) == 500.0
    assert stored_at(2, {2: 131.0}, rounds, finished_at=500.0) == 131.0


def test_observing_stops_at_the_target_or_once_every_finished_round_is_evaluated() -> None:
    below = [_record(1, test_accuracy=0.90), _record(2, test_accuracy=None)]
    reached = [_record(1, test_accuracy=0.90), _record(2, test_accuracy=0.975)]

    assert stop_reason(below, stop_at=0.97, finished=False) is None
    assert stop_reason(below, stop_at=0.97, finished=True) is None
    assert (
        stop_reason(reached, stop_at=0.97, finished=False) == "a model reached 0.97 test accuracy"
    )
    assert stop_reason(below[:1], stop_at=0.97, finished=True) == "round cap reached"


def test_process_run_clock_gives_the_measured_times_to_target() -> None:
    run = ProcessRun(
        clients=2,
        client_start="fork",
        services_started_at=90.0,
        clients_started_at=95.0,
        finished_at=140.0,
        stopped="a model reached 0.97 test accuracy",
        rounds=[_record(1, test_accuracy=0.92), _record(2, test_accuracy=0.98)],
        joined_at=[100.0, 105.0],
        finalized_at={1: 117.0, 2: 127.0},
        memory={"peak_tree_rss_bytes": 1},
    )

    record = process_record(run, targets=(0.91, 0.97))

    assert record["time_to_target_s"] == {"0.91": 7.0, "0.97": 17.0}
    assert record["final_accuracy"] == 0.98 and record["rounds_finalized"] == 2
    assert record["startup"]["last_join_to_round_1_s"] == 5.0


def test_a_process_run_that_failed_has_no_times_and_keeps_its_reason() -> None:
    error = ProcessRunError("worker-0 exited with status 1")
    error.memory = {"peak_tree_rss_bytes": 5}

    record = process_record(error, targets=(0.91,))

    assert record["error"] == "worker-0 exited with status 1"
    assert record["time_to_target_s"] == {"0.91": None}
    assert record["memory"] == {"peak_tree_rss_bytes": 5}


# -- the process run's services and children ---------------------------------------------------


def _benchmark_settings(**changes: object) -> CoordinatorSettings:
    plan = TrainingPlan(
        round=0, dp_mode="sample", batch_size=128, local_steps=30, learning_rate=0.5
    )
    settings = CoordinatorSettings(
        dataset="mnist",
        data_dir="/data",
        rounds=25,
        clients_per_round=10,
        round_timeout_s=1800.0,
        client_timeout_s=1800.0,
        plan=plan,
        epsilon_budget=1e9,
        adaptive_plans=False,
    )
    return replace(settings, **changes)


def test_service_environment_gives_the_services_the_same_settings() -> None:
    settings = _benchmark_settings()

    env = coordinator_env(settings)

    assert CoordinatorSettings.from_env(EnvReader(env)) == settings
    assert env["FEDQ_ADAPTIVE_PLANS"] == "false" and env["FEDQ_LOCAL_STEPS"] == "30"


def test_service_environment_refuses_settings_no_variable_carries() -> None:
    settings = _benchmark_settings(plan=TrainingPlan(round=0, sample_rate=0.5))

    with pytest.raises(ValueError, match="settings plan cannot be passed"):
        coordinator_env(settings)


def test_memory_peaks_keep_the_largest_tree_and_the_least_available_memory() -> None:
    peaks = MemoryPeaks(available_before_bytes=100)

    peaks.record(tree_rss=10, processes=3, available=90)
    peaks.record(tree_rss=30, processes=5, available=60)
    peaks.record(tree_rss=20, processes=4, available=80)

    peaks.record_pss(25)
    peaks.record_pss(15)

    assert peaks.to_dict() == {
        "peak_tree_rss_bytes": 30,
        "processes_at_peak": 5,
        "peak_tree_pss_estimate_bytes": 25,
        "available_before_bytes": 100,
        "min_available_bytes": 60,
        "peak_available_drop_bytes": 40,
        "samples": 3,
        "pss_samples": 2,
    }


def test_pss_estimate_counts_every_client_like_the_one_read_this_turn() -> None:
    pss = {1: 100, 2: 50, 11: 7, 12: 9, 13: 8}.__getitem__
    tree = [1, 2, 11, 12, 13]

    assert pss_estimate_bytes(tree, [11, 12, 13, 14], turn=1, pss_of=pss) == 150 + 3 * 9
    assert pss_estimate_bytes(tree, [11, 12, 13], turn=3, pss_of=pss) == 150 + 3 * 7
    assert pss_estimate_bytes([1, 2], [11], turn=0, pss_of=pss) == 150


def test_closing_stops_every_child_still_running_and_can_be_repeated(tmp_path: Path) -> None:
    children = ChildProcesses(tmp_path)
    sleeper = children.spawn(
        "sleeper", [sys.executable, "-c", "import time; time.sleep(600)"], env={}
    )
    children.spawn("quick", [sys.executable, "-c", "print('done')"], env={})
    _wait_until_exited(children, "quick")
    assert children.pids() == [sleeper]

    children.close()
    children.close()

    assert children.exited() == {"sleeper": -signal.SIGTERM, "quick": 0}
    assert children.log_tail("quick") == "done"


def test_a_forked_child_runs_the_named_function_and_reports_its_status(tmp_path: Path) -> None:
    with ChildProcesses(tmp_path) as children:
        children.fork("floor", "math:floor", 3.7)
        _wait_until_exited(children, "floor")  # the first fork also starts the fork server

        assert children.exited() == {"floor": 3}


def _wait_until_exited(children: ChildProcesses, name: str) -> None:
    for _ in range(600):
        if name in children.exited():
            return
        time.sleep(0.1)
    raise AssertionError(f"{name} still running after 60 s")

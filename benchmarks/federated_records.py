"""The JSON record of one federated configuration: its process run and its in-process run.

- ``process_record``: the process run (``ProcessRun``), round by round on its clock
  (``benchmarks.process_clock``), with its start-up and memory; or why it could not
  be measured. Its times to target are the benchmark's *measured* ones.
- ``in_process_record``: the embedded run (``TimedFederation``) round by round, with
  the projection to one machine per client computed from its per-client training
  and transfer times.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

from benchmarks.process_clock import clock_zero, measured_rounds, startup_times, stored_at
from benchmarks.process_federation import ProcessRun, ProcessRunError
from benchmarks.round_timing import TimedFederation
from benchmarks.time_to_target import cumulative, projected_round_seconds, times_to_targets

__all__ = ["federated_record", "in_process_record", "process_record"]


def federated_record(
    timed: TimedFederation,
    process: ProcessRun | ProcessRunError,
    *,
    clients: int,
    dp: bool,
    targets: Sequence[float],
) -> dict[str, Any]:
    """Both runs of one configuration, with the times to target each clock gives."""
    processes = process_record(process, targets=targets)
    in_process = in_process_record(timed, dp=dp, targets=targets)
    return {
        "clients": clients,
        "dp": dp,
        "time_to_target_measured_s": processes["time_to_target_s"],
        "time_to_target_projected_s": in_process["time_to_target_projected_s"],
        "time_to_target_in_process_s": in_process["time_to_target_s"],
        "final_accuracy": processes["final_accuracy"],
        "processes": processes,
        "in_process": in_process,
    }


def process_record(
    run: ProcessRun | ProcessRunError, *, targets: Sequence[float]
) -> dict[str, Any]:
    """The process run on its clock, or the reason it has no measurement."""
    if isinstance(run, ProcessRunError):
        return _unmeasured(str(run), memory=run.memory, targets=targets)
    try:
        zero = clock_zero(run.rounds, run.joined_at, clients=run.clients)
    except ValueError as exc:
        return _unmeasured(str(exc), memory=run.memory, targets=targets)

    rounds = measured_rounds(run.rounds, run.finalized_at, zero=zero, finished_at=run.finished_at)
    evaluated = [r["accuracy"] for r in rounds if r["accuracy"] is not None]
    spent = [p["epsilon_spent"] for p in run.privacy]
    return {
        "client_start": run.client_start,
        "rounds": rounds,
        "rounds_finalized": len(rounds),
        "final_accuracy": evaluated[-1] if evaluated else None,
        "time_to_target_s": times_to_targets(
            [(r["measured_s"], r["accuracy"]) for r in rounds], targets
        ),
        "stopped": run.stopped,
        "observed_s": round(run.finished_at - zero, 2),
        "startup": startup_times(
            services_started_at=run.services_started_at,
            clients_started_at=run.clients_started_at,
            joined_at=run.joined_at,
            zero=zero,
        ),
        "memory": run.memory,
        "epsilon_per_client": {"min": min(spent), "max": max(spent)} if spent else None,
    }


def _unmeasured(
    reason: str, *, memory: dict[str, Any] | None, targets: Sequence[float]
) -> dict[str, Any]:
    return {
        "error": reason,
        "rounds": [],
        "final_accuracy": None,
        "time_to_target_s": times_to_targets([], targets),
        "memory": memory,
    }


def in_process_record(
    timed: TimedFederation, *, dp: bool, targets: Sequence[float]
) -> dict[str, Any]:
    """The embedded run on its clock, round by round, with the projected clock."""
    summary = timed.summary
    rounds = sorted(
        (r for r in summary.rounds if r["status"] == "finalized"), key=lambda r: r["round"]
    )
    zero = rounds[0]["opened_at"] if rounds else timed.started_at
    records = [_round_record(timed, r, rounds, zero=zero) for r in rounds]
    projected = cumulative([r["projected_round_s"] for r in records])
    for record, at in zip(records, projected, strict=True):
        record["projected_s"] = round(at, 3)

    spent = [p["epsilon_spent"] for p in summary.privacy]
    return {
        "rounds": records,
        "rounds_finalized": len(records),
        "final_accuracy": summary.final_accuracy,
        "time_to_target_s": times_to_targets(
            [(r["measured_s"], r["accuracy"]) for r in records], targets
        ),
        "time_to_target_projected_s": times_to_targets(
            [(r["projected_s"], r["accuracy"]) for r in records], targets
        ),
        "startup_s": round(zero - timed.started_at, 2),
        "total_wall_s": round(timed.finished_at - timed.started_at, 2),
        "epsilon_per_client": {"min": min(spent), "max": max(spent)} if dp and spent else None,
    }


def _round_record(
    timed: TimedFederation, r: dict[str, Any], rounds: list[dict[str, Any]], *, zero: float
) -> dict[str, Any]:
    """Measured pieces of one round and its projected length."""
    number = r["round"]
    train = [
        o.train_seconds
        for outcomes in timed.summary.outcomes.values()
        for o in outcomes
        if o.round == number and o.outcome == "accepted"
    ]
    transfer = _transfer_seconds(timed.transfers, number)
    finalized = stored_at(number, timed.finalized_at, rounds, finished_at=timed.finished_at)
    previous = (
        stored_at(number - 1, timed.finalized_at, rounds, finished_at=timed.finished_at)
        if number > 1
        else None
    )

    aggregation = max(0.0, finalized - r["closed_at"])
    opening = max(0.0, r["opened_at"] - previous) if previous is not None else 0.0
    projected = projected_round_seconds(
        train_max_s=max(train, default=0.0),
        transfer_max_s=max(transfer.values(), default=0.0),
        aggregation_s=aggregation,
        opening_s=opening,
    )
    return {
        "round": number,
        "accuracy": r["test_accuracy"],
        "updates": r["updates_aggregated"],
        "measured_s": round(finalized - zero, 3),
        "round_s": round(finalized - r["opened_at"], 3),
        "train_mean_s": round(statistics.fmean(train), 3) if train else None,
        "train_max_s": round(max(train), 3) if train else None,
        "transfer_mean_s": round(statistics.fmean(transfer.values()), 3) if transfer else None,
        "transfer_max_s": round(max(transfer.values()), 3) if transfer else None,
        "model_bytes": _mean_bytes(timed.transfers, number, kind="fetch"),
        "update_bytes": _mean_bytes(timed.transfers, number, kind="submit"),
        "aggregation_s": round(aggregation, 3),
        "opening_s": round(opening, 3),
        "projected_round_s": round(projected, 3),
    }


def _transfer_seconds(transfers: list[dict[str, Any]], number: int) -> dict[str, float]:
    """Per client: model download plus update upload in one round."""
    seconds: dict[str, float] = {}
    for t in transfers:
        if t["round"] == number:
            seconds[t["client"]] = seconds.get(t["client"], 0.0) + t["seconds"]
    return seconds


def _mean_bytes(transfers: list[dict[str, Any]], number: int, *, kind: str) -> int | None:
    sizes = [t["bytes"] for t in transfers if t["round"] == number and t["kind"] == kind]
    return round(statistics.fmean(sizes)) if sizes else None

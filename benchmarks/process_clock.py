"""When the clock of a federation run starts and stops, from its round records.

Pure functions on the records (``RoundRecord.to_public()`` dicts) and on the times
an observer saw each round's model stored, kept apart from the runs so that they can
be tested on synthetic records:

- ``clock_zero``: round 1's opening, checked to come after every client joined. The
  coordinator opens round 1 only once ``FEDQ_MIN_CLIENTS`` clients (by default
  ``FEDQ_CLIENTS_PER_ROUND``, here all of them) have joined, so from that instant on
  no client process is still starting up.
- ``stored_at``: when a round's model was stored, as the observer saw it.
- ``measured_rounds``: each finalized round on that clock, split into its parts.
- ``stop_reason``: whether a run can stop being observed.

Times are ``time.time()`` seconds, the clock the round and client records use.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["clock_zero", "measured_rounds", "startup_times", "stop_reason", "stored_at"]

Round = Mapping[str, Any]


def clock_zero(rounds: Sequence[Round], joined_at: Sequence[float], *, clients: int) -> float:
    """The zero of the clock: when round 1 opened, with every one of ``clients`` joined.

    Raises:
        ValueError: round 1 never opened, or fewer than ``clients`` clients had joined
            when it did (the clock would then include a client's start-up).
    """
    first = [r for r in rounds if r["round"] == 1]
    if not first:
        raise ValueError("round 1 never opened: no zero for the clock")

    opened_at = float(first[0]["opened_at"])
    early = [t for t in joined_at if t <= opened_at]
    if len(early) < clients:
        raise ValueError(
            f"round 1 opened with {len(early)} of {clients} clients joined; set "
            "FEDQ_MIN_CLIENTS to the client count so that it waits for all of them"
        )
    return opened_at


def startup_times(
    *,
    services_started_at: float,
    clients_started_at: float,
    joined_at: Sequence[float],
    zero: float,
) -> dict[str, float]:
    """Seconds spent before the clock's zero, none of which it counts."""
    last_join = max(joined_at)
    return {
        "services_s": round(clients_started_at - services_started_at, 2),
        "clients_to_last_join_s": round(last_join - clients_started_at, 2),
        "last_join_to_round_1_s": round(zero - last_join, 3),
    }


def stored_at(
    number: int, stamps: Mapping[int, float], rounds: Sequence[Round], *, finished_at: float
) -> float:
    """When round ``number``'s model was stored, as the observer saw it.

    Falls back to the next round's opening (an upper bound), then to the end of the run.
    """
    if number in stamps:
        return stamps[number]
    later = [r["opened_at"] for r in rounds if r["round"] == number + 1]
    return float(later[0]) if later else finished_at


def measured_rounds(
    rounds: Sequence[Round], stamps: Mapping[int, float], *, zero: float, finished_at: float
) -> list[dict[str, Any]]:
    """Every finalized round on the clock from ``zero``, in round order.

    ``measured_s`` is when the round's model was stored; ``round_s`` runs from its
    opening to then and splits into ``clients_s`` (opening to close: the clients'
    download, training and upload) and ``aggregation_s`` (close to model stored);
    ``opening_s`` is the gap between the previous model and this round's opening.
    """
    finalized = sorted((r for r in rounds if r["status"] == "finalized"), key=lambda r: r["round"])
    records = []
    previous: float | None = None
    for r in finalized:
        stored = stored_at(r["round"], stamps, rounds, finished_at=finished_at)
        closed = r["closed_at"] or stored
        opening = 0.0 if previous is None else max(0.0, r["opened_at"] - previous)
        records.append(
            {
                "round": r["round"],
                "accuracy": r["test_accuracy"],
                "updates": r["updates_aggregated"],
                "measured_s": round(stored - zero, 3),
                "round_s": round(stored - r["opened_at"], 3),
                "clients_s": round(closed - r["opened_at"], 3),
                "aggregation_s": round(max(0.0, stored - closed), 3),
                "opening_s": round(opening, 3),
            }
        )
        previous = stored
    return records


def stop_reason(rounds: Sequence[Round], *, stop_at: float, finished: bool) -> str | None:
    """Why observing the run can stop, or None while it should go on.

    It can stop once a stored model was measured at or above ``stop_at``, or once the
    federation has finished and every finalized round's model has been evaluated.
    """
    finalized = [r for r in rounds if r["status"] == "finalized"]
    accuracies = [r["test_accuracy"] for r in finalized if r["test_accuracy"] is not None]
    if any(a >= stop_at for a in accuracies):
        return f"a model reached {stop_at:.2f} test accuracy"
    if finished and len(accuracies) == len(finalized):
        return "round cap reached"
    return None

"""Time to 91 % and 97 % MNIST test accuracy: centralized training against the federation.

    python -m benchmarks.time_to_accuracy            # full run (about 20 minutes on 2 cores)
    python -m benchmarks.time_to_accuracy --quick    # smoke run (1-2 minutes)

Runs, on the federation's model (``mnist_cnn``):

- centralized training on all 60,000 training examples, plain SGD and Opacus
  DP-SGD, the test accuracy measured every ``--eval-every`` steps on a clock that
  stops while it is measured;
- the embedded federation (``run_federation``, no services) with 10 and 50 clients
  (IID partition), DP off (``dp_mode="none"``) and on (``dp_mode="sample"``, Opacus
  DP-SGD on every client), every client taking part in every round.

The federation's clients are asyncio tasks of one process whose local training runs
in a thread pool of one thread per CPU core, so the *measured* federated wall-clock
is that of N clients taking turns on this machine's cores. The *projection* to one
machine per client adds, round by round, the slowest client's measured training,
the slowest client's measured transfers (model download and update upload, over
loopback gRPC) and the coordinator's measured time from the round's close to its
next model plus the opening of the next round. Both clocks start when round 1
opens (data loading, client start-up and joining are reported apart) and stop when
the model that first reaches the target is stored.

Writes ``benchmarks/results/time_to_accuracy.json`` (every evaluation and round,
the projection, the comparison with the 25 % latency-reduction claim, the command)
and prints a table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shlex
import statistics
import sys
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402

from benchmarks.central_training import CentralSettings, fastest_threads, train_centrally  # noqa: E402
from benchmarks.round_timing import POLL_S, TimedFederation, run_timed_federation  # noqa: E402
from benchmarks.time_to_target import (  # noqa: E402
    CLAIMED_REDUCTION,
    cumulative,
    first_time_to_target,
    projected_round_seconds,
    reduction,
    verdict_line,
)
from coordinator.settings import CoordinatorSettings  # noqa: E402
from fedq.datasets import load_dataset  # noqa: E402
from fedq.federation import FederationOptions  # noqa: E402
from fedq.plan import TrainingPlan  # noqa: E402

RESULTS = REPO_ROOT / "benchmarks" / "results" / "time_to_accuracy.json"
TARGETS = (0.91, 0.97)

# (--flag, full value, --quick value)
_CAPS = {
    "central_max_s": (120.0, 15.0),
    "rounds_10": (25, 2),
    "rounds_50": (8, 2),
    "local_steps": (30, 5),
}


def main(argv: list[str] | None = None) -> int:
    """Run every configuration, write the JSON and print the table; return the exit status."""
    args = _parser().parse_args(argv)
    _fill_caps(args)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    command = shlex.join(["python", "-m", "benchmarks.time_to_accuracy", *sys.argv[1:]])
    loads = [_loadavg("start")]

    train = load_dataset("mnist", root=args.data_dir, train=True)
    test = load_dataset("mnist", root=args.data_dir, train=False)
    calibration = fastest_threads(
        train, batch_size=args.batch_size, candidates=sorted({1, os.cpu_count() or 1})
    )

    centralized = {}
    for dp in (False, True):
        print(f"\n== centralized, DP {_on(dp)} ==", flush=True)
        centralized[_dp_key(dp)] = train_centrally(
            train, test, _central_settings(args, dp=dp, threads=calibration["threads"])
        )
        loads.append(_loadavg(f"after centralized DP {_on(dp)}"))

    federated = []
    for clients in args.clients:
        for dp in (False, True):
            print(f"\n== federation, {clients} clients, DP {_on(dp)} ==", flush=True)
            timed = asyncio.run(_run_federation(args, clients=clients, dp=dp))
            federated.append(_federated_record(timed, clients=clients, dp=dp))
            loads.append(_loadavg(f"after federation {clients} clients DP {_on(dp)}"))

    comparisons = _compare(centralized, federated)
    document = _document(args, command, calibration, centralized, federated, comparisons, loads)
    _print_table(document)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(document, indent=2) + "\n")
    print(f"\nwrote {out}")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default=str(REPO_ROOT.parent / "shared" / "data"))
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny caps")
    parser.add_argument("--clients", type=int, nargs="+", default=[10, 50])
    parser.add_argument("--central-max-s", type=float, default=None, help="training-clock cap")
    parser.add_argument("--eval-every", type=int, default=50, help="centralized steps")
    parser.add_argument("--rounds-10", type=int, default=None, help="round cap, 10 clients")
    parser.add_argument("--rounds-50", type=int, default=None, help="round cap, 50 clients")
    parser.add_argument("--rounds", type=int, default=None, help="round cap, other counts")
    parser.add_argument("--local-steps", type=int, default=None, help="per client per round")
    parser.add_argument("--batch-size", type=int, default=64, help="DP off")
    parser.add_argument("--lr", type=float, default=0.3, help="DP off")
    parser.add_argument("--dp-batch-size", type=int, default=128, help="expected Poisson batch")
    parser.add_argument("--dp-lr", type=float, default=0.5)
    parser.add_argument("--noise", type=float, default=1.0, help="noise multiplier σ")
    parser.add_argument("--clip", type=float, default=1.0, help="per-sample clip norm C")
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--workers", type=int, default=2, help="aggregation workers")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(RESULTS))
    return parser


def _fill_caps(args: argparse.Namespace) -> None:
    for name, (full, quick) in _CAPS.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    if args.rounds is None:
        args.rounds = args.rounds_50


def _rounds_for(args: argparse.Namespace, clients: int) -> int:
    return {10: args.rounds_10, 50: args.rounds_50}.get(clients, args.rounds)


def _on(dp: bool) -> str:
    return "on" if dp else "off"


def _dp_key(dp: bool) -> str:
    return f"dp_{_on(dp)}"


def _loadavg(when: str) -> dict[str, Any]:
    try:
        one, five, fifteen = Path("/proc/loadavg").read_text().split()[:3]
    except (OSError, ValueError):
        return {"when": when, "load_1m": None}
    return {"when": when, "load_1m": float(one), "load_5m": float(five), "load_15m": float(fifteen)}


# -- centralized ----------------------------------------------------------------------------


def _central_settings(args: argparse.Namespace, *, dp: bool, threads: int) -> CentralSettings:
    return CentralSettings(
        dp=dp,
        batch_size=args.dp_batch_size if dp else args.batch_size,
        learning_rate=args.dp_lr if dp else args.lr,
        noise_multiplier=args.noise,
        clip_norm=args.clip,
        delta=args.delta,
        eval_every=args.eval_every,
        max_train_s=args.central_max_s,
        stop_at=max(TARGETS),
        seed=args.seed,
        threads=threads,
    )


# -- federated ------------------------------------------------------------------------------


async def _run_federation(args: argparse.Namespace, *, clients: int, dp: bool) -> TimedFederation:
    plan = TrainingPlan(
        round=0,
        dp_mode="sample" if dp else "none",
        noise_multiplier=args.noise,
        clip_norm=args.clip,
        batch_size=args.dp_batch_size if dp else args.batch_size,
        local_steps=args.local_steps,
        learning_rate=args.dp_lr if dp else args.lr,
    )
    settings = CoordinatorSettings(
        dataset="mnist",
        data_dir=args.data_dir,
        rounds=_rounds_for(args, clients),
        clients_per_round=clients,
        round_timeout_s=1800.0,
        client_timeout_s=1800.0,
        plan=plan,
        delta=args.delta,
        epsilon_budget=1e9,  # not binding: every client takes part in every round
        seed=args.seed,
        adaptive_plans=False,  # every client runs exactly --local-steps steps
    )
    options = FederationOptions(
        clients=clients,
        workers=args.workers,
        partition="iid",
        train_threads=os.cpu_count() or 1,
        timeout_s=3600.0,
        progress=sys.stdout,
        probe=False,  # no speed probe: plans are not fitted to speed here
    )
    return await run_timed_federation(settings, options)


def _federated_record(timed: TimedFederation, *, clients: int, dp: bool) -> dict[str, Any]:
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
        "clients": clients,
        "dp": dp,
        "rounds": records,
        "rounds_finalized": len(records),
        "final_accuracy": summary.final_accuracy,
        "time_to_target_measured_s": _times(records, key="measured_s"),
        "time_to_target_projected_s": _times(records, key="projected_s"),
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
    finalized = _finalized_at(timed, number, rounds)
    previous = _finalized_at(timed, number - 1, rounds) if number > 1 else None

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


def _finalized_at(timed: TimedFederation, number: int, rounds: list[dict[str, Any]]) -> float:
    """When round ``number``'s model was stored, as the observer saw it.

    Falls back to the next round's opening (an upper bound), then to the end of the run.
    """
    if number in timed.finalized_at:
        return timed.finalized_at[number]
    later = [r["opened_at"] for r in rounds if r["round"] == number + 1]
    return later[0] if later else timed.finished_at


def _times(records: list[dict[str, Any]], *, key: str) -> dict[str, float | None]:
    points = [(r[key], r["accuracy"]) for r in records]
    return {_target_key(t): first_time_to_target(points, t) for t in TARGETS}


def _target_key(target: float) -> str:
    return f"{target:.2f}"


# -- comparison -----------------------------------------------------------------------------


def _central_times(run: dict[str, Any]) -> dict[str, float | None]:
    points = [(e["seconds"], e["accuracy"]) for e in run["evaluations"]]
    return {_target_key(t): first_time_to_target(points, t) for t in TARGETS}


def _compare(
    centralized: dict[str, dict[str, Any]], federated: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """One row per federated configuration, target and clock (measured, projected)."""
    rows = []
    for fed in federated:
        central = _central_times(centralized[_dp_key(fed["dp"])])
        for target in TARGETS:
            for kind in ("measured", "projected"):
                rows.append(_comparison_row(fed, central, target=target, kind=kind))
    return rows


def _comparison_row(
    fed: dict[str, Any], central: dict[str, float | None], *, target: float, kind: str
) -> dict[str, Any]:
    key = _target_key(target)
    federated_s = fed[f"time_to_target_{kind}_s"][key]
    upto = [r for r in fed["rounds"] if r[f"{kind}_s"] <= (federated_s or 0.0)]
    cut = reduction(federated_s, central[key])
    row = {
        "label": f"{fed['clients']} clients, DP {_on(fed['dp'])}, {kind}",
        "kind": kind,
        "clients": fed["clients"],
        "dp": fed["dp"],
        "target": target,
        "centralized_s": central[key],
        "federated_s": federated_s,
        "reduction": round(cut, 4) if cut is not None else None,
        "reaches_25_percent": cut >= CLAIMED_REDUCTION if cut is not None else None,
        "rounds_to_target": len(upto) if federated_s is not None else None,
        "round_s": _mean(
            [r["projected_round_s" if kind == "projected" else "round_s"] for r in upto]
        ),
        "train_max_s": _mean([r["train_max_s"] for r in upto]),
    }
    row["verdict"] = verdict_line(row)
    return row


def _mean(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return round(statistics.fmean(present), 3) if present else None


# -- output ---------------------------------------------------------------------------------


def _document(
    args: argparse.Namespace,
    command: str,
    calibration: dict[str, Any],
    centralized: dict[str, Any],
    federated: list[dict[str, Any]],
    comparisons: list[dict[str, Any]],
    loads: list[dict[str, Any]],
) -> dict[str, Any]:
    for run in centralized.values():
        run["time_to_target_s"] = _central_times(run)
    return {
        "benchmark": "time to MNIST test accuracy: centralized training against the federation",
        "command": command,
        "targets": list(TARGETS),
        "model": "mnist_cnn",
        "machine": {
            "cpu_cores": os.cpu_count(),
            "torch": torch.__version__,
            "centralized_threads": calibration,
            "federation_train_threads": os.cpu_count(),
        },
        "machine_load": loads,
        "machine_load_note": _load_note(loads),
        "how_measured": _HOW_MEASURED,
        "settings": _settings(args),
        "centralized": centralized,
        "federated": federated,
        "comparison": comparisons,
        "verdict": _verdict(comparisons),
    }


_HOW_MEASURED = {
    "centralized": (
        "one process, all 60,000 training examples; training clock only (stopped while "
        "the test set is evaluated); torch intra-op threads: the faster of 1 and all cores "
        "in a short calibration (machine.centralized_threads)"
    ),
    "federated_measured": (
        "embedded run_federation on this machine: clients are asyncio tasks in one process, "
        "local training in a pool of one thread per CPU core (not separate processes), "
        "in-process queue and store, loopback gRPC; the coordinator evaluates each model "
        "concurrently with the next round. Clock from round 1 opening to the storing of "
        "the first model at or above the target (stamped by polling the store every "
        f"{POLL_S}s)"
    ),
    "federated_projected": (
        "PROJECTION to one machine per client, computed from this run's measurements: per "
        "round, slowest client's local training (measured while sharing this machine's "
        "cores) + slowest client's model download and update upload (measured over loopback "
        "gRPC, no network latency or bandwidth limit) + coordinator time from round close "
        "to next model + opening of the next round; summed up to the first round at or "
        "above the target. Not measured on separate machines."
    ),
    "reduction": "1 - federated seconds / centralized seconds, same DP setting and target",
}


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "quick": args.quick,
        "clients": args.clients,
        "partition": "iid",
        "local_steps": args.local_steps,
        "round_caps": {str(n): _rounds_for(args, n) for n in args.clients},
        "central_max_train_s": args.central_max_s,
        "central_eval_every_steps": args.eval_every,
        "dp_off": {"dp_mode": "none", "batch_size": args.batch_size, "learning_rate": args.lr},
        "dp_on": {
            "dp_mode": "sample",
            "batch_size": args.dp_batch_size,
            "learning_rate": args.dp_lr,
            "noise_multiplier": args.noise,
            "clip_norm": args.clip,
            "delta": args.delta,
            "accountant": "rdp",
        },
        "optimizer": "SGD, no momentum, centralized and on every client",
        "aggregation_workers": args.workers,
        "seed": args.seed,
    }


def _load_note(loads: list[dict[str, Any]]) -> str:
    known = [x["load_1m"] for x in loads if x.get("load_1m") is not None]
    cores = os.cpu_count() or 1
    if not known:
        return "load average not available"
    peak = max(known)
    if peak > cores:
        return (
            f"other jobs shared the machine: 1-minute load average up to {peak:.1f} on "
            f"{cores} cores (this benchmark alone keeps it near {cores}); every wall-clock "
            "time here, centralized and federated, is inflated by them by an unknown factor"
        )
    return f"1-minute load average at most {peak:.1f} on {cores} cores"


def _verdict(comparisons: list[dict[str, Any]]) -> dict[str, Any]:
    projected = [c for c in comparisons if c["kind"] == "projected"]
    reached = [c for c in projected if c["reaches_25_percent"]]
    return {
        "claim": "the federation reduces the latency to target accuracy by at least 25%",
        "measured_on_this_machine": [c["verdict"] for c in comparisons if c["kind"] == "measured"],
        "projected_one_machine_per_client": [c["verdict"] for c in projected],
        "summary": (
            f"projected: {len(reached)} of {len(projected)} federated configuration/target "
            "pairs reach a 25% reduction; measured on this machine: "
            f"{sum(bool(c['reaches_25_percent']) for c in comparisons if c['kind'] == 'measured')}"
            f" of {len(projected)}"
        ),
    }


def _print_table(document: dict[str, Any]) -> None:
    keys = [_target_key(t) for t in TARGETS]
    print(
        f"\n{'setup':<28} {'DP':<4} {'final acc':>9} "
        + " ".join(f"{'to ' + k + ' meas.':>14} {'to ' + k + ' proj.':>14}" for k in keys)
    )
    for dp_key, run in document["centralized"].items():
        times = run["time_to_target_s"]
        accuracy = run["evaluations"][-1]["accuracy"] if run["evaluations"] else None
        cells = " ".join(f"{_cell(times[k]):>14} {'-':>14}" for k in keys)
        print(f"{'centralized':<28} {dp_key[3:]:<4} {_cell(accuracy, 4, missing='-'):>9} {cells}")
    for fed in document["federated"]:
        measured, projected = fed["time_to_target_measured_s"], fed["time_to_target_projected_s"]
        cells = " ".join(f"{_cell(measured[k]):>14} {_cell(projected[k]):>14}" for k in keys)
        setup = f"federation, {fed['clients']} clients"
        accuracy = _cell(fed["final_accuracy"], 4, missing="-")
        print(f"{setup:<28} {_on(fed['dp']):<4} {accuracy:>9} {cells}")

    print("\nverdict (reduction = 1 - federated / centralized; claim: >= 25%):")
    for row in document["comparison"]:
        print(f"  {row['verdict']}")
    print(f"\nmachine load: {document['machine_load_note']}")


def _cell(value: float | None, digits: int = 1, *, missing: str = "not reached") -> str:
    return missing if value is None else f"{value:.{digits}f}"


if __name__ == "__main__":
    raise SystemExit(main())

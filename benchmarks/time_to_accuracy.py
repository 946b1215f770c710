"""Time to 91 % and 97 % MNIST test accuracy: centralized training against the federation.

    python -m benchmarks.time_to_accuracy            # full run (about 25 minutes on 2 cores)
    python -m benchmarks.time_to_accuracy --quick    # smoke run: 5 and 20 clients, 2 rounds

Runs, on the federation's model (``mnist_cnn``):

- centralized training on all 60,000 training examples, plain SGD and Opacus
  DP-SGD, the test accuracy measured every ``--eval-every`` steps on a clock that
  stops while it is measured;
- the federation with 10 and 50 clients (IID partition), DP off (``dp_mode="none"``)
  and on (``dp_mode="sample"``, Opacus DP-SGD on every client), every client taking
  part in every round with the same plan, twice:

  - as processes (``benchmarks.process_federation``): ``fedq coordinator``, one
    ``fedq gateway``, ``--workers`` ``fedq worker`` and one ``fedq client`` process
    per client on this machine, against the real RabbitMQ and Redis
    (``FEDQ_BENCH_AMQP_URL``, ``FEDQ_BENCH_REDIS_URL``), one torch thread per client.
    Its clock is the *measured* federated time: N client processes sharing this
    machine's cores.
  - in one process (the embedded ``run_federation``: clients are asyncio tasks, local
    training in a pool of one thread per core), timed client by client. Its clock is
    reported as *in-process*; its per-client times make the *projection* to one
    machine per client: round by round, the slowest client's training, the slowest
    client's transfers (model download and update upload, over loopback gRPC) and the
    coordinator's time from the round's close to its next model plus the opening of
    the next round.

Every federated clock starts when round 1 opens, which the coordinator does only
once all N clients have joined (client start-up, data loading and joining are
reported apart), and stops when the model that first reaches the target is stored.
The process run is watched until a model reaches the top target or the round cap; if
it must stop early (a service died, the machine's available memory fell under
``--min-free-gib``), its measured times are missing and its record says why.

Writes ``benchmarks/results/time_to_accuracy.json`` (every evaluation and round, the
projection, memory of the process run, the comparison with the 25 % latency-reduction
claim, the command) and prints a table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shlex
import signal
import statistics
import sys
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402

from benchmarks.central_training import CentralSettings, fastest_threads, train_centrally  # noqa: E402
from benchmarks.federated_records import federated_record  # noqa: E402
from benchmarks.process_federation import (  # noqa: E402
    CLIENT_STARTS,
    ProcessOptions,
    ProcessRun,
    ProcessRunError,
    run_process_federation,
)
from benchmarks.round_timing import POLL_S, TimedFederation, run_timed_federation  # noqa: E402
from benchmarks.stack import load_average  # noqa: E402
from benchmarks.time_to_target import (  # noqa: E402
    CLAIMED_REDUCTION,
    reduction,
    target_key,
    times_to_targets,
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
    "clients": ([10, 50], [5, 20]),
    "central_max_s": (120.0, 8.0),
    "rounds_10": (25, 2),
    "rounds_50": (8, 2),
    "local_steps": (30, 5),
}


def main(argv: list[str] | None = None) -> int:
    """Run every configuration, write the JSON and print the table; return the exit status."""
    args = _parser().parse_args(argv)
    _fill_caps(args)
    # SIGTERM (and SIGINT even when started in the background) stop the run like Ctrl-C:
    # the process run's ``with`` block then stops its child processes.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _as_ctrl_c)
    try:
        return _run_all(args)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


def _run_all(args: argparse.Namespace) -> int:
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
            settings = _coordinator_settings(args, clients=clients, dp=dp)
            print(f"\n== federation in one process, {clients} clients, DP {_on(dp)} ==", flush=True)
            timed = asyncio.run(_run_in_process(args, settings, clients=clients))
            print(f"\n== federation as processes, {clients} clients, DP {_on(dp)} ==", flush=True)
            process = _run_as_processes(args, settings, clients=clients)
            federated.append(
                federated_record(timed, process, clients=clients, dp=dp, targets=TARGETS)
            )
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
    parser.add_argument("--clients", type=int, nargs="+", default=None, help="10 50; quick: 5 20")
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
    parser.add_argument(
        "--client-start",
        default="fork",
        choices=CLIENT_STARTS,
        help="process run: fork clients from a warmed-up fork server, or exec each anew",
    )
    parser.add_argument(
        "--startup-batch", type=int, default=4, help="process run: clients starting at once"
    )
    parser.add_argument(
        "--min-free-gib",
        type=float,
        default=2.0,
        help="process run: stop it if the machine's available memory falls below this",
    )
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


def _as_ctrl_c(signum: int, frame: Any) -> None:
    signal.raise_signal(signal.SIGINT)


def _loadavg(when: str) -> dict[str, Any]:
    loads = load_average()
    if loads is None:
        return {"when": when, "load_1m": None}
    return {"when": when, "load_1m": loads[0], "load_5m": loads[1], "load_15m": loads[2]}


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


def _coordinator_settings(
    args: argparse.Namespace, *, clients: int, dp: bool
) -> CoordinatorSettings:
    """The settings both runs of a configuration use."""
    plan = TrainingPlan(
        round=0,
        dp_mode="sample" if dp else "none",
        noise_multiplier=args.noise,
        clip_norm=args.clip,
        batch_size=args.dp_batch_size if dp else args.batch_size,
        local_steps=args.local_steps,
        learning_rate=args.dp_lr if dp else args.lr,
    )
    return CoordinatorSettings(
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


async def _run_in_process(
    args: argparse.Namespace, settings: CoordinatorSettings, *, clients: int
) -> TimedFederation:
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


def _run_as_processes(
    args: argparse.Namespace, settings: CoordinatorSettings, *, clients: int
) -> ProcessRun | ProcessRunError:
    """The process run, or the error that stopped it (the other runs still go on)."""
    options = ProcessOptions(
        clients=clients,
        workers=args.workers,
        client_start=args.client_start,
        startup_batch=args.startup_batch,
        stop_at=max(TARGETS),
        min_available_bytes=int(args.min_free_gib * 2**30),
        progress=sys.stdout,
    )
    try:
        return run_process_federation(settings, options)
    except ProcessRunError as exc:
        print(f"process run stopped: {exc}", flush=True)
        return exc


# -- comparison -----------------------------------------------------------------------------


def _central_times(run: dict[str, Any]) -> dict[str, float | None]:
    return times_to_targets([(e["seconds"], e["accuracy"]) for e in run["evaluations"]], TARGETS)


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


# Per clock: the run its rounds come from, the key of a round's time on the clock and
# of its length. Measured: the process run; projected: from the in-process run.
_CLOCKS = {
    "measured": ("processes", "measured_s", "round_s"),
    "projected": ("in_process", "projected_s", "projected_round_s"),
}


def _comparison_row(
    fed: dict[str, Any], central: dict[str, float | None], *, target: float, kind: str
) -> dict[str, Any]:
    key = target_key(target)
    run, clock, length = _CLOCKS[kind]
    federated_s = fed[f"time_to_target_{kind}_s"][key]
    upto = [r for r in fed[run]["rounds"] if r[clock] <= (federated_s or 0.0)]
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
        "round_s": _mean([r[length] for r in upto]),
        "train_max_s": _mean([r.get("train_max_s") for r in upto]),
    }
    if fed[run].get("error"):
        first_line = fed[run]["error"].splitlines()[0]
        row["unmeasured"] = f"the process run stopped before it could be measured: {first_line}"
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
            "memory_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
            "torch": torch.__version__,
            "centralized_threads": calibration,
            "in_process_train_threads": os.cpu_count(),
            "process_run_torch_threads_per_process": 1,
        },
        "machine_load": loads,
        "machine_load_note": _load_note(loads),
        "how_measured": _how_measured(args),
        "settings": _settings(args),
        "centralized": centralized,
        "federated": federated,
        "comparison": comparisons,
        "verdict": _verdict(comparisons),
    }


def _how_measured(args: argparse.Namespace) -> dict[str, str]:
    starts = {
        "fork": (
            "forked from a fork server that imported torch and Opacus and ran two tiny "
            "trainings (benchmarks.client_preload), so that they start warm and share those "
            "libraries' memory"
        ),
        "exec": (
            "started as programs of their own (python -m benchmarks.client_preload client ...), "
            "each importing torch and Opacus and running two tiny trainings before it joins"
        ),
    }
    return {
        "centralized": (
            "one process, all 60,000 training examples; training clock only (stopped while "
            "the test set is evaluated); torch intra-op threads: the faster of 1 and all "
            "cores in a short calibration (machine.centralized_threads)"
        ),
        "federated_measured": (
            "MEASURED with every party an OS process on this machine (federated[].processes): "
            "fedq coordinator (evaluates each new model on the test set, concurrently with "
            f"the next round), one fedq gateway, {args.workers} fedq worker processes and one "
            "fedq client process per client (partition i of an IID split), against the real "
            "RabbitMQ and Redis over loopback; one torch thread per process, so the N clients "
            f"share this machine's {os.cpu_count()} cores. Clients are "
            f"{starts[args.client_start]}; "
            "they are started a few at a time, and the coordinator opens round 1 only once all "
            "N have joined (FEDQ_MIN_CLIENTS defaults to the clients per round, N). Clock from "
            "round 1's opening (opened_at of its round record; client start-up, data loading "
            "and joining come before it, in processes.startup) to the storing of the first "
            "model at or above the target (stamped by polling the round records in Redis "
            f"every {POLL_S}s). Same settings and plans as the in-process run."
        ),
        "federated_in_process": (
            "MEASURED with the embedded run_federation on this machine "
            "(federated[].in_process): clients are asyncio tasks in one process, local "
            "training in a pool of one thread per CPU core (not separate processes), "
            "in-process queue and store, loopback gRPC; same clock start and stop as the "
            "process run. Reported for comparison and as the source of the projection."
        ),
        "federated_projected": (
            "PROJECTION to one machine per client, computed from the in-process run's "
            "measurements (federated[].in_process.rounds): per round, slowest client's local "
            "training (measured with about one core per training thread, as the pool has one "
            "thread per core; in the process run all N clients share the cores at once) + "
            "slowest client's model download and update upload (measured over loopback gRPC, "
            "no network latency or bandwidth limit) + coordinator time from round close to "
            "next model + opening of the next round; summed up to the first round at or above "
            "the target. Not measured on separate machines."
        ),
        "process_run_memory": (
            "federated[].processes.memory, over the benchmark's process tree (this process, "
            "the fork server, the services, the clients). peak_tree_rss_bytes: peak of the "
            "sum of VmRSS, sampled every second; it counts pages that processes share (the "
            "libraries forked clients share with the fork server) once per process, so it "
            "overstates the total. peak_tree_pss_estimate_bytes: peak, sampled every 10 s, "
            "of the PSS (shared pages divided among their sharers) of every process but the "
            "clients plus the number of clients times the PSS of one of them (a different one "
            "each time: reading all 50 clients' would disturb the timed run). "
            "peak_available_drop_bytes: drop of the machine's MemAvailable from just before "
            "the run, which other jobs move too."
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
        "process_run": {
            "client_start": args.client_start,
            "startup_batch": args.startup_batch,
            "gateways": 1,
            "stops_at_accuracy": max(TARGETS),
            "min_free_gib": args.min_free_gib,
        },
        "seed": args.seed,
    }


def _load_note(loads: list[dict[str, Any]]) -> str:
    """What the load average says: at the start, other jobs; later, mostly this benchmark."""
    known = [x for x in loads if x.get("load_1m") is not None]
    cores = os.cpu_count() or 1
    if not known:
        return "load average not available"
    start, peak = known[0]["load_1m"], max(x["load_1m"] for x in known)
    busy = "other jobs were running" if start > 0.5 * cores else "the machine was otherwise idle"
    return (
        f"1-minute load average {start:.1f} on {cores} cores before the first run "
        f"({busy}); up to {peak:.1f} after the runs, which counts this benchmark's own "
        "processes (the process runs put every client, the coordinator, the gateway and the "
        "workers on these cores at once), so it cannot tell other jobs apart"
    )


def _verdict(comparisons: list[dict[str, Any]]) -> dict[str, Any]:
    projected = [c for c in comparisons if c["kind"] == "projected"]
    measured = [c for c in comparisons if c["kind"] == "measured"]
    return {
        "claim": "the federation reduces the latency to target accuracy by at least 25%",
        "measured_on_this_machine": [c["verdict"] for c in measured],
        "projected_one_machine_per_client": [c["verdict"] for c in projected],
        "summary": (
            f"projected: {sum(bool(c['reaches_25_percent']) for c in projected)} of "
            f"{len(projected)} federated configuration/target pairs reach a 25% reduction; "
            "measured on this machine with clients as processes: "
            f"{sum(bool(c['reaches_25_percent']) for c in measured)} of {len(measured)}"
        ),
    }


def _print_table(document: dict[str, Any]) -> None:
    keys = [target_key(t) for t in TARGETS]
    clocks = ("measured", "in-process", "projected")
    print(
        f"\n{'':<24} {'':<4} {'':>9} "
        + " ".join(f"{'seconds to ' + k:^32}" for k in keys)
        + f"\n{'setup':<24} {'DP':<4} {'final acc':>9} "
        + " ".join(" ".join(f"{c:>10}" for c in clocks) for _ in keys)
    )
    for dp_key, run in document["centralized"].items():
        times = run["time_to_target_s"]
        accuracy = run["evaluations"][-1]["accuracy"] if run["evaluations"] else None
        cells = " ".join(f"{_cell(times[k]):>10} {'':>10} {'':>10}" for k in keys)
        print(f"{'centralized':<24} {dp_key[3:]:<4} {_cell(accuracy, 4, missing='-'):>9} {cells}")
    for fed in document["federated"]:
        times = [
            fed["time_to_target_measured_s"],
            fed["time_to_target_in_process_s"],
            fed["time_to_target_projected_s"],
        ]
        cells = " ".join(" ".join(f"{_cell(t[k]):>10}" for t in times) for k in keys)
        setup = f"federation, {fed['clients']} clients"
        accuracy = _cell(fed["final_accuracy"], 4, missing="-")
        print(f"{setup:<24} {_on(fed['dp']):<4} {accuracy:>9} {cells}")
    print(
        "measured: centralized training clock, or the federation with every client an OS "
        "process (final acc is this run's);\nin-process: the embedded federation; projected: "
        "to one machine per client, from the in-process run; n/r: not reached"
    )

    print("\nprocess runs (start-up not timed; memory of the whole process tree):")
    for fed in document["federated"]:
        print(f"  {fed['clients']} clients, DP {_on(fed['dp'])}: {_process_line(fed['processes'])}")
    print("\nverdict (reduction = 1 - federated / centralized; claim: >= 25%):")
    for row in document["comparison"]:
        print(f"  {row['verdict']}")
    print(f"\nmachine load: {document['machine_load_note']}")


def _process_line(processes: dict[str, Any]) -> str:
    if processes.get("error"):
        return "stopped: " + processes["error"].splitlines()[0]
    startup, memory = processes["startup"], processes["memory"]
    return (
        f"{processes['stopped']} after {processes['rounds_finalized']} rounds; start-up "
        f"{startup['services_s']:.0f}s services + {startup['clients_to_last_join_s']:.0f}s "
        f"clients; peak tree RSS {memory['peak_tree_rss_bytes'] / 2**30:.1f} GiB (PSS "
        f"~{memory['peak_tree_pss_estimate_bytes'] / 2**30:.1f} GiB), MemAvailable drop "
        f"{memory['peak_available_drop_bytes'] / 2**30:.1f} GiB"
    )


def _cell(value: float | None, digits: int = 1, *, missing: str = "n/r") -> str:
    return missing if value is None else f"{value:.{digits}f}"


if __name__ == "__main__":
    raise SystemExit(main())

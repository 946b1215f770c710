"""Accuracy against per-client ε of the one-command federation with DP-SGD on every client.

Runs ``run_federation`` in embedded mode (in-process queue and store) once per partition
scheme and writes the settings, per-round and final test accuracy, every client's ε and the
wall-clock time to ``benchmarks/results/privacy_<dataset>.json``.

    python benchmarks/privacy_mnist.py                      # MNIST, 50 clients, IID + Dirichlet
    python benchmarks/privacy_mnist.py --dataset cifar10    # CIFAR-10 (lossy JPEG copy)

``--append`` adds the runs to the runs already in the JSON file instead of replacing them,
so that one file can hold several settings.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from coordinator.settings import CoordinatorSettings, ServiceUrls  # noqa: E402
from fedq.federation import FederationOptions, run_federation  # noqa: E402
from fedq.plan import TrainingPlan  # noqa: E402

RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"

# Defaults per data set: (clients, noise, clip, batch, local steps, lr, rounds).
_DEFAULTS: dict[str, dict[str, Any]] = {
    "mnist": {
        "clients": 50,
        "noise": 2.5,
        "clip": 0.3,
        "batch_size": 128,
        "local_steps": 10,
        "lr": 4.0,
        "rounds": 20,
    },
    "cifar10": {
        "clients": 5,
        "noise": 1.0,
        "clip": 1.0,
        "batch_size": 64,
        "local_steps": 20,
        "lr": 1.0,
        "rounds": 3,
    },
}

_DATA_NOTES = {
    "mnist": "MNIST, exact copy of the original distribution",
    "cifar10": (
        "CIFAR-10 read from CIFAR10-jpeg: JPEG re-encodes (quality 75) of the original "
        "images, so accuracy is not directly comparable with results on the original data"
    ),
}


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and write its JSON; return the exit status."""
    args = _parser().parse_args(argv)
    _fill_defaults(args)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    command = shlex.join(
        ["python", "-m", "benchmarks.privacy_mnist", *(sys.argv[1:] if argv is None else argv)]
    )
    print(f"{args.dataset}: {_DATA_NOTES[args.dataset]}", flush=True)

    runs = []
    for scheme in args.partitions:
        print(f"\n== {args.dataset}, {args.clients} clients, {scheme} partition ==", flush=True)
        run = asyncio.run(_run_one(args, scheme=scheme))
        run["command"] = command
        runs.append(run)

    _print_table(runs)
    out = Path(args.out) if args.out else RESULTS_DIR / f"privacy_{args.dataset}.json"
    _write(out, dataset=args.dataset, runs=runs, append=args.append)
    print(f"\nwrote {out}")

    floor = args.min_accuracy
    if floor is not None and any((r["final_accuracy"] or 0.0) < floor for r in runs):
        print(f"final accuracy below --min-accuracy {floor}", file=sys.stderr)
        return 1
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="mnist", choices=sorted(_DEFAULTS))
    parser.add_argument(
        "--data-dir", default=str(REPO_ROOT.parent / "shared" / "data"), help="torchvision layout"
    )
    parser.add_argument("--clients", type=int, default=None)
    parser.add_argument(
        "--partitions", nargs="+", default=None, choices=("iid", "dirichlet"), help="run each"
    )
    parser.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration")
    parser.add_argument("--noise", type=float, default=None, help="noise multiplier σ")
    parser.add_argument("--clip", type=float, default=None, help="per-sample clip norm C")
    parser.add_argument("--batch-size", type=int, default=None, help="expected Poisson batch")
    parser.add_argument(
        "--sample-rate",
        type=float,
        default=0.0,
        help="one Poisson rate for every client (0: batch size over each client's examples)",
    )
    parser.add_argument("--local-steps", type=int, default=None, help="DP-SGD steps per round")
    parser.add_argument("--lr", type=float, default=None, help="client learning rate")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--server-lr", type=float, default=1.0, help="server learning rate η")
    parser.add_argument("--server-momentum", type=float, default=0.0, help="server momentum β")
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument(
        "--epsilon-budget", type=float, default=1e6, help="ledger budget (default: not binding)"
    )
    parser.add_argument("--workers", type=int, default=2, help="aggregation workers")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min-accuracy", type=float, default=None, help="exit 1 below this")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/)")
    parser.add_argument("--append", action="store_true", help="keep the runs already in --out")
    return parser


def _fill_defaults(args: argparse.Namespace) -> None:
    defaults = _DEFAULTS[args.dataset]
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.partitions is None:
        args.partitions = ["iid", "dirichlet"] if args.dataset == "mnist" else ["iid"]


async def _run_one(args: argparse.Namespace, *, scheme: str) -> dict[str, Any]:
    """One federation with the arguments' settings; returns its JSON record."""
    plan = TrainingPlan(
        round=0,
        dp_mode="sample",
        noise_multiplier=args.noise,
        clip_norm=args.clip,
        batch_size=args.batch_size,
        local_steps=args.local_steps,
        learning_rate=args.lr,
    )
    settings = CoordinatorSettings(
        dataset=args.dataset,
        data_dir=args.data_dir,
        rounds=args.rounds,
        clients_per_round=args.clients,
        round_timeout_s=1800.0,
        client_timeout_s=600.0,
        plan=plan,
        delta=args.delta,
        epsilon_budget=args.epsilon_budget,
        seed=args.seed,
        server_learning_rate=args.server_lr,
        server_momentum=args.server_momentum,
        sample_rate=args.sample_rate,
    )
    options = FederationOptions(
        clients=args.clients,
        workers=args.workers,
        partition=scheme,
        alpha=args.alpha,
        timeout_s=3600.0,
        progress=sys.stdout,
    )

    started = time.monotonic()
    summary = await run_federation(settings, ServiceUrls(), options)
    seconds = time.monotonic() - started
    return _record(args, scheme=scheme, summary=summary, seconds=seconds)


def _record(
    args: argparse.Namespace, *, scheme: str, summary: Any, seconds: float
) -> dict[str, Any]:
    per_client = {p["client_id"]: p["epsilon_spent"] for p in summary.privacy}
    spent = sorted(per_client.values())
    rounds = [r for r in summary.rounds if r["status"] == "finalized"]
    return {
        "dataset": args.dataset,
        "data": _DATA_NOTES[args.dataset],
        "partition": scheme if scheme == "iid" else f"dirichlet(alpha={args.alpha})",
        "settings": {
            "clients": args.clients,
            "rounds": args.rounds,
            "dp_mode": "sample",
            "noise_multiplier": args.noise,
            "clip_norm": args.clip,
            "batch_size": args.batch_size,
            "sample_rate": args.sample_rate or "batch size / client examples",
            "local_steps": args.local_steps,
            "learning_rate": args.lr,
            "server_learning_rate": args.server_lr,
            "server_momentum": args.server_momentum,
            "delta": args.delta,
            "accountant": "rdp",
            "seed": args.seed,
        },
        "final_accuracy": summary.final_accuracy,
        "round_accuracy": [r["test_accuracy"] for r in rounds],
        "rounds_finalized": len(rounds),
        "epsilon": {
            "min": spent[0] if spent else None,
            "median": statistics.median(spent) if spent else None,
            "max": spent[-1] if spent else None,
            "per_client": per_client,
        },
        "seconds": round(seconds, 1),
    }


def _print_table(runs: list[dict[str, Any]]) -> None:
    print(
        f"\n{'partition':<22} {'σ':>5} {'C':>5} {'batch':>5} {'steps':>5} {'lr':>5} "
        f"{'rounds':>6} {'accuracy':>9} {'ε min':>7} {'ε median':>8} {'ε max':>7} {'seconds':>8}"
    )
    for run in runs:
        s, eps = run["settings"], run["epsilon"]
        accuracy = run["final_accuracy"]
        print(
            f"{run['partition']:<22} {s['noise_multiplier']:>5g} {s['clip_norm']:>5g} "
            f"{s['batch_size']:>5} {s['local_steps']:>5} {s['learning_rate']:>5g} "
            f"{s['rounds']:>6} {accuracy if accuracy is not None else float('nan'):>9.4f} "
            f"{eps['min']:>7.3f} {eps['median']:>8.3f} {eps['max']:>7.3f} {run['seconds']:>8.1f}"
        )


def _write(path: Path, *, dataset: str, runs: list[dict[str, Any]], append: bool) -> None:
    earlier: list[dict[str, Any]] = []
    if append and path.exists():
        earlier = json.loads(path.read_text()).get("runs", [])

    document = {
        "benchmark": "DP-SGD (dp_mode sample) federation, embedded mode",
        "dataset": dataset,
        "data": _DATA_NOTES[dataset],
        "runs": earlier + runs,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())

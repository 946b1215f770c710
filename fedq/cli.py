"""The ``fedq`` command: the one-command federation and each service's entry point."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

from fedq.admin_cli import add_dead_letters_parser, add_replay_parser
from fedq.config import EnvReader, SettingsError
from fedq.logs import setup_logging

if TYPE_CHECKING:
    from coordinator.settings import CoordinatorSettings

__all__ = ["main"]

log = logging.getLogger("fedq")


def main(argv: Sequence[str] | None = None) -> int:
    """Parse arguments, run the chosen command and return its exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    env = EnvReader()
    try:
        setup_logging(
            level=args.log_level or env.str("LOG_LEVEL", "INFO"),
            fmt=env.str("LOG_FORMAT", "text", choices=("text", "json")),
        )
        return int(asyncio.run(args.handler(args)) or 0)
    except SettingsError as exc:
        print(f"fedq: configuration error: {exc}", file=sys.stderr)
        return 2
    except FileNotFoundError as exc:
        print(f"fedq: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedq", description=__doc__)
    parser.add_argument(
        "--log-level", default=None, help="DEBUG, INFO, WARNING (env FEDQ_LOG_LEVEL)"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a whole federation on this machine")
    _add_run_arguments(run)
    run.set_defaults(handler=_run)

    for name, handler, text in (
        ("coordinator", _coordinator, "round manager and REST API (settings from FEDQ_*)"),
        ("gateway", _gateway, "gRPC gateway (settings from FEDQ_*)"),
        ("worker", _worker, "aggregator worker (settings from FEDQ_*)"),
    ):
        service = sub.add_parser(name, help=text)
        service.set_defaults(handler=handler)

    client = sub.add_parser("client", help="one client process (flags override FEDQ_*)")
    client.add_argument("--client-id", default=None)
    client.add_argument("--gateways", default=None, help="host:port[,host:port...]")
    client.add_argument("--dataset", default=None)
    client.add_argument("--data-dir", default=None)
    client.add_argument("--partitions", type=int, default=None)
    client.add_argument("--partition-index", type=int, default=None)
    client.add_argument(
        "--partition", dest="partition_scheme", default=None, choices=("iid", "dirichlet")
    )
    client.add_argument("--alpha", type=float, default=None)
    client.set_defaults(handler=_client)

    privacy = sub.add_parser("privacy", help="privacy/accuracy trade-off: table or sweep")
    privacy_sub = privacy.add_subparsers(dest="privacy_command", required=True)
    table = privacy_sub.add_parser("table", help="ε for noise multipliers (accounting only)")
    table.add_argument("--noise", type=float, nargs="+", default=[0.6, 0.8, 1.0, 1.5, 2.0])
    table.add_argument("--sample-rate", type=float, default=0.01)
    table.add_argument("--local-steps", type=int, default=50)
    table.add_argument("--rounds", type=int, default=10)
    table.add_argument("--delta", type=float, default=1e-5)
    table.add_argument("--accountant", default="rdp", choices=("rdp", "prv"))
    table.set_defaults(handler=_privacy)
    _add_sweep_parser(privacy_sub)
    add_dead_letters_parser(sub)
    add_replay_parser(sub)
    return parser


def _add_sweep_parser(privacy_sub: argparse._SubParsersAction) -> None:
    sweep = privacy_sub.add_parser(
        "sweep", help="train once per noise multiplier: ε and final accuracy, JSON and plot"
    )
    sweep.add_argument("--dataset", default="mnist", help="mnist, fashion-mnist or cifar10")
    sweep.add_argument("--data-dir", default=None, help="data folder (env FEDQ_DATA_DIR)")
    sweep.add_argument("--clients", type=int, default=10)
    sweep.add_argument("--rounds", type=int, default=3)
    sweep.add_argument("--noise", type=float, nargs="+", default=[0.8, 1.0, 1.5, 2.0])
    sweep.add_argument("--dp-mode", default="sample", choices=("sample", "client"))
    sweep.add_argument("--clip-norm", type=float, default=1.0)
    sweep.add_argument("--local-steps", type=int, default=50)
    sweep.add_argument("--batch-size", type=int, default=64)
    sweep.add_argument("--learning-rate", type=float, default=0.5)
    sweep.add_argument("--partition", default="iid", choices=("iid", "dirichlet"))
    sweep.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration")
    sweep.add_argument("--delta", type=float, default=1e-5)
    sweep.add_argument("--seed", type=int, default=0)
    sweep.add_argument("--out", default="privacy-sweep", help="folder for the JSON and PNG")
    sweep.set_defaults(handler=_privacy_sweep)


def _add_run_arguments(run: argparse.ArgumentParser) -> None:
    run.add_argument("--dataset", default=None, help="mnist, fashion-mnist, cifar10 or folder:PATH")
    run.add_argument("--model", default=None, help="registry name or package.module:factory")
    run.add_argument("--data-dir", default=None, help="data folder (env FEDQ_DATA_DIR)")
    run.add_argument("--clients", type=int, default=10)
    run.add_argument("--clients-per-round", type=int, default=None)
    run.add_argument("--rounds", type=int, default=None)
    run.add_argument("--workers", type=int, default=2)
    run.add_argument("--partition", default="iid", choices=("iid", "dirichlet"))
    run.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration")
    run.add_argument("--dp-mode", default=None, choices=("sample", "client", "none"))
    run.add_argument("--noise-multiplier", type=float, default=None)
    run.add_argument("--clip-norm", type=float, default=None)
    run.add_argument("--local-steps", type=int, default=None)
    run.add_argument("--batch-size", type=int, default=None)
    run.add_argument("--learning-rate", type=float, default=None)
    run.add_argument("--epsilon-budget", type=float, default=None)
    run.add_argument("--round-timeout", type=float, default=None, help="seconds per round")
    run.add_argument("--seed", type=int, default=None)
    run.add_argument("--api-port", type=int, default=None, help="also serve the REST API")
    run.add_argument("--amqp-url", default=None, help="RabbitMQ URL (env FEDQ_AMQP_URL)")
    run.add_argument("--redis-url", default=None, help="Redis URL (env FEDQ_REDIS_URL)")
    run.add_argument("--resume", action="store_true", help="continue the federation in Redis")
    run.add_argument("--mode", default=None, choices=("sync", "async"), help="env FEDQ_MODE")
    run.add_argument("--client-fraction", type=float, default=None, help="share selected")
    run.add_argument(
        "--speed-spread",
        type=float,
        default=0.0,
        help="simulate slow clients: each trains a seeded 1 to 1+S times slower",
    )
    run.add_argument(
        "--link-delay-ms",
        type=float,
        default=0.0,
        help="simulate link latency: each client a seeded 0.5 to 1.5 times this, per transfer",
    )
    run.add_argument(
        "--min-accuracy",
        type=float,
        default=None,
        help="exit 1 unless the final test accuracy reaches this",
    )


async def _run(args: argparse.Namespace) -> int:
    from coordinator.settings import ServiceUrls
    from fedq.federation import FederationOptions, run_federation
    from fedq.summary import print_summary

    settings = _run_settings(args)
    urls = ServiceUrls.from_env()
    urls = replace(
        urls,
        amqp_url=args.amqp_url if args.amqp_url is not None else urls.amqp_url,
        redis_url=args.redis_url if args.redis_url is not None else urls.redis_url,
    )
    if args.clients < 1 or args.workers < 1:
        raise SettingsError("--clients and --workers must be at least 1")
    if args.speed_spread < 0 or args.link_delay_ms < 0:
        raise SettingsError("--speed-spread and --link-delay-ms must be at least 0")

    mode = "RabbitMQ + Redis" if urls.amqp_url and urls.redis_url else "embedded queue/store"
    if bool(urls.amqp_url) != bool(urls.redis_url):
        raise SettingsError("give both --amqp-url and --redis-url, or neither (embedded mode)")
    print(
        f"fedq: {args.clients} clients, {settings.rounds} rounds, {args.workers} workers, "
        f"{settings.dataset}, DP {settings.plan.dp_mode}, {mode}",
        flush=True,
    )

    options = FederationOptions(
        clients=args.clients,
        workers=args.workers,
        partition=args.partition,
        alpha=args.alpha,
        api_port=args.api_port,
        resume=args.resume,
        progress=sys.stdout,
        speed_spread=args.speed_spread,
        link_delay_ms=args.link_delay_ms,
    )
    summary = await run_federation(settings, urls, options)
    print_summary(summary, settings=settings, out=sys.stdout)

    if args.min_accuracy is not None and (summary.final_accuracy or 0.0) < args.min_accuracy:
        print(f"fedq: final accuracy below --min-accuracy {args.min_accuracy}", file=sys.stderr)
        return 1
    return 0


def _run_settings(args: argparse.Namespace) -> CoordinatorSettings:
    from coordinator.settings import CoordinatorSettings

    settings = CoordinatorSettings.from_env()
    plan_changes = {
        "dp_mode": args.dp_mode,
        "noise_multiplier": args.noise_multiplier,
        "clip_norm": args.clip_norm,
        "local_steps": args.local_steps,
        "batch_size": args.batch_size,
        "learning_rate": args.learning_rate,
    }
    try:
        plan = replace(settings.plan, **{k: v for k, v in plan_changes.items() if v is not None})
    except ValueError as exc:
        raise SettingsError(str(exc)) from exc

    changes = {
        "dataset": args.dataset,
        "model": args.model,
        "data_dir": args.data_dir,
        "rounds": args.rounds,
        "clients_per_round": args.clients_per_round
        or (args.clients if "FEDQ_CLIENTS_PER_ROUND" not in os.environ else None),
        "epsilon_budget": args.epsilon_budget,
        "round_timeout_s": args.round_timeout,
        "seed": args.seed,
        "mode": args.mode,
        "client_fraction": args.client_fraction,
    }
    return replace(settings, plan=plan, **{k: v for k, v in changes.items() if v is not None})


async def _privacy(args: argparse.Namespace) -> int:
    from coordinator.privacy import tradeoff_table

    rows = tradeoff_table(
        args.noise,
        sample_rate=args.sample_rate,
        local_steps=args.local_steps,
        rounds=args.rounds,
        delta=args.delta,
        accountant=args.accountant,
    )
    print(
        f"{'noise':>8} {'ε':>10}   (q={args.sample_rate}, {args.local_steps} steps × "
        f"{args.rounds} rounds, δ={args.delta:g}, {args.accountant})"
    )
    for row in rows:
        print(f"{row['noise_multiplier']:>8.3f} {row['epsilon']:>10.3f}")
    return 0


async def _privacy_sweep(args: argparse.Namespace) -> int:
    from pathlib import Path

    from coordinator.settings import CoordinatorSettings
    from fedq.federation import FederationOptions
    from fedq.plan import TrainingPlan
    from fedq.sweep import run_sweep, table_header

    if args.clients < 1 or args.rounds < 1:
        raise SettingsError("--clients and --rounds must be at least 1")
    try:
        plans = [
            TrainingPlan(
                round=0,
                dp_mode=args.dp_mode,
                noise_multiplier=noise,
                clip_norm=args.clip_norm,
                batch_size=args.batch_size,
                local_steps=args.local_steps,
                learning_rate=args.learning_rate,
            )
            for noise in args.noise
        ]
    except ValueError as exc:
        raise SettingsError(str(exc)) from exc

    settings = CoordinatorSettings(
        dataset=args.dataset,
        data_dir=args.data_dir or os.environ.get("FEDQ_DATA_DIR", ""),
        rounds=args.rounds,
        clients_per_round=args.clients,
        plan=plans[0],
        delta=args.delta,
        epsilon_budget=1e9,  # the sweep measures ε; no budget should stop a client
        seed=args.seed,
    )
    options = FederationOptions(
        clients=args.clients, workers=2, partition=args.partition, alpha=args.alpha
    )
    print(
        f"fedq privacy sweep: {args.dataset}, {args.clients} clients, {args.rounds} rounds, "
        f"DP {args.dp_mode}, δ={args.delta:g}, embedded queue/store",
        flush=True,
    )
    print(table_header(), flush=True)
    result = await run_sweep(
        settings, args.noise, options=options, out_dir=Path(args.out), out=sys.stdout
    )
    print(f"wrote {result.json_path} and {result.plot_path}")
    return 0


async def _client(args: argparse.Namespace) -> int:
    from clients.service import ClientSettings, run_client

    gateways = (
        tuple(g.strip() for g in args.gateways.split(",") if g.strip()) if args.gateways else None
    )
    settings = ClientSettings.from_env(
        client_id=args.client_id,
        gateways=gateways,
        dataset=args.dataset,
        data_dir=args.data_dir,
        partitions=args.partitions,
        partition_index=args.partition_index,
        partition_scheme=args.partition_scheme,
        alpha=args.alpha,
    )
    await run_client(settings)
    return 0


async def _coordinator(args: argparse.Namespace) -> int:
    from coordinator.service import run_coordinator

    await run_coordinator()
    return 0


async def _gateway(args: argparse.Namespace) -> int:
    from coordinator.service import run_gateway

    await run_gateway()
    return 0


async def _worker(args: argparse.Namespace) -> int:
    from workers.service import run_worker

    await run_worker()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Aggregation throughput with its ceilings, all measured in one run.

    python -m benchmarks.throughput [--quick]

* end to end (``benchmarks.load``): clients submit through a gateway while workers
  run; 50, 200 and 1,000 clients on the 26k model with 2 workers, and 1, 2 and 4
  workers on the 26k model (1,000 clients) and the 1.2M model (200 clients);
* aggregation alone: the same updates queued first, then 1, 2 or 4 workers drain
  the queue (updates counted per second from their first commit to their last);
* ceilings: the raw RabbitMQ publish -> consume rate and the consume-only rate for
  messages of the same size on a durable quorum queue (persistent messages,
  publisher confirms, manual acks); the in-memory add rate (numpy int64 add of the
  fixed-point vector) and the decode + fixed-point rate of one worker thread;
* the gRPC relay ceiling (``benchmarks.relay``): the same uploads through a gRPC
  server that does nothing but publish each one (confirmed, persistent, same queue
  settings) and reply, with a consumer acking them: what any gateway of this
  architecture can reach on the machine;
* Flower's FedAvg ``aggregate`` on the same updates, when ``flwr`` is importable by
  the interpreter in ``$FEDQ_FLWR_PYTHON`` (default ``/tmp/flwr-venv/bin/python``).

CPU seconds of every service are recorded per scenario, so the table can say what
bounds the rate. Writes ``benchmarks/results/throughput.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import aio_pika
import numpy as np

from benchmarks.broker import AckingConsumer, fresh_quorum_queue
from benchmarks.load import make_updates, print_row, run_load
from benchmarks.relay import relay_rate
from benchmarks.stack import AMQP_URL, load_average
from benchmarks.updates import dp_update, model_shapes
from fedq.state.partials import fill_fixed_point
from proto.codec import iter_tensors

RESULTS = Path(__file__).parent / "results"
FLWR_PYTHON = os.environ.get("FEDQ_FLWR_PYTHON", "/tmp/flwr-venv/bin/python")
RAW_QUEUE = "fedq.bench.raw"
CEILING_REPEATS = 3  # the broker's rate on this machine varies from run to run

_FLWR_SCRIPT = """
import sys, time, numpy as np
from flwr.server.strategy.aggregate import aggregate
data = np.load(sys.argv[1])
names = sorted({k.split("/")[1] for k in data.files})
clients = sorted({int(k.split("/")[0]) for k in data.files})
results = [([data[f"{c}/{n}"] for n in names], 100) for c in clients]
best = float("inf")
for _ in range(int(sys.argv[2])):
    started = time.perf_counter()
    aggregate(results)
    best = min(best, time.perf_counter() - started)
import flwr
print(flwr.__version__, len(results), best)
"""


async def raw_broker_rate(message_bytes: int, *, messages: int, in_flight: int = 50) -> float:
    """Messages/s from the first confirmed publish to the last consumer ack."""
    return await _raw_rate(message_bytes, messages=messages, in_flight=in_flight, prefill=False)


async def raw_consume_rate(message_bytes: int, *, messages: int, in_flight: int = 50) -> float:
    """Messages/s one consumer acks from a queue already holding ``messages``."""
    return await _raw_rate(message_bytes, messages=messages, in_flight=in_flight, prefill=True)


async def _raw_rate(message_bytes: int, *, messages: int, in_flight: int, prefill: bool) -> float:
    """Publish ``messages`` (confirmed, persistent) to a fresh quorum queue and consume them.

    Without ``prefill`` the consumer runs while publishing and the clock covers both;
    with it, the queue is filled first and the clock covers consuming only.
    """
    connection = await aio_pika.connect_robust(AMQP_URL)
    try:
        publish = await connection.channel(publisher_confirms=True)
        queue = await fresh_quorum_queue(publish, RAW_QUEUE)
        body = os.urandom(message_bytes)
        slots = asyncio.Semaphore(in_flight)
        consumer = AckingConsumer(messages)

        async def one() -> None:
            async with slots:
                await publish.default_exchange.publish(
                    aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                    routing_key=RAW_QUEUE,
                    mandatory=True,
                )

        async def start_consuming() -> None:
            await consumer.start(connection, RAW_QUEUE, prefetch=64 if prefill else 16)

        async def publish_all() -> None:
            await asyncio.gather(*(one() for _ in range(messages)))

        steps = (publish_all, start_consuming) if prefill else (start_consuming, publish_all)
        before, timed = steps
        await before()
        started = time.perf_counter()
        await timed()
        await consumer.wait(timeout_s=600)
        elapsed = time.perf_counter() - started
        await consumer.close()
        await queue.delete(if_unused=False, if_empty=False)
        return messages / elapsed
    finally:
        await connection.close()


def add_rates(model: str, payloads: list[bytes]) -> dict[str, float]:
    """int64 adds/s of the fixed-point vector, and decode + fixed-point updates/s."""
    size = sum(int(np.prod(s)) for s in model_shapes(model).values())
    total, vector = np.zeros(size, np.int64), np.ones(size, np.int64)
    repeats = max(20, int(2e8 // size))
    started = time.perf_counter()
    for _ in range(repeats):
        total += vector
    add_per_s = repeats / (time.perf_counter() - started)

    scratch = np.empty(size, np.int64)
    started = time.perf_counter()
    for payload in payloads:
        at = 0
        for _, array in iter_tensors(payload, max_bytes=size * 4):
            fill_fixed_point(scratch[at : at + array.size], array.reshape(-1), 100)
            at += array.size
    decode_per_s = len(payloads) / (time.perf_counter() - started)
    return {
        "int64_add_per_s": round(add_per_s, 1),
        "decode_fixed_point_per_s": round(decode_per_s, 1),
    }


def flower_rate(model: str, clients: int, *, repeat: int = 3) -> dict[str, Any]:
    """Flower's FedAvg ``aggregate`` on ``clients`` updates, or why it could not run."""
    if not Path(FLWR_PYTHON).exists():
        return {"error": f"no interpreter at {FLWR_PYTHON} (pip install flwr in a venv there)"}
    shapes = model_shapes(model)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "updates.npz"
        arrays = {
            f"{c}/{n}": a for c in range(clients) for n, a in dp_update(shapes, seed=c).items()
        }
        np.savez(path, **arrays)
        run = subprocess.run(
            [FLWR_PYTHON, "-c", _FLWR_SCRIPT, str(path), str(repeat)],
            capture_output=True,
            text=True,
            timeout=600,
        )
    if run.returncode != 0:
        return {"error": run.stderr.strip().splitlines()[-1][:200] if run.stderr else "failed"}
    version, count, seconds = run.stdout.split()
    return {
        "flwr_version": version,
        "updates": int(count),
        "seconds": float(seconds),
        "updates_per_s": round(int(count) / float(seconds), 1),
    }


# Clients (updates) per scenario for each model, full and --quick.
_CLIENTS = {"26k": (1000, 200), "1.2m": (200, 50)}


def _scenarios(quick: bool) -> list[tuple[str, int, int, bool]]:
    """(model, clients, workers, prefill) for every run, in the order they run."""
    sizes = {model: counts[1] if quick else counts[0] for model, counts in _CLIENTS.items()}
    scenarios = [("26k", c, 2, False) for c in (50, 200, 1000) if c < sizes["26k"]]
    for model, clients in sizes.items():
        scenarios += [(model, clients, w, False) for w in (1, 2, 4)]
        scenarios += [(model, clients, w, True) for w in (1, 2, 4)]
    return scenarios


async def run_all(*, quick: bool) -> dict[str, Any]:
    """Every scenario and ceiling; ``quick`` trims the client counts.

    A model's ceilings are measured just before its scenarios, ``CEILING_REPEATS``
    times each, interleaved; the ratios use their medians.
    """
    sizes = {model: counts[1] if quick else counts[0] for model, counts in _CLIENTS.items()}
    scenarios = _scenarios(quick)

    runs, ceilings = [], {}
    for model, clients, workers, prefill in scenarios:
        if model not in ceilings:
            ceilings[model] = await _ceilings(model, sizes[model])
            print(model, json.dumps(ceilings[model]))
        result = await run_load(
            clients=clients, model=model, workers=workers, prefill=prefill, batch_updates=16
        )
        print_row(result)
        runs.append(result)

    return {
        "command": "python -m benchmarks.throughput" + (" --quick" if quick else ""),
        "cpus": os.cpu_count(),
        "load_average": load_average(),
        "runs": runs,
        "ceilings": ceilings,
        "ratios": _ratios(runs, ceilings),
    }


async def _ceilings(model: str, clients: int) -> dict[str, Any]:
    """The broker and relay ceilings (medians of repeats) and the in-memory rates of a model."""
    payloads, _ = make_updates(model, clients, codec="q8")
    size = int(np.mean([len(p) for p in payloads])) + 200
    messages = max(clients, 2000 if model == "26k" else 300)

    measured: dict[str, list[float]] = {
        "publish_consume": [],
        "consume_only": [],
        "relay": [],
        "relay_cpu_ms": [],
    }
    for _ in range(CEILING_REPEATS):
        measured["publish_consume"].append(await raw_broker_rate(size, messages=messages))
        rate, cpu_ms = await relay_rate(payloads)
        measured["relay"].append(rate)
        measured["relay_cpu_ms"].append(cpu_ms)
        measured["consume_only"].append(await raw_consume_rate(size, messages=messages))
    runs = {name: [round(value, 2) for value in values] for name, values in measured.items()}
    median = {name: round(float(np.median(values)), 2) for name, values in measured.items()}
    return {
        "message_bytes": size,
        "rabbitmq_publish_consume_per_s": median["publish_consume"],
        "rabbitmq_consume_only_per_s": median["consume_only"],
        "grpc_relay_per_s": median["relay"],
        "grpc_relay_cpu_ms_per_update": median["relay_cpu_ms"],
        "repeats": runs,
        **add_rates(model, payloads[:50]),
        "flower_fedavg_aggregate": flower_rate(model, 50),
    }


def _ratios(runs: list[dict[str, Any]], ceilings: dict[str, Any]) -> list[dict[str, Any]]:
    """Each run's rate against the broker ceiling for its message size."""
    rows = []
    for r in runs:
        ceiling = ceilings[r["model"]]
        rate = r["drain_updates_per_s"] if r["prefilled"] else r["updates_per_s"]
        against = (
            ceiling["rabbitmq_consume_only_per_s"]
            if r["prefilled"]
            else ceiling["rabbitmq_publish_consume_per_s"]
        )
        rows.append(
            {
                "model": r["model"],
                "clients": r["clients"],
                "workers": r["workers"],
                "kind": "aggregation alone" if r["prefilled"] else "end to end",
                "updates_per_s": rate,
                "broker_ceiling_per_s": against,
                "share_of_ceiling": round(rate / against, 3) if rate and against else None,
                "relay_ceiling_per_s": None if r["prefilled"] else ceiling["grpc_relay_per_s"],
                "cpu_ms_per_update": {
                    name: round(1000 * seconds / max(r["accepted"], 1), 2)
                    for name, seconds in r["cpu_seconds"].items()
                },
            }
        )
    return rows


def main() -> None:
    """Run everything and write ``throughput.json``."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--quick", action="store_true", help="200 and 50 clients instead of 1,000 and 200"
    )
    args = parser.parse_args()

    results = asyncio.run(run_all(quick=args.quick))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "throughput.json").write_text(json.dumps(results, indent=2) + "\n")
    _print_ratios(results["ratios"])


def _print_ratios(rows: list[dict[str, Any]]) -> None:
    columns = ("model", "clients", "workers", "kind", "upd/s", "ceiling", "share")
    print("\n" + " | ".join(columns))
    for row in rows:
        cells = (
            row["model"],
            row["clients"],
            row["workers"],
            row["kind"],
            row["updates_per_s"],
            row["broker_ceiling_per_s"],
            row["share_of_ceiling"],
        )
        print(" | ".join("-" if c is None else str(c) for c in cells))


if __name__ == "__main__":
    main()

"""Aggregation throughput with its ceilings, all measured in one run.

    python -m benchmarks.throughput [--quick]

* end to end (``benchmarks.load``): 1, 2 and 4 workers for the 26k and 1.2M
  models with 50 clients; 50, 200 and 1,000 clients on the 26k model, 2 workers;
* the raw RabbitMQ publish -> consume rate for messages of the same size on a
  durable quorum queue (persistent messages, publisher confirms, manual acks);
* the in-memory add rate (numpy int64 add of the fixed-point vector) and the
  decode + fixed-point rate of one worker thread;
* Flower's FedAvg ``aggregate`` on the same updates, when ``flwr`` is importable by
  the interpreter in ``$FEDQ_FLWR_PYTHON`` (default ``/tmp/flwr-venv/bin/python``).

Writes ``benchmarks/results/throughput.json`` and prints a table.
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

from benchmarks.load import make_updates, print_row, run_load
from benchmarks.stack import AMQP_URL
from benchmarks.updates import dp_update, model_shapes
from fedq.state.partials import fill_fixed_point
from proto.codec import iter_tensors

RESULTS = Path(__file__).parent / "results"
FLWR_PYTHON = os.environ.get("FEDQ_FLWR_PYTHON", "/tmp/flwr-venv/bin/python")
RAW_QUEUE = "fedq.bench.raw"

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
    connection = await aio_pika.connect_robust(AMQP_URL)
    try:
        publish = await connection.channel(publisher_confirms=True)
        await publish.queue_delete(RAW_QUEUE)
        queue = await publish.declare_queue(
            RAW_QUEUE, durable=True, arguments={"x-queue-type": "quorum"}
        )
        consume = await connection.channel()
        await consume.set_qos(prefetch_count=16)
        body = os.urandom(message_bytes)
        done = asyncio.Event()
        acked = 0

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            nonlocal acked
            await message.ack()
            acked += 1
            if acked == messages:
                done.set()

        await (await consume.get_queue(RAW_QUEUE)).consume(on_message)
        slots = asyncio.Semaphore(in_flight)

        async def one(i: int) -> None:
            async with slots:
                await publish.default_exchange.publish(
                    aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                    routing_key=RAW_QUEUE,
                    mandatory=True,
                )

        started = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(messages)))
        await asyncio.wait_for(done.wait(), timeout=600)
        elapsed = time.perf_counter() - started
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


async def run_all(*, quick: bool) -> dict[str, Any]:
    """Every scenario and ceiling; ``quick`` trims the client counts."""
    client_counts = [50, 200] if quick else [50, 200, 1000]
    scenarios = [(m, 50, w) for m in ("26k", "1.2m") for w in (1, 2, 4)]
    scenarios += [("26k", c, 2) for c in client_counts if c != 50]

    end_to_end = []
    for model, clients, workers in scenarios:
        result = await run_load(clients=clients, model=model, workers=workers)
        print_row(result)
        end_to_end.append(result)

    ceilings = {}
    for model in ("26k", "1.2m"):
        payloads, _ = make_updates(model, 50, codec="q8")
        size = int(np.mean([len(p) for p in payloads]))
        messages = 2000 if model == "26k" else 300
        rate = await raw_broker_rate(size + 200, messages=messages)
        ceilings[model] = {
            "message_bytes": size + 200,
            "rabbitmq_publish_consume_per_s": round(rate, 1),
            **add_rates(model, payloads),
            "flower_fedavg_aggregate": flower_rate(model, 50),
        }
        print(model, json.dumps(ceilings[model]))
    return {"end_to_end": end_to_end, "ceilings": ceilings, "cpus": os.cpu_count()}


def main() -> None:
    """Run everything and write ``throughput.json``."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="skip the 1,000-client run")
    args = parser.parse_args()

    results = asyncio.run(run_all(quick=args.quick))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "throughput.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()

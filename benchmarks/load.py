"""Load generator: N concurrent gRPC clients against gateways, workers, RabbitMQ and Redis.

    python -m benchmarks.load --clients 200 --model 26k --workers 2 [--gateways 1]

Clients do no training: each submits one pre-made DP-noised update (``--codec``,
q8 by default). Gateways and workers are separate ``fedq`` processes; the round
manager runs here. Reports submit latency percentiles, end-to-end updates/s
(first submit to the last accepted update counted in the partial sums), bytes on
the wire per update, refusals by reason, the peak RSS of every service process, and
whether the committed sum equals the expected fixed-point sum (no update lost or
counted twice). Writes ``benchmarks/results/load_<model>_<clients>c_<workers>w.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from benchmarks.stack import cpu_seconds, peak_rss_bytes, rss_bytes, start_bench
from benchmarks.updates import dp_update, model_shapes
from fedq.state.partials import fill_fixed_point
from fedq.tensors import ModelSpec
from proto import fedq_v1_pb2 as pb
from proto import fedq_v1_pb2_grpc as pb_grpc
from proto.codec import encode_tensors, iter_tensors

RESULTS = Path(__file__).parent / "results"
CHUNK_BYTES = 1 << 20
EXAMPLES = 100


def make_updates(model: str, clients: int, *, codec: str) -> tuple[list[bytes], np.ndarray]:
    """Encoded updates, one per client, and their expected fixed-point sum."""
    shapes = model_shapes(model)
    spec = ModelSpec.from_arrays({n: np.zeros(s, np.float32) for n, s in shapes.items()})
    offsets = spec.update_offsets
    payloads, expected = [], np.zeros(spec.update_size, np.int64)
    scratch = np.empty(spec.update_size, np.int64)
    for i in range(clients):
        payload = encode_tensors(dp_update(shapes, seed=i), codec=codec)
        for name, array in iter_tensors(payload, max_bytes=spec.update_nbytes, expected=spec):
            begin = offsets[name]
            fill_fixed_point(scratch[begin : begin + array.size], array.reshape(-1), EXAMPLES)
        expected += scratch
        payloads.append(payload)
    return payloads, expected


def upload_chunks(client_id: str, token: str, payload: bytes, codec: str) -> list[pb.UpdateChunk]:
    header = pb.UpdateHeader(
        client_id=client_id,
        token=token,
        round=1,
        update_id=f"{client_id}-r1",
        num_examples=EXAMPLES,
        codec=codec,
        total_size=len(payload),
    )
    parts = [pb.UpdateChunk(header=header)]
    parts += [
        pb.UpdateChunk(data=payload[i : i + CHUNK_BYTES])
        for i in range(0, len(payload), CHUNK_BYTES)
    ]
    parts.append(
        pb.UpdateChunk(trailer=pb.UpdateTrailer(sha256=hashlib.sha256(payload).hexdigest()))
    )
    return parts


async def submit(stub: Any, chunks: list[pb.UpdateChunk], start: asyncio.Event) -> tuple:
    async def stream():
        for chunk in chunks:
            yield chunk

    await start.wait()
    began = time.perf_counter()
    try:
        reply = await stub.SubmitUpdate(stream(), timeout=300)
        outcome = pb.SubmitReply.Outcome.Name(reply.outcome)
    except grpc.aio.AioRpcError as exc:
        outcome = f"{exc.code().name}: {(exc.details() or '')[:60]}"
    return outcome, time.perf_counter() - began


async def run_load(
    *,
    clients: int,
    model: str,
    workers: int,
    gateways: int = 1,
    codec: str = "q8",
    channels: int = 100,
    batch_updates: int = 8,
    prefill: bool = False,
) -> dict[str, Any]:
    """Run one load scenario and return its measurements.

    With ``prefill`` the workers start only once every update is queued, and the
    result also holds their drain rate: updates counted per second from their first
    commit to their last, which is aggregation alone, without the gateway.
    """
    payloads, expected = make_updates(model, clients, codec=codec)
    initial = {n: np.zeros(s, np.float32) for n, s in model_shapes(model).items()}
    names = [f"lc{i:05d}" for i in range(clients)]
    bench, tokens = await start_bench(initial, clients=names, gateways=gateways)
    if not prefill:
        bench.start_workers(workers, FEDQ_WORKER_BATCH_UPDATES=str(batch_updates))
    peaks: dict[str, int] = {}
    sampler = asyncio.create_task(_sample_rss(bench, peaks))
    open_channels = [
        grpc.aio.insecure_channel(f"127.0.0.1:{bench.ports[i % gateways]}")
        for i in range(min(channels, clients))
    ]
    try:
        await asyncio.sleep(3)  # workers import and connect
        start = asyncio.Event()
        requests = [
            upload_chunks(name, tokens[name], payloads[i], codec) for i, name in enumerate(names)
        ]
        wire_bytes = [sum(c.ByteSize() for c in r) for r in requests]
        tasks = [
            asyncio.create_task(
                submit(pb_grpc.FederationStub(open_channels[i % len(open_channels)]), r, start)
            )
            for i, r in enumerate(requests)
        ]
        cpu_before = _cpu_by_service(bench)
        began = time.perf_counter()
        start.set()
        results = await asyncio.gather(*tasks)
        submitted_s = time.perf_counter() - began
        accepted = sum(1 for outcome, _ in results if outcome == "ACCEPTED")
        if prefill:
            bench.start_workers(workers, FEDQ_WORKER_BATCH_UPDATES=str(batch_updates))
        drain = await _wait_until_counted(bench, accepted)
        committed_s = time.perf_counter() - began
        cpu_after = _cpu_by_service(bench)
        await asyncio.sleep(0.5)
        total = await bench.partials.round_sum(1, size=expected.size)
        for name, process in bench.processes().items():
            peaks[name] = max(peaks.get(name, 0), peak_rss_bytes(process.pid))
    finally:
        sampler.cancel()
        for channel in open_channels:
            await channel.close()
        await bench.close()

    latencies = np.array([s for outcome, s in results if outcome == "ACCEPTED"]) * 1000
    refusals = Counter(outcome for outcome, _ in results if outcome != "ACCEPTED")
    all_accepted = accepted == clients
    return {
        "model": model,
        "parameters": int(expected.size),
        "codec": codec,
        "clients": clients,
        "gateways": gateways,
        "workers": workers,
        "accepted": accepted,
        "refusals": dict(refusals),
        "submit_latency_ms": _percentiles(latencies),
        "submit_phase_s": round(submitted_s, 3),
        "end_to_end_s": round(committed_s, 3),
        "updates_per_s": round(accepted / committed_s, 1),
        "prefilled": prefill,
        "drain_updates_per_s": drain if prefill else None,
        "payload_bytes_per_update": int(np.mean([len(p) for p in payloads])),
        "wire_bytes_per_update": int(np.mean(wire_bytes)),
        "peak_rss_bytes": peaks,
        "cpu_seconds": {
            name: round(cpu_after[name] - cpu_before.get(name, 0.0), 2) for name in cpu_after
        },
        "counted": int(total.count),
        "lost": accepted - int(total.count) if total.count <= accepted else 0,
        "duplicated": int(total.count) - accepted if total.count > accepted else 0,
        "sum_exact": bool(all_accepted and np.array_equal(total.total, expected)),
    }


async def _wait_until_counted(bench: Any, accepted: int) -> float | None:
    """Wait until the partial sums count ``accepted`` updates; return the drain rate.

    The rate runs from the first commit seen to the last, so it leaves out the
    workers' start-up; None when a single commit counted everything.
    """
    first: tuple[float, int] | None = None
    while (counted := await bench.partials.applied_count(1)) < accepted:
        if any(p.poll() is not None for p in bench.workers):
            raise RuntimeError("a worker exited")
        if counted and first is None:
            first = (time.perf_counter(), counted)
        await asyncio.sleep(0.01)
    if first is None or accepted == first[1]:
        return None
    return round((accepted - first[1]) / (time.perf_counter() - first[0]), 1)


def _cpu_by_service(bench: Any) -> dict[str, float]:
    """CPU seconds used so far by every service process and by this load generator."""
    used = {name: cpu_seconds(p.pid) for name, p in bench.processes().items()}
    used["load-generator"] = time.process_time()
    used.update(_broker_and_store_cpu())
    return used


def _broker_and_store_cpu() -> dict[str, float]:
    """CPU seconds of the local RabbitMQ and Redis servers, when they run on this machine."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/comm"):
        try:
            name = stat.read_text().strip()
        except OSError:
            continue
        if name in ("beam.smp", "redis-server"):
            label = "rabbitmq" if name == "beam.smp" else "redis"
            found[label] = found.get(label, 0.0) + cpu_seconds(int(stat.parent.name))
    return found


async def _sample_rss(bench: Any, peaks: dict[str, int]) -> None:
    while True:
        for name, process in bench.processes().items():
            peaks[name] = max(peaks.get(name, 0), rss_bytes(process.pid))
        await asyncio.sleep(0.2)


def _percentiles(values: np.ndarray) -> dict[str, float]:
    if not values.size:
        return {}
    p50, p95, p99 = np.percentile(values, [50, 95, 99])
    return {"p50": round(p50, 1), "p95": round(p95, 1), "p99": round(p99, 1)}


def print_row(r: dict[str, Any]) -> None:
    """One line of the results table."""
    lat = r["submit_latency_ms"]
    peak = max(r["peak_rss_bytes"].values(), default=0) / 2**20
    print(
        f"{r['model']:>5} {r['clients']:>5}c {r['workers']}w {r['gateways']}g"
        f"  {r['updates_per_s']:>7} upd/s  p50 {lat.get('p50')} p95 {lat.get('p95')}"
        f" p99 {lat.get('p99')} ms  wire {r['wire_bytes_per_update']} B"
        f"  refused {sum(r['refusals'].values())}  max RSS {peak:.0f} MiB"
        f"  lost {r['lost']} dup {r['duplicated']} exact {r['sum_exact']}"
        + (f"  drain {r['drain_updates_per_s']} upd/s" if r.get("prefilled") else "")
    )


def main() -> None:
    """Run one scenario from the command line."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--model", default="26k")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--gateways", type=int, default=1)
    parser.add_argument("--codec", default="q8")
    parser.add_argument("--channels", type=int, default=100)
    parser.add_argument("--batch-updates", type=int, default=8, help="worker batch size")
    parser.add_argument(
        "--prefill", action="store_true", help="start workers once every update is queued"
    )
    args = parser.parse_args()

    result = asyncio.run(
        run_load(
            clients=args.clients,
            model=args.model,
            workers=args.workers,
            gateways=args.gateways,
            codec=args.codec,
            channels=args.channels,
            batch_updates=args.batch_updates,
            prefill=args.prefill,
        )
    )
    RESULTS.mkdir(exist_ok=True)
    drained = "_prefill" if args.prefill else ""
    name = f"load_{args.model}_{args.clients}c_{args.workers}w{drained}.json"
    (RESULTS / name).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print_row(result)


if __name__ == "__main__":
    main()

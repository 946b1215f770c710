"""Peak memory of a gateway and a worker process for one 100M-parameter update.

    python -m benchmarks.large_update_memory [--parameters 100e6] [--codecs q8 blosc2]

For each codec: a fresh ``fedq gateway`` and ``fedq worker`` process, their idle RSS
once the worker consumes the queue, one DP-noised update submitted over gRPC, and
the peak RSS (``VmHWM``) of both processes once the worker has committed it. Checks
the committed fixed-point sum against the one computed here. Writes
``benchmarks/results/large_update_memory.json``.

What is expected above idle: the gateway holds the payload and, while it checks the
update slice by slice, one copy of the largest compressed tensor (blosc2 reads part
of a frame only from a copy of it), so about twice the payload; the worker holds the
int64 running sum (8 bytes a parameter), the same twice the payload, and the 16 MiB
messages and sum pieces it reads and writes.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import numpy as np

from benchmarks.stack import AMQP_URL, peak_rss_bytes, rss_bytes, start_bench
from benchmarks.updates import dp_update
from fedq.queue.amqp import AmqpQueue
from fedq.state.partials import fill_fixed_point
from proto import fedq_v1_pb2 as pb
from proto import fedq_v1_pb2_grpc as pb_grpc
from proto.codec import encode_tensors, iter_slices

RESULTS = Path(__file__).parent / "results"
CHUNK_BYTES = 1 << 20
IDLE_SETTLE_S = 2.0


async def run_one(parameters: int, codec: str) -> dict[str, object]:
    """Submit one update through separate gateway and worker processes."""
    initial = {"weight": np.zeros(parameters, np.float32)}
    update = dp_update({"weight": (parameters,)}, seed=3)
    payload = encode_tensors(update, codec=codec)
    del update
    bench, tokens = await start_bench(initial, clients=["big"])
    try:
        bench.start_workers(1, FEDQ_WORKER_BATCH_UPDATES="1")
        await _wait_for_consumer()
        await asyncio.sleep(IDLE_SETTLE_S)
        gateway_idle = rss_bytes(bench.gateways[0].pid)
        worker_idle = rss_bytes(bench.workers[0].pid)

        started = time.monotonic()
        reply = await _submit(bench.ports[0], tokens["big"], payload, codec=codec)
        accepted_s = time.monotonic() - started
        while not await bench.partials.applied_ids(1):
            if bench.workers[0].poll() is not None:
                raise RuntimeError("the worker exited")
            await asyncio.sleep(0.2)
        committed_s = time.monotonic() - started
        peaks = {name: peak_rss_bytes(p.pid) for name, p in bench.processes().items()}
        exact = await _check_sum(bench, payload, parameters)
    finally:
        await bench.close()

    return {
        "parameters": parameters,
        "codec": codec,
        "payload_bytes": len(payload),
        "outcome": pb.SubmitReply.Outcome.Name(reply.outcome),
        "accepted_s": round(accepted_s, 2),
        "committed_s": round(committed_s, 2),
        "gateway_idle_rss_bytes": gateway_idle,
        "gateway_peak_rss_bytes": peaks["gateway-0"],
        "worker_idle_rss_bytes": worker_idle,
        "worker_peak_rss_bytes": peaks["worker-0"],
        "gateway_over_idle_payloads": round((peaks["gateway-0"] - gateway_idle) / len(payload), 2),
        "worker_over_idle_and_sum_payloads": round(
            (peaks["worker-0"] - worker_idle - 8 * parameters) / len(payload), 2
        ),
        "sum_exact": exact,
    }


async def _submit(port: int, token: str, payload: bytes, *, codec: str) -> pb.SubmitReply:
    header = pb.UpdateHeader(
        client_id="big",
        token=token,
        round=1,
        update_id="big-r1",
        num_examples=100,
        codec=codec,
        total_size=len(payload),
    )
    digest = hashlib.sha256(payload).hexdigest()

    async def chunks() -> AsyncIterator[pb.UpdateChunk]:
        yield pb.UpdateChunk(header=header)
        view = memoryview(payload)
        for start in range(0, len(payload), CHUNK_BYTES):
            yield pb.UpdateChunk(data=bytes(view[start : start + CHUNK_BYTES]))
        yield pb.UpdateChunk(trailer=pb.UpdateTrailer(sha256=digest))

    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        return await pb_grpc.FederationStub(channel).SubmitUpdate(chunks(), timeout=600)


async def _wait_for_consumer(*, timeout_s: float = 120) -> None:
    """Wait until a worker consumes the update queue (it has imported and connected)."""
    queue = await AmqpQueue.connect(AMQP_URL)
    try:
        deadline = time.monotonic() + timeout_s
        while (await queue.stats()).consumers < 1:
            if time.monotonic() > deadline:
                raise RuntimeError(f"no worker consumed the queue within {timeout_s}s")
            await asyncio.sleep(0.2)
    finally:
        await queue.close()


async def _check_sum(bench, payload: bytes, parameters: int) -> bool:
    total = await bench.partials.round_sum(1, size=parameters)
    expected = np.empty(parameters, np.int64)
    for _, offset, values in iter_slices(payload, max_bytes=parameters * 4):
        fill_fixed_point(expected[offset : offset + values.size], values, 100)
    return bool(total.count == 1 and np.array_equal(total.total, expected))


def main() -> None:
    """Run each codec and write the peaks."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--parameters", type=float, default=100e6)
    parser.add_argument("--codecs", nargs="+", default=["q8", "blosc2"])
    args = parser.parse_args()

    rows = [asyncio.run(run_one(int(args.parameters), codec)) for codec in args.codecs]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "large_update_memory.json").write_text(json.dumps(rows, indent=2) + "\n")
    for r in rows:
        print(
            f"{r['parameters']:,} params {r['codec']:>6}: payload {r['payload_bytes'] / 2**20:.0f}"
            f" MiB, gateway peak {r['gateway_peak_rss_bytes'] / 2**20:.0f} MiB"
            f" (idle {r['gateway_idle_rss_bytes'] / 2**20:.0f}),"
            f" worker peak {r['worker_peak_rss_bytes'] / 2**20:.0f} MiB"
            f" (idle {r['worker_idle_rss_bytes'] / 2**20:.0f}),"
            f" accepted {r['accepted_s']}s, committed {r['committed_s']}s, exact {r['sum_exact']}"
        )


if __name__ == "__main__":
    main()

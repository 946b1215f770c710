"""Lossless blosc2 against q8 on DP-noised float32 updates: size and speed.

    python -m benchmarks.codecs [--repeat 5]

Per codec: encoded size, encode and decode time, and what the gateway spends on the
payload of each update: its check against the model (``check_update``) and the
SHA-256 it compares with the upload's trailer. Times are the best of the repeats.

Writes ``benchmarks/results/codecs.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path

import numpy as np

from benchmarks.updates import dp_update, model_shapes
from fedq.tensors import ModelSpec
from proto.codec import CODECS, check_update, decode_tensors, encode_tensors

RESULTS = Path(__file__).parent / "results"


def measure(model: str, *, repeat: int) -> list[dict[str, object]]:
    """Encoded size, encode and decode time of each codec for one model's update."""
    update = dp_update(model_shapes(model), seed=1)
    spec = ModelSpec.from_arrays(update)
    raw_bytes = sum(a.nbytes for a in update.values())
    rows = []
    for codec in CODECS:
        rng = np.random.default_rng(0)
        encode_s, decode_s, check_s, sha256_s, payload = [], [], [], [], b""
        for _ in range(repeat):
            started = time.perf_counter()
            payload = encode_tensors(update, codec=codec, rng=rng)
            encode_s.append(time.perf_counter() - started)
            started = time.perf_counter()
            decoded = decode_tensors(payload, max_bytes=raw_bytes)
            decode_s.append(time.perf_counter() - started)
            started = time.perf_counter()
            check_update(payload, spec, max_abs_value=1e3)
            check_s.append(time.perf_counter() - started)
            started = time.perf_counter()
            hashlib.sha256(payload).hexdigest()
            sha256_s.append(time.perf_counter() - started)
        error = max(float(np.abs(decoded[k] - update[k]).max()) for k in update)
        spread = float(np.std(np.concatenate([a.ravel() for a in update.values()])))
        rows.append(
            {
                "model": model,
                "parameters": raw_bytes // 4,
                "codec": codec,
                "bytes": len(payload),
                "ratio_vs_float32": round(raw_bytes / len(payload), 3),
                "encode_ms": round(1000 * min(encode_s), 2),
                "decode_ms": round(1000 * min(decode_s), 2),
                "gateway_check_ms": round(1000 * min(check_s), 2),
                "sha256_ms": round(1000 * min(sha256_s), 2),
                "encode_mb_s": round(raw_bytes / min(encode_s) / 1e6, 1),
                "decode_mb_s": round(raw_bytes / min(decode_s) / 1e6, 1),
                "max_abs_error": error,
                "update_std": spread,
            }
        )
    return rows


def main() -> None:
    """Measure every codec on the 26k and 1.2M models and write the results."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--models", nargs="+", default=["26k", "1.2m"])
    args = parser.parse_args()

    rows = [row for model in args.models for row in measure(model, repeat=args.repeat)]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "codecs.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(
        f"{'model':>6} {'codec':>6} {'bytes':>10} {'ratio':>6} {'enc ms':>8} {'dec ms':>8}"
        f" {'check ms':>8} {'sha ms':>7}"
    )
    for r in rows:
        print(
            f"{r['model']:>6} {r['codec']:>6} {r['bytes']:>10} {r['ratio_vs_float32']:>6}"
            f" {r['encode_ms']:>8} {r['decode_ms']:>8} {r['gateway_check_ms']:>8}"
            f" {r['sha256_ms']:>7}  max|err| {r['max_abs_error']:.2e}"
            f" (update std {r['update_std']:.2e})"
        )


if __name__ == "__main__":
    main()

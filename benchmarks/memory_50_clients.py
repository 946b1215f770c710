"""Total RSS of ``fedq run --clients 50`` (DP-SGD) and every process it starts.

    python -m benchmarks.memory_50_clients [-- extra fedq run flags]

Samples the resident memory of the whole process tree every 0.2 s and writes the
peak of the sum, and each process's own peak, to
``benchmarks/results/memory_50_clients.json``. The bound to meet is 4 GiB.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.stack import REPO_ROOT, rss_bytes

RESULTS = Path(__file__).parent / "results"
LIMIT_BYTES = 4 << 30


def tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(children.get(current, []))
    return found


def main() -> None:
    """Run the federation, sample its memory, write the result."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data-dir", default=str(REPO_ROOT.parent / "shared" / "data"))
    parser.add_argument("extra", nargs="*", help="more flags for fedq run (after --)")
    args = parser.parse_args()

    command = [
        sys.executable, "-m", "fedq.cli", "run", "--clients", "50", "--dp-mode", "sample",
        "--data-dir", args.data_dir, *args.extra,
    ]  # fmt: skip
    started = time.monotonic()
    process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True)
    peak_total, peaks = 0, {}
    while process.poll() is None:
        pids = tree(process.pid)
        sizes = {pid: rss_bytes(pid) for pid in pids}
        peak_total = max(peak_total, sum(sizes.values()))
        for pid, size in sizes.items():
            peaks[pid] = max(peaks.get(pid, 0), size)
        time.sleep(0.2)
    output = process.stdout.read() if process.stdout else ""

    result = {
        # The benchmark's own command line: the data folder's path is this machine's.
        "command": shlex.join(["python", "-m", "benchmarks.memory_50_clients", *sys.argv[1:]]),
        "exit_code": process.returncode,
        "seconds": round(time.monotonic() - started, 1),
        "processes": len(peaks),
        "peak_total_rss_bytes": peak_total,
        "peak_rss_by_process": {str(k): v for k, v in peaks.items()},
        "limit_bytes": LIMIT_BYTES,
        "within_limit": process.returncode == 0 and peak_total <= LIMIT_BYTES,
        "output_tail": output.splitlines()[-8:],
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "memory_50_clients.json").write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"peak total RSS {peak_total / 2**30:.2f} GiB over {len(peaks)} processes "
        f"(limit 4 GiB: {'ok' if result['within_limit'] else 'EXCEEDED'}),"
        f" exit {process.returncode}"
    )


if __name__ == "__main__":
    main()

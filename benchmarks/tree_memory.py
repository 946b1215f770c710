"""Memory of a process tree and of the machine, sampled while a benchmark runs.

Three figures, because none of them alone is the memory the tree needs:

- the sum of every process's RSS (``VmRSS``), every ``every_s`` seconds: it counts a
  page shared by several processes (the libraries that forked clients share with
  their fork server) once per process, so it overstates the total;
- an estimate of the sum of PSS (``smaps_rollup``, which divides each shared page
  among its sharers): every ``pss_every`` samples, the PSS of every process but the
  clients, plus the number of clients times the PSS of one of them (a different one
  each time). Reading PSS costs about 10 ms per process, too much to read all 50
  clients' while they are timed;
- the machine's ``MemAvailable``: its lowest value, and the drop from the value before
  the run, which other jobs on the machine move too.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from benchmarks.memory_50_clients import tree
from benchmarks.stack import proc_field_kib, rss_bytes

__all__ = ["MemoryPeaks", "available_bytes", "pss_estimate_bytes", "sample_memory"]


@dataclass
class MemoryPeaks:
    """What ``sample_memory`` has seen so far."""

    available_before_bytes: int
    peak_tree_rss_bytes: int = 0
    processes_at_peak: int = 0
    available_now_bytes: int = 0
    min_available_bytes: int = 0
    peak_tree_pss_estimate_bytes: int = 0
    samples: int = 0
    pss_samples: int = 0

    def record(self, *, tree_rss: int, processes: int, available: int) -> None:
        """Fold one sample in."""
        if tree_rss > self.peak_tree_rss_bytes:
            self.peak_tree_rss_bytes, self.processes_at_peak = tree_rss, processes
        self.available_now_bytes = available
        if not self.samples or available < self.min_available_bytes:
            self.min_available_bytes = available
        self.samples += 1

    def record_pss(self, estimate: int) -> None:
        """Fold one PSS estimate in."""
        self.peak_tree_pss_estimate_bytes = max(self.peak_tree_pss_estimate_bytes, estimate)
        self.pss_samples += 1

    def to_dict(self) -> dict[str, int]:
        """JSON-friendly view, with the drop of MemAvailable during the run."""
        return {
            "peak_tree_rss_bytes": self.peak_tree_rss_bytes,
            "processes_at_peak": self.processes_at_peak,
            "peak_tree_pss_estimate_bytes": self.peak_tree_pss_estimate_bytes,
            "available_before_bytes": self.available_before_bytes,
            "min_available_bytes": self.min_available_bytes,
            "peak_available_drop_bytes": self.available_before_bytes - self.min_available_bytes,
            "samples": self.samples,
            "pss_samples": self.pss_samples,
        }


async def sample_memory(
    peaks: MemoryPeaks,
    *,
    root: int,
    clients: Callable[[], Sequence[int]],
    every_s: float = 1.0,
    pss_every: int = 10,
) -> None:
    """Sample the tree under ``root`` and the machine into ``peaks`` until cancelled.

    ``clients()`` gives the pids of the client processes, whose PSS is estimated from one.
    """
    turn = 0
    while True:
        pids = tree(root)
        peaks.record(
            tree_rss=sum(rss_bytes(pid) for pid in pids),
            processes=len(pids),
            available=available_bytes(),
        )
        if turn % pss_every == 0:
            estimate = await asyncio.to_thread(
                pss_estimate_bytes, pids, clients(), turn=turn // pss_every
            )
            peaks.record_pss(estimate)
        turn += 1
        await asyncio.sleep(every_s)


def pss_estimate_bytes(
    pids: Sequence[int],
    client_pids: Sequence[int],
    *,
    turn: int,
    pss_of: Callable[[int], int] | None = None,
) -> int:
    """PSS of ``pids``, the clients among them counted as ``turn``'s client times their number."""
    pss_of = pss_of or _pss_bytes
    present = set(pids)
    clients = [p for p in client_pids if p in present]
    total = sum(pss_of(p) for p in present.difference(clients))
    if clients:
        total += len(clients) * pss_of(clients[turn % len(clients)])
    return total


def available_bytes() -> int:
    """The machine's ``MemAvailable``."""
    return proc_field_kib(Path("/proc/meminfo"), "MemAvailable") * 1024


def _pss_bytes(pid: int) -> int:
    return proc_field_kib(Path(f"/proc/{pid}/smaps_rollup"), "Pss") * 1024

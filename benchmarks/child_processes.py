"""Child processes of a benchmark that do not outlive it.

Two ways to start one:

- ``spawn``: a new program (``subprocess.Popen``), such as ``python -m fedq.cli worker``;
- ``fork``: a function run in a process forked from multiprocessing's fork server,
  which imported the ``preload`` modules once, so that many such children share one
  copy of the libraries' memory instead of each importing them.

Every child writes its stdout and stderr to ``<log_dir>/<name>.log`` and ends when
the benchmark's process does, however it ends: a spawned child asks Linux for SIGTERM
when its parent dies (``PR_SET_PDEATHSIG``); a forked child, whose parent is the fork
server (which stays up while any of its children holds the fd multiprocessing hands
them), has a thread wait on a pidfd of the benchmark's process and send it SIGTERM.
``close``, also reached by leaving the ``with`` block through an exception or Ctrl-C,
stops every child still running: SIGTERM, then SIGKILL after ``grace_s``.
"""

from __future__ import annotations

import ctypes
import importlib
import logging
import multiprocessing
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any

__all__ = ["ChildProcesses", "die_with_parent"]

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
try:
    # Resolved here, not in the child: between fork and exec only the call may run.
    _PRCTL: Any = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):  # pragma: no cover - not Linux
    _PRCTL = None


def die_with_parent() -> None:
    """Have this process sent SIGTERM when its parent exits (Linux; elsewhere nothing)."""
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, signal.SIGTERM)


class ChildProcesses:
    """Named child processes with their logs, stopped together by ``close``."""

    def __init__(self, log_dir: Path, *, preload: Sequence[str] = ()) -> None:
        self.log_dir = log_dir
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._spawned: dict[str, subprocess.Popen[bytes]] = {}
        self._forked: dict[str, Any] = {}
        self._logs: list[IO[bytes]] = []
        self._context = multiprocessing.get_context("forkserver")
        self._context.set_forkserver_preload([*_main_module(), *preload])

    def __enter__(self) -> ChildProcesses:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def spawn(self, name: str, argv: Sequence[str], *, env: dict[str, str]) -> int:
        """Start the program ``argv`` as ``name``; returns its pid."""
        output = open(self.log_path(name), "wb")  # closed by close()
        self._logs.append(output)
        process = subprocess.Popen(
            list(argv),
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            preexec_fn=die_with_parent,  # only a prctl call, resolved before the fork
        )
        self._spawned[name] = process
        return process.pid

    def fork(self, name: str, target: str, *args: Any) -> int:
        """Run ``target(*args)`` as ``name`` in a process forked from the fork server.

        ``target`` is ``"module:function"``, imported in the child (the fork server has
        it already when its module is preloaded), so that the benchmark need not import it.
        """
        process = self._context.Process(
            target=_run_forked,
            args=(str(self.log_path(name)), os.getpid(), target, *args),
            name=name,
        )
        process.daemon = True  # multiprocessing also stops it when the benchmark exits
        process.start()
        self._forked[name] = process
        return int(process.pid)

    def log_path(self, name: str) -> Path:
        """Where the child ``name`` writes its output."""
        return self.log_dir / f"{name}.log"

    def log_tail(self, name: str, *, lines: int = 15) -> str:
        """The last lines of a child's output."""
        try:
            text = self.log_path(name).read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def exited(self) -> dict[str, int]:
        """Exit status of every child that has ended, by name (negative: killed by a signal)."""
        codes: dict[str, int | None] = {n: p.poll() for n, p in self._spawned.items()}
        codes.update({n: p.exitcode for n, p in self._forked.items()})
        return {name: code for name, code in codes.items() if code is not None}

    def pids(self, prefix: str = "") -> list[int]:
        """Pids of the children still running whose names start with ``prefix``."""
        ended = self.exited()
        named = {n: p.pid for n, p in self._spawned.items()}
        named.update({n: p.pid for n, p in self._forked.items()})
        return [pid for name, pid in named.items() if name.startswith(prefix) and name not in ended]

    def running(self) -> int:
        """How many children are still running."""
        return len(self._spawned) + len(self._forked) - len(self.exited())

    def close(self, *, grace_s: float = 10.0) -> None:
        """Stop every child still running (SIGTERM, then SIGKILL); calling it again is harmless."""
        alive = [p for p in self._spawned.values() if p.poll() is None]
        alive += [p for p in self._forked.values() if p.exitcode is None]
        for process in alive:
            process.terminate()

        deadline = time.monotonic() + grace_s
        killed = 0
        for process in alive:
            if not _wait(process, timeout_s=max(0.0, deadline - time.monotonic())):
                process.kill()
                _wait(process, timeout_s=5.0)
                killed += 1

        for output in self._logs:
            output.close()
        self._logs.clear()
        if alive:
            log.info("stopped %d child processes (%d killed)", len(alive), killed)


def _wait(process: Any, *, timeout_s: float) -> bool:
    """Wait for a Popen or multiprocessing child; True when it has ended."""
    if isinstance(process, subprocess.Popen):
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            return False
        return True
    process.join(timeout_s)
    return process.exitcode is not None


def _main_module() -> list[str]:
    """The main module, by name when it has one.

    multiprocessing imports it again in every forked child; preloaded in the fork
    server, that costs each child nothing.
    """
    spec = getattr(sys.modules["__main__"], "__spec__", None)
    if spec is None or spec.name == "__main__" or spec.name.endswith(".__main__"):
        return []  # not imported again by name (a script is, by path: keep its main guarded)
    return [spec.name]


def _run_forked(log_path: str, benchmark_pid: int, target: str, *args: Any) -> None:
    _end_with(benchmark_pid)
    output = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(output, 1)
    os.dup2(output, 2)
    os.close(output)

    module_name, function_name = target.split(":")
    function = getattr(importlib.import_module(module_name), function_name)
    sys.exit(function(*args))


def _end_with(pid: int) -> None:
    """Send this process SIGTERM when process ``pid`` ends (a thread waits on its pidfd)."""
    try:
        watched = os.pidfd_open(pid)
    except ProcessLookupError:
        os.kill(os.getpid(), signal.SIGTERM)  # it has ended already
        return

    def wait() -> None:
        select.select([watched], [], [])
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=wait, name=f"end-with-{pid}", daemon=True).start()

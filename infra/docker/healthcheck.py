"""Container health check for the fedq image (stdlib only, so it starts fast).

It finds which service the container runs from the ``fedq`` process's arguments:

* coordinator: ``GET /healthz`` on ``FEDQ_API_PORT`` answers 200;
* gateway: the gRPC port ``FEDQ_GRPC_PORT`` accepts a TCP connection;
* worker and anything else: the ``fedq`` process is alive.

Exit status 0 means healthy, 1 unhealthy, as Docker's HEALTHCHECK expects.
"""

from __future__ import annotations

import os
import socket
import sys
import urllib.error
import urllib.request
from pathlib import Path

SERVICES = ("coordinator", "gateway", "worker", "run")
TIMEOUT_S = 3.0


def main() -> int:
    """Check the service this container runs and return the exit status."""
    service = _running_service()
    if service is None:
        print("unhealthy: no fedq process", file=sys.stderr)
        return 1

    # The ports default to the services' own defaults (coordinator/settings.py).
    if service == "coordinator":
        port = int(os.environ.get("FEDQ_API_PORT") or 8080)
        return _http_ok(f"http://127.0.0.1:{port}/healthz")
    if service == "gateway":
        port = int(os.environ.get("FEDQ_GRPC_PORT") or 50051)
        return _tcp_open("127.0.0.1", port)
    return 0


def _running_service() -> str | None:
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            argv = cmdline.read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue  # the process ended while we looked
        for i, arg in enumerate(argv[:-1]):
            if Path(arg).name == "fedq":
                return next((a for a in argv[i + 1 :] if a in SERVICES), "other")
    return None


def _http_ok(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as answer:  # noqa: S310 - fixed URL
            return 0 if answer.status == 200 else 1
    except (urllib.error.URLError, OSError) as exc:
        print(f"unhealthy: {url}: {exc}", file=sys.stderr)
        return 1


def _tcp_open(host: str, port: int) -> int:
    try:
        with socket.create_connection((host, port), timeout=TIMEOUT_S):
            return 0
    except OSError as exc:
        print(f"unhealthy: {host}:{port}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())

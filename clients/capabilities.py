"""What a client tells the coordinator about itself when it joins.

- ``samples_per_second``: a short probe of the federation's actual model on the
  client's own data (a few timed forward and backward passes after one warm-up pass).
  It times plain SGD steps; DP-SGD's per-sample gradients make real steps slower, which
  the coordinator's safety factor has to cover.
- ``memory_bytes``: memory available now (psutil when installed, else ``os.sysconf``).
- ``upload_bytes_per_second``: configured, or measured from the client's last upload
  (payload bytes over the time the upload call took, gateway checks included, so it
  errs low).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from fedq.models import build_model
from proto import fedq_v1_pb2 as pb
from proto.codec import CODECS

__all__ = ["UploadMeter", "available_memory_bytes", "measure", "probe_samples_per_second"]

log = logging.getLogger(__name__)

PROBE_BATCH = 32
PROBE_BATCHES = 3


@dataclass
class UploadMeter:
    """Upload bandwidth: the configured value, else the last measured upload."""

    configured_bytes_per_second: float = 0.0
    measured_bytes_per_second: float = 0.0

    def record(self, nbytes: int, seconds: float) -> None:
        """Note one upload of ``nbytes`` that took ``seconds``."""
        if nbytes > 0 and seconds > 0:
            self.measured_bytes_per_second = nbytes / seconds

    @property
    def bytes_per_second(self) -> float:
        """Best estimate; 0 when unknown."""
        return self.configured_bytes_per_second or self.measured_bytes_per_second


def probe_samples_per_second(
    model_name: str,
    data: TensorDataset,
    *,
    batch_size: int = PROBE_BATCH,
    batches: int = PROBE_BATCHES,
) -> float:
    """Training throughput of ``model_name`` on ``data`` in samples per second.

    Synchronous and CPU-bound: call it from an executor, not the event loop.
    """
    if len(data) == 0:
        raise ValueError("cannot probe the training speed on an empty data set")
    batch_size = min(batch_size, len(data))
    model = build_model(model_name)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    inputs, labels = data[torch.arange(batch_size)]

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(inputs), labels).backward()
        optimizer.step()

    step()  # warm-up: allocations and lazy initialisation are not training speed
    started = time.perf_counter()
    for _ in range(batches):
        step()
    seconds = max(time.perf_counter() - started, 1e-9)
    return batch_size * batches / seconds


def available_memory_bytes() -> int:
    """Memory available to this process now, in bytes (0 if the platform cannot say)."""
    try:
        import psutil
    except ImportError:
        psutil = None
    if psutil is not None:
        return int(psutil.virtual_memory().available)
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 0


def measure(
    model_name: str,
    data: TensorDataset,
    *,
    upload: UploadMeter | None = None,
    slowdown: float = 1.0,
) -> pb.Capabilities:
    """Probe this client and describe it for ``JoinRequest.capabilities``.

    ``slowdown`` divides the measured speed: a simulated client that trains ``slowdown``
    times slower than this machine reports the speed it will really show.
    """
    speed = probe_samples_per_second(model_name, data) / max(slowdown, 1e-9)
    capabilities = pb.Capabilities(
        samples_per_second=speed,
        memory_bytes=available_memory_bytes(),
        upload_bytes_per_second=upload.bytes_per_second if upload else 0.0,
        codecs=list(CODECS),
    )
    log.debug("probed %s: %.0f samples/s", model_name, speed)
    return capabilities

"""Settings of an aggregator worker."""

from __future__ import annotations

from dataclasses import dataclass

from fedq.config import EnvReader, SettingsError

__all__ = ["WorkerSettings"]


@dataclass(frozen=True)
class WorkerSettings:
    """How a worker batches: flush by count, bytes or time, whichever comes first.

    A batch is also flushed once no delivery came for ``flush_idle_s``: the queue has
    run dry, so waiting for ``flush_s`` would only delay the acks.
    """

    batch_updates: int = 8
    batch_bytes: int = 64 << 20
    flush_s: float = 0.5
    flush_idle_s: float = 0.02
    max_abs_value: float = 1e3
    metrics_port: int = 0

    def __post_init__(self) -> None:
        if self.batch_updates < 1:
            raise SettingsError(f"FEDQ_WORKER_BATCH_UPDATES={self.batch_updates}: expected >= 1")
        if self.flush_s <= 0:
            raise SettingsError(f"FEDQ_WORKER_FLUSH_S={self.flush_s}: expected > 0")
        if self.flush_idle_s <= 0:
            raise SettingsError(f"FEDQ_WORKER_FLUSH_IDLE_S={self.flush_idle_s}: expected > 0")

    @property
    def prefetch(self) -> int:
        """Unacknowledged deliveries allowed: one batch plus the next one filling."""
        return self.batch_updates * 2

    @classmethod
    def from_env(cls, env: EnvReader | None = None) -> WorkerSettings:
        """Read ``FEDQ_WORKER_*``."""
        env = env or EnvReader()
        return cls(
            batch_updates=env.int("WORKER_BATCH_UPDATES", 8, minimum=1),
            batch_bytes=env.int("WORKER_BATCH_BYTES", 64 << 20, minimum=1024),
            flush_s=env.float("WORKER_FLUSH_S", 0.5, minimum=0.001),
            flush_idle_s=env.float("WORKER_FLUSH_IDLE_S", 0.02, minimum=0.001),
            max_abs_value=env.float("MAX_ABS_VALUE", 1e3, minimum=1e-6),
            metrics_port=env.int("METRICS_PORT", 9100, minimum=0),
        )

"""Log setup for the entry points: readable lines by default, JSON on request."""

from __future__ import annotations

import json
import logging
import sys
import time

__all__ = ["setup_logging"]

_CONTEXT_FIELDS = ("round", "client_id", "update_id", "worker", "reason")


class JsonFormatter(logging.Formatter):
    """One JSON object per line, with round and client ids from ``extra=``."""

    def format(self, record: logging.LogRecord) -> str:
        """Render a record as JSON."""
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for field in _CONTEXT_FIELDS:
            if hasattr(record, field):
                entry[field] = getattr(record, field)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def setup_logging(*, level: str = "INFO", fmt: str = "text") -> None:
    """Configure the root logger once, for an entry point."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%H:%M:%S")
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("aio_pika", "aiormq", "hypercorn", "quart", "opacus", "asyncio"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))

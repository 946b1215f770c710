"""The services every request handler reads, attached to the Quart app."""

from __future__ import annotations

from dataclasses import dataclass

from quart import Quart, current_app

from coordinator.privacy import PrivacyLedger
from coordinator.settings import CoordinatorSettings
from fedq.queue.base import UpdateQueue
from fedq.state import RoundStore

__all__ = ["ApiContext", "api_context"]

_EXTENSION = "fedq"


@dataclass(frozen=True)
class ApiContext:
    """Round store, privacy ledger, update queue and settings of one API instance."""

    store: RoundStore
    ledger: PrivacyLedger
    queue: UpdateQueue
    settings: CoordinatorSettings

    def attach(self, app: Quart) -> None:
        """Make this context what ``api_context()`` returns inside ``app``."""
        app.extensions[_EXTENSION] = self


def api_context() -> ApiContext:
    """The context of the app handling the current request."""
    return current_app.extensions[_EXTENSION]

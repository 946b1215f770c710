"""The coordinator's REST API and dashboard."""

from coordinator.api.app import create_app
from coordinator.api.server import ApiServer

__all__ = ["ApiServer", "create_app"]

"""fedq: federated learning with differential privacy enforced by the server."""

__version__ = "0.1.0"

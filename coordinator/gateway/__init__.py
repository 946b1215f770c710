"""The gRPC gateway: checks uploads and queues them once the broker confirmed."""

from coordinator.gateway.server import GatewayServer

__all__ = ["GatewayServer"]

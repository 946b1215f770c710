"""The wire contract: generated gRPC stubs and the update codec."""

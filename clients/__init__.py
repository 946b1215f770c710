"""Client side: local training on private data."""

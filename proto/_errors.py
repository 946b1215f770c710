"""The one error the codec raises, shared by its modules."""

from __future__ import annotations

__all__ = ["CodecError"]


class CodecError(ValueError):
    """An encoded payload is malformed, oversized or does not match the model."""

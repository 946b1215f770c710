"""Model specs and conversions between state dicts, named arrays and flat vectors.

A *spec* is the ordered list of (name, shape, dtype) of a model's state dict. The
gateway checks every update against it, and workers flatten updates in its order,
so every process agrees on where each parameter lives in a partial sum.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from types import MappingProxyType

import numpy as np

__all__ = ["TensorSpec", "ModelSpec", "FLOAT_DTYPES"]

FLOAT_DTYPES = frozenset({"float16", "float32", "float64"})


@dataclass(frozen=True)
class TensorSpec:
    """Name, shape and dtype of one entry of a model's state dict."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    @cached_property
    def size(self) -> int:
        """Number of elements."""
        return int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1

    @cached_property
    def nbytes(self) -> int:
        """Bytes of the uncompressed tensor."""
        return self.size * np.dtype(self.dtype).itemsize

    @property
    def trainable(self) -> bool:
        """Whether updates carry this tensor (floating point entries only)."""
        return self.dtype in FLOAT_DTYPES


@dataclass(frozen=True)
class ModelSpec:
    """Ordered tensor specs of a model; the unit of agreement between processes.

    Sizes are computed once per spec: the gateway and workers ask for them on every
    update.
    """

    tensors: tuple[TensorSpec, ...]

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> ModelSpec:
        """Build the spec of named arrays, in their iteration order."""
        return cls(
            tuple(
                TensorSpec(name, tuple(int(d) for d in a.shape), str(a.dtype))
                for name, a in arrays.items()
            )
        )

    @classmethod
    def from_records(cls, records: list[list[object]]) -> ModelSpec:
        """Rebuild a spec from ``to_records`` output (msgpack/JSON friendly)."""
        return cls(
            tuple(
                TensorSpec(str(name), tuple(int(d) for d in shape), str(dtype))  # type: ignore[attr-defined]
                for name, shape, dtype in records
            )
        )

    def to_records(self) -> list[list[object]]:
        """Plain lists for storage: ``[[name, shape, dtype], ...]``."""
        return [[t.name, list(t.shape), t.dtype] for t in self.tensors]

    @cached_property
    def trainable(self) -> tuple[TensorSpec, ...]:
        """The tensors an update carries."""
        return tuple(t for t in self.tensors if t.trainable)

    @cached_property
    def trainable_by_name(self) -> Mapping[str, TensorSpec]:
        """The tensors an update carries, by name (read-only: it is shared)."""
        return MappingProxyType({t.name: t for t in self.trainable})

    @cached_property
    def update_offsets(self) -> Mapping[str, int]:
        """Where each trainable tensor starts in a flattened update (read-only: it is shared)."""
        offsets, start = {}, 0
        for t in self.trainable:
            offsets[t.name], start = start, start + t.size
        return MappingProxyType(offsets)

    @cached_property
    def update_size(self) -> int:
        """Elements of a flattened update."""
        return sum(t.size for t in self.trainable)

    @cached_property
    def update_nbytes(self) -> int:
        """Uncompressed bytes of an update."""
        return sum(t.nbytes for t in self.trainable)

    def by_name(self) -> dict[str, TensorSpec]:
        """Map of name to spec."""
        return {t.name: t for t in self.tensors}

    def flatten_update(self, update: Mapping[str, np.ndarray]) -> np.ndarray:
        """Concatenate an update's tensors in spec order as one float64 vector."""
        parts = [np.asarray(update[t.name], dtype=np.float64).ravel() for t in self.trainable]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.float64)

    def unflatten_update(self, flat: np.ndarray) -> dict[str, np.ndarray]:
        """Split a flat float64 vector back into named float64 arrays."""
        out: dict[str, np.ndarray] = {}
        start = 0
        for t in self.trainable:
            out[t.name] = flat[start : start + t.size].reshape(t.shape)
            start += t.size
        return out

"""Turning a round's summed partial sums into the next global model (FedAvg)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from fedq.state.partials import RoundSum
from fedq.tensors import ModelSpec

__all__ = ["apply_flat_update", "apply_mean_update"]


def apply_mean_update(
    global_arrays: Mapping[str, np.ndarray], spec: ModelSpec, round_sum: RoundSum
) -> dict[str, np.ndarray]:
    """New global model: old weights plus the example-weighted mean update.

    The mean is computed in float64 from the exact integer sum and cast back to each
    tensor's dtype, so equal sums always give bit-identical models.
    """
    return apply_flat_update(global_arrays, spec, round_sum.mean_update())


def apply_flat_update(
    global_arrays: Mapping[str, np.ndarray], spec: ModelSpec, flat_update: np.ndarray
) -> dict[str, np.ndarray]:
    """New global model: old weights plus a flat float64 update of the trainable tensors."""
    mean = spec.unflatten_update(flat_update)

    out: dict[str, np.ndarray] = {}
    for t in spec.tensors:
        old = global_arrays[t.name]
        if t.trainable:
            out[t.name] = (old.astype(np.float64) + mean[t.name]).astype(old.dtype)
        else:
            out[t.name] = old.copy()
    return out

"""Accuracy and loss of a set of weights on held-out data."""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from fedq.models import ModelError, build_model, load_arrays, make_dp_compatible

__all__ = ["evaluate"]

log = logging.getLogger(__name__)


def evaluate(
    model_name: str,
    arrays: Mapping[str, np.ndarray],
    data: TensorDataset,
    *,
    batch_size: int = 1000,
) -> tuple[float, float]:
    """Return (accuracy in [0, 1], mean cross-entropy) of the weights on ``data``.

    Raises:
        ValueError: empty data set or ``batch_size`` below 1.
        ModelError: the weights fit neither the model nor its DP-compatible variant.
    """
    if len(data) == 0:
        raise ValueError("evaluation data set is empty; pass at least one example")
    if batch_size < 1:
        raise ValueError(f"batch_size {batch_size} must be at least 1")

    model = _load(model_name, arrays)
    model.eval()
    inputs, labels = data.tensors[0], data.tensors[1]

    correct, loss_sum = 0, 0.0
    with torch.no_grad():
        for start in range(0, len(labels), batch_size):
            logits = model(inputs[start : start + batch_size])
            target = labels[start : start + batch_size]
            loss_sum += F.cross_entropy(logits, target, reduction="sum").item()
            correct += int((logits.argmax(dim=1) == target).sum())

    accuracy, loss = correct / len(labels), loss_sum / len(labels)
    log.debug("%s on %d examples: accuracy %.4f loss %.4f", model_name, len(labels), accuracy, loss)
    return accuracy, loss


def _load(model_name: str, arrays: Mapping[str, np.ndarray]) -> nn.Module:
    model = build_model(model_name)
    try:
        load_arrays(model, arrays)
        return model
    except ModelError:
        # Weights trained with DP come from the fixed variant (e.g. GroupNorm for BatchNorm).
        fixed = make_dp_compatible(model)
        if fixed is model:
            raise
    load_arrays(fixed, arrays)
    return fixed

"""Model factories loaded by import path (``tests.custom_models:NAME``) in the tests."""

from __future__ import annotations

from torch import nn


def small_bn_cnn() -> nn.Module:
    """A small MNIST CNN with a BatchNorm layer, which DP training replaces by GroupNorm."""
    return nn.Sequential(
        nn.Conv2d(1, 8, 5, stride=2, padding=2),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(8 * 7 * 7, 10),
    )

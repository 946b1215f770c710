"""Realistic DP-noised updates for benchmarks, and the model shapes they follow.

A DP-SGD update is ``-lr * sum over steps of (clipped mean gradient + Gaussian noise
of std noise_multiplier * clip_norm / batch_size)``; with the usual settings the
noise dominates, so the update is close to Gaussian with a small signal on top.
"""

from __future__ import annotations

import numpy as np

__all__ = ["MODELS", "dp_update", "model_shapes"]

# Parameter counts: mnist_cnn as in fedq.models, and a 1.2M-parameter CNN.
MODELS = {
    "26k": {
        "0.weight": (16, 1, 8, 8),
        "0.bias": (16,),
        "3.weight": (32, 16, 4, 4),
        "3.bias": (32,),
        "7.weight": (32, 512),
        "7.bias": (32,),
        "9.weight": (10, 32),
        "9.bias": (10,),
    },
    "1.2m": {
        "conv1.weight": (32, 3, 3, 3),
        "conv1.bias": (32,),
        "conv2.weight": (64, 32, 3, 3),
        "conv2.bias": (64,),
        "fc1.weight": (288, 4096),
        "fc1.bias": (288,),
        "fc2.weight": (10, 288),
        "fc2.bias": (10,),
    },
}


def model_shapes(name: str) -> dict[str, tuple[int, ...]]:
    """Shapes of a named benchmark model (or ``"<n>"`` parameters in one tensor)."""
    if name in MODELS:
        return MODELS[name]
    return {"weight": (int(float(name)),)}


def dp_update(
    shapes: dict[str, tuple[int, ...]],
    *,
    seed: int,
    steps: int = 50,
    lr: float = 0.1,
    noise_multiplier: float = 1.0,
    clip_norm: float = 1.0,
    batch_size: int = 64,
) -> dict[str, np.ndarray]:
    """One client's update: a shared signal plus the summed DP noise of ``steps`` steps."""
    rng = np.random.default_rng(seed)
    signal = np.random.default_rng(12345)
    noise_std = lr * noise_multiplier * clip_norm / batch_size * np.sqrt(steps)
    out = {}
    for name, shape in shapes.items():
        size = int(np.prod(shape))
        drift = signal.standard_normal(size, dtype=np.float32) * np.float32(noise_std * 0.3)
        noise = rng.standard_normal(size, dtype=np.float32) * np.float32(noise_std)
        out[name] = (drift + noise).reshape(shape)
    return out

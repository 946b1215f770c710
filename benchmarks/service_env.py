"""The ``FEDQ_*`` environment that gives a service process the benchmark's settings.

The embedded federation takes a ``CoordinatorSettings`` object; the coordinator and
gateway processes read theirs from the environment (``CoordinatorSettings.from_env``).
``coordinator_env`` writes one as the other and reads it back, so the two runs of a
configuration cannot drift apart: a value that no variable carries is refused.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from coordinator.settings import CoordinatorSettings
from fedq.config import EnvReader

__all__ = ["coordinator_env"]

# The plan fields that CoordinatorSettings.from_env reads; the others keep their defaults.
_PLAN_FIELDS = (
    "dp_mode",
    "noise_multiplier",
    "clip_norm",
    "batch_size",
    "local_steps",
    "learning_rate",
    "fedprox_mu",
    "codec",
    "secure_rng",
)


def coordinator_env(settings: CoordinatorSettings) -> dict[str, str]:
    """``FEDQ_*`` variables from which ``CoordinatorSettings.from_env`` rebuilds ``settings``.

    Raises:
        ValueError: ``settings`` holds a value no variable carries (for example a plan
            field that ``from_env`` leaves at its default).
    """
    env = {
        _name(f.name): _text(getattr(settings, f.name))
        for f in fields(settings)
        if f.name != "plan"
    }
    env.update({_name(name): _text(getattr(settings.plan, name)) for name in _PLAN_FIELDS})

    rebuilt = CoordinatorSettings.from_env(EnvReader(env))
    if rebuilt != settings:
        different = [
            f.name
            for f in fields(settings)
            if getattr(rebuilt, f.name) != getattr(settings, f.name)
        ]
        raise ValueError(
            f"settings {', '.join(different)} cannot be passed to a service process through "
            "FEDQ_* variables; use values that CoordinatorSettings.from_env can read"
        )
    return env


def _name(field_name: str) -> str:
    return "FEDQ_" + field_name.upper()


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    return str(value)

"""Reading settings from the environment: one prefix, typed values, clear errors.

Each service has a frozen settings dataclass built by ``from_env()``; those
constructors are the only code that reads ``os.environ``. A value that cannot be
used stops the service at start with a message naming the variable.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import TypeVar

__all__ = ["ENV_PREFIX", "EnvReader", "SettingsError", "redact_url"]

ENV_PREFIX = "FEDQ_"
T = TypeVar("T")


class SettingsError(ValueError):
    """A setting from the environment or the command line has an unusable value."""


class EnvReader:
    """Typed access to ``FEDQ_*`` variables of one environment mapping."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        self._env = os.environ if environ is None else environ

    def str(self, name: str, default: str, *, choices: tuple[str, ...] = ()) -> str:
        """A string; with ``choices``, one of them."""
        value = self._env.get(ENV_PREFIX + name, default)
        if choices and value not in choices:
            raise SettingsError(
                f"{ENV_PREFIX}{name}={value!r}: expected one of {', '.join(choices)}"
            )
        return value

    def int(self, name: str, default: int, *, minimum: int | None = None) -> int:
        """An integer, optionally at least ``minimum``."""
        value = self._parse(name, default, int, "an integer")
        if minimum is not None and value < minimum:
            raise SettingsError(f"{ENV_PREFIX}{name}={value}: expected an integer >= {minimum}")
        return value

    def float(
        self,
        name: str,
        default: float,
        *,
        minimum: float | None = None,
        maximum: float | None = None,
    ) -> float:
        """A float within optional bounds."""
        value = self._parse(name, default, float, "a number")
        if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
            raise SettingsError(
                f"{ENV_PREFIX}{name}={value}: expected a number in [{minimum}, {maximum}]"
            )
        return value

    def bool(self, name: str, default: bool) -> bool:
        """A boolean written as true/false, 1/0, yes/no or on/off."""
        raw = self._env.get(ENV_PREFIX + name)
        if raw is None or raw == "":
            return default
        lowered = raw.strip().lower()
        if lowered in {"1", "true", "yes", "on"}:
            return True
        if lowered in {"0", "false", "no", "off"}:
            return False
        raise SettingsError(f"{ENV_PREFIX}{name}={raw!r}: expected true or false")

    def list(self, name: str, default: list[str]) -> list[str]:
        """A comma-separated list."""
        raw = self._env.get(ENV_PREFIX + name)
        if raw is None or raw.strip() == "":
            return list(default)
        return [item.strip() for item in raw.split(",") if item.strip()]

    def _parse(self, name: str, default: T, parse: Callable[[str], T], what: str) -> T:
        raw = self._env.get(ENV_PREFIX + name)
        if raw is None or raw.strip() == "":
            return default
        try:
            return parse(raw.strip())
        except ValueError:
            raise SettingsError(f"{ENV_PREFIX}{name}={raw!r}: expected {what}") from None


def redact_url(url: str) -> str:
    """A service URL with its credentials hidden, for logs and reprs."""
    if "@" not in url or "://" not in url:
        return url
    scheme, rest = url.split("://", 1)
    return f"{scheme}://***@{rest.rsplit('@', 1)[1]}"

"""Parsing and checking of query parameters; every failure names the parameter."""

from __future__ import annotations

import math

from coordinator.api.errors import BadRequestError

__all__ = ["parse_float", "parse_float_list", "parse_int"]


def parse_int(
    name: str,
    raw: str | None,
    *,
    default: int | None = None,
    minimum: int | None = None,
    maximum: int | None = None,
) -> int | None:
    """``raw`` as an integer within bounds, or ``default`` when it is missing."""
    if raw is None or raw == "":
        return default
    try:
        value = int(raw, 10)
    except ValueError:
        raise BadRequestError(f"{name} must be an integer, got {raw!r}") from None

    if minimum is not None and value < minimum:
        raise BadRequestError(f"{name} must be at least {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise BadRequestError(f"{name} must be at most {maximum}, got {value}")
    return value


def parse_float(
    name: str,
    raw: str | None,
    *,
    default: float,
    low: float | None = None,
    high: float | None = None,
    high_open: bool = False,
) -> float:
    """``raw`` as a finite float in ``(low, high]`` (``(low, high)`` if ``high_open``)."""
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise BadRequestError(f"{name} must be a number, got {raw!r}") from None
    if not math.isfinite(value):
        raise BadRequestError(f"{name} must be a finite number, got {raw!r}")

    _check_range(name, value, low=low, high=high, high_open=high_open)
    return value


def parse_float_list(
    name: str, raw: str | None, *, default: list[float], max_items: int, low: float | None = None
) -> list[float]:
    """A comma-separated list of finite floats, each above ``low``."""
    if raw is None or raw.strip() == "":
        return default
    parts = [p.strip() for p in raw.split(",")]
    if len(parts) > max_items:
        raise BadRequestError(f"{name} takes at most {max_items} values, got {len(parts)}")
    if "" in parts:
        raise BadRequestError(f"{name} has an empty value in {raw!r}; separate numbers by commas")
    return [parse_float(name, p, default=0.0, low=low) for p in parts]


def _check_range(
    name: str, value: float, *, low: float | None, high: float | None, high_open: bool
) -> None:
    too_low = low is not None and value <= low
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
        lo = "-inf" if low is None else f"{low:g}"
        hi = "inf" if high is None else f"{high:g}"
        right = ")" if high_open or high is None else "]"
        raise BadRequestError(f"{name} must be in ({lo}, {hi}{right}, got {value:g}")

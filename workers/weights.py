"""The integer weight of one update in its round's sum.

FedAvg weighs an update by the examples it was trained on. Two refinements, both
integers computed from integers (and one correctly rounded square root), so every
worker derives the same weight for the same update and sums stay bit-identical:

- Work done. A client that stopped early (it ran out of time) took fewer steps than
  its plan asked for; its update moved the model less far and is weighted by the
  share of the plan it completed::

      weight = max(1, num_examples * min(steps_done, planned_steps) // planned_steps)

  A client that reports no steps (``steps_done == 0``) counts as having done its plan.
- Staleness (asynchronous mode). An update trained on model version ``v`` that joins
  version ``w`` is discounted by ``1 / sqrt(1 + (w - v))``, rounded to the nearest
  integer (at least 1). The weight is never scaled up, so the gateway's bound on
  ``num_examples`` still bounds every weight and the fixed-point sums cannot overflow;
  rounding costs at most half an example of weight.
"""

from __future__ import annotations

import math

__all__ = ["staleness_weight", "work_weight"]


def work_weight(num_examples: int, *, steps_done: int, planned_steps: int) -> int:
    """``num_examples`` scaled by the share of the planned steps that were done."""
    if steps_done <= 0 or planned_steps <= 0 or steps_done >= planned_steps:
        return num_examples
    return max(1, num_examples * steps_done // planned_steps)


def staleness_weight(weight: int, *, staleness: int) -> int:
    """``weight`` discounted by ``1 / sqrt(1 + staleness)``."""
    if staleness <= 0:
        return weight
    return max(1, round(weight / math.sqrt(1 + staleness)))

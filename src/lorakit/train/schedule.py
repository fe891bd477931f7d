"""Learning-rate multipliers: linear warm-up, then cosine, linear or constant."""

from __future__ import annotations

import math
from collections.abc import Callable


def warmup_count(total_steps: int, warmup_ratio: float, warmup_steps: int | None) -> int:
    """Warm-up length in steps: warmup_steps if given, else round(warmup_ratio * total_steps)."""
    return warmup_steps if warmup_steps is not None else round(warmup_ratio * total_steps)


def lr_multiplier(schedule: str, warmup: int, total: int) -> Callable[[int], float]:
    """f(step) -> factor on the base lr for the 0-based optimiser step `step`."""

    def factor(step: int) -> float:
        if step < warmup:
            # (step + 1) / warmup: the first step already moves; the last warm-up step reaches the base lr
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if schedule == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor

"""Learning-rate schedules: a pure function of the optimizer step, so a resumed run needs no state."""

from __future__ import annotations

import math


def learning_rate(step: int, *, lr: float, min_lr: float, total_steps: int, warmup_steps: int,
                  schedule: str, decay_fraction: float = 0.2) -> float:
    """The lr for optimizer step `step` (0-based).

    cosine:   linear warmup to lr, then cosine down to min_lr at total_steps.
    wsd:      linear warmup, constant lr, then linear decay to min_lr over the last decay_fraction of steps.
    constant: linear warmup, then lr.
    """
    if warmup_steps and step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return lr
    if schedule == "cosine":
        span = max(1, total_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / span)
        return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))
    if schedule == "wsd":
        decay_steps = max(1, round(decay_fraction * total_steps))
        decay_start = max(warmup_steps, total_steps - decay_steps)
        if step < decay_start:
            return lr
        progress = min(1.0, (step - decay_start) / max(1, total_steps - decay_start))
        return lr + (min_lr - lr) * progress
    raise ValueError(f"unknown schedule {schedule!r}; choose cosine, wsd or constant")

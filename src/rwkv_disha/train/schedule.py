"""Learning-rate schedules, in optimizer steps counted across epochs (RWKV-PEFT semantics).

``cos_decay``: linear warmup to lr_init over warmup_steps, then cosine from lr_init to lr_final.
``wsd``: warmup, stable at lr_init, then a final cosine decay to lr_final over the last ``decay_frac``.
Warmup starts at 1 % of lr_init (as RWKV-LM does), never at 0, so the first step already learns.
"""

from __future__ import annotations

import math

from rwkv_disha.choices import LR_SCHEDULES
from rwkv_disha.errors import RWKVDishaError


def lr_at(
    step: int,
    total_steps: int,
    lr_init: float,
    lr_final: float,
    warmup_steps: int = 0,
    schedule: str = "cos_decay",
    decay_frac: float = 0.1,
) -> float:
    """Learning rate for optimizer step ``step`` (0-based) of ``total_steps``."""
    if schedule not in LR_SCHEDULES:
        raise RWKVDishaError(f"unknown --lr_schedule {schedule!r}; choose one of {', '.join(LR_SCHEDULES)}")
    if warmup_steps > 0 and step < warmup_steps:
        return lr_init * (0.01 + 0.99 * step / warmup_steps)
    if schedule == "cos_decay":
        start, span = warmup_steps, max(total_steps - warmup_steps, 1)
    else:
        span = max(int(round(total_steps * decay_frac)), 1)
        start = max(total_steps - span, warmup_steps)
        if step < start:
            return lr_init
    progress = min(max((step - start) / span, 0.0), 1.0)
    return lr_final + 0.5 * (lr_init - lr_final) * (1 + math.cos(math.pi * progress))

"""The one cosine schedule the trainers share (``volumes pretrain``'s recipe, the click model's learning rate)."""

from __future__ import annotations

import math

__all__ = ["cosine"]


def cosine(step: int, total: int, start: float, end: float) -> float:
    """``start`` at step 0 to ``end`` at ``total`` along half a cosine (constant after)."""
    t = min(max(step, 0), total) / max(total, 1)
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * t))

"""The schedules, losses and collapse checks of the pretraining recipe (pure functions, no state).

Schedules follow DINOv2: lr linear warm-up then cosine, weight decay and teacher momentum
cosine from start to end, teacher temperature linear warm-up. :func:`collapse_metrics`
and :func:`collapse_signs` are what ``metrics.jsonl`` logs and what stops a collapsed run
(docs/PRETRAIN.md, "Reading the collapse metrics").
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from volumes.schedules import cosine

__all__ = ["ADVICE", "collapse_metrics", "collapse_signs", "cosine", "cross_entropy", "learning_rate",
           "teacher_temperature"]


def learning_rate(step: int, s: dict[str, Any]) -> float:
    """Linear warm-up to ``lr``, then cosine to ``min_lr`` at the last step."""
    if step < s["warmup_steps"]:
        return s["lr"] * (step + 1) / s["warmup_steps"]
    return cosine(step - s["warmup_steps"], s["steps"] - s["warmup_steps"], s["lr"], s["min_lr"])


def teacher_temperature(step: int, s: dict[str, Any]) -> float:
    start, end = s["teacher_temp"]
    warm = s["teacher_temp_warmup_steps"]
    return end if step >= warm else start + (end - start) * step / warm


# ---------------------------------------------------------------------- metrics
@torch.no_grad()
def collapse_metrics(cls: torch.Tensor, teacher_probs: torch.Tensor) -> dict[str, float]:
    """Signs of collapse from the teacher's class tokens ``[N, E]`` and its DINO probabilities ``[N, K]``.

    ``cls_std``: per-dimension standard deviation of the L2-normalised tokens, averaged (0
    when every slice gets the same token; about ``1/sqrt(E)`` when they spread evenly);
    ``effective_rank``: exp of the entropy of the normalised singular values of the centred
    tokens (1 = one direction); ``teacher_entropy``: mean entropy of the teacher's
    distribution over prototypes (``ln K`` = uniform for every slice);
    ``teacher_marginal_entropy``: entropy of the batch-mean distribution (0 = every slice
    on the same prototype).
    """
    tokens = F.normalize(cls.float(), dim=-1)
    std = float(tokens.std(dim=0).mean()) if len(tokens) > 1 else 0.0
    singular = torch.linalg.svdvals(tokens - tokens.mean(dim=0, keepdim=True))
    p = singular / singular.sum().clamp_min(1e-12)
    rank = float(torch.exp(-(p * torch.log(p.clamp_min(1e-12))).sum()))
    probs = teacher_probs.float()
    entropy = float(-(probs * torch.log(probs.clamp_min(1e-12))).sum(dim=-1).mean())
    marginal = probs.mean(dim=0)
    marginal_entropy = float(-(marginal * torch.log(marginal.clamp_min(1e-12))).sum())
    return {"cls_std": std, "effective_rank": rank, "teacher_entropy": entropy,
            "teacher_marginal_entropy": marginal_entropy}


def collapse_signs(metrics: dict[str, float], prototypes: int, std_floor: float) -> list[str]:
    """What looks collapsed in one step's :func:`collapse_metrics` (empty: nothing)."""
    signs = []
    if metrics["cls_std"] < std_floor:
        signs.append(f"the teacher's class tokens are nearly the same for every slice (std {metrics['cls_std']:.2e} "
                     f"< {std_floor:g})")
    if metrics["teacher_entropy"] > 0.98 * math.log(prototypes):
        signs.append(f"the teacher's output is uniform over the {prototypes} prototypes (entropy "
                     f"{metrics['teacher_entropy']:.3f} of ln {prototypes} = {math.log(prototypes):.3f})")
    if metrics["teacher_marginal_entropy"] < 0.1:
        signs.append(f"every slice goes to the same prototype (entropy of the mean teacher output "
                     f"{metrics['teacher_marginal_entropy']:.3f})")
    return signs


ADVICE = ("lower --lr, lengthen --warmup-steps, raise --koleo-weight, use --centering sinkhorn, "
          "check that the slices differ (--min-foreground, the preset), or give more data")


def cross_entropy(targets: list[torch.Tensor], students: list[torch.Tensor], temp: float) -> torch.Tensor:
    """DINO's loss on given teacher distributions: every student view against every other global view's target."""
    total, terms = 0.0, 0
    for i, target in enumerate(targets):
        for j, logits in enumerate(students):
            if i == j:
                continue
            total = total + (-(target * F.log_softmax(logits / temp, dim=-1)).sum(dim=-1)).mean()
            terms += 1
    return total / max(terms, 1)

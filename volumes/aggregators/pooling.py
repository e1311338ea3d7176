"""Pooling baselines (masked mean, gated attention-MIL) and the masking helpers every aggregator shares.

Every aggregator takes slice embeddings ``x [B, D, E]``, an optional validity mask
``mask [B, D]`` (``False`` = padding) and returns logits ``[B, K]``;
``forward_with_importance`` also returns a per-slice importance ``[B, D]`` that sums
to 1 over the valid slices of each volume and is 0 on padding.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from volumes.aggregators.base import SliceAggregator
from volumes.aggregators.factory import register_aggregator
from volumes.errors import ConfigError

# ---------------------------------------------------------------------------
# argument checks: raised at construction so a bad bundle config fails before training


def check_choice(key: str, value: str, allowed: Sequence[str]) -> str:
    """Return ``value`` if it is one of ``allowed``, else raise :class:`ConfigError` naming ``key``."""
    if value not in allowed:
        raise ConfigError(key, value, tuple(allowed))
    return value


def check_positive(key: str, value: float, *, integer: bool = True) -> None:
    """Raise :class:`ConfigError` unless ``value`` is a positive int (or positive number)."""
    if integer:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(key, value, "positive integers")
    elif isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ConfigError(key, value, "positive numbers")


def check_dropout(key: str, value: float) -> None:
    """Raise :class:`ConfigError` unless ``0 <= value < 1``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ConfigError(key, value, "[0.0, 1.0)")


# ---------------------------------------------------------------------------
# masking primitives


def resolve_mask(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The validity mask ``[B, D]`` (bool); all slices valid when ``mask`` is ``None``."""
    if mask is None:
        return torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
    return mask.to(device=x.device, dtype=torch.bool)


def zero_padding(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``x [B, D, E]`` with padded slices set to 0.

    ``where`` (not multiplication) so NaN or inf in padding cannot leak through ``0 * nan``.
    """
    return torch.where(mask.unsqueeze(-1), x, torch.zeros_like(x))


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``x [B, D, E]`` over valid slices -> ``[B, E]`` (zeros for a volume with none)."""
    weights = mask.to(x.dtype)
    total = (zero_padding(x, mask) * weights.unsqueeze(-1)).sum(1)
    return total / weights.sum(1, keepdim=True).clamp_min(1.0)


def masked_softmax(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Softmax of ``scores [B, D]`` over valid slices; exactly 0 on padding.

    A finite fill value (not ``-inf``) keeps a volume without valid slices at all-zero
    weights instead of NaN.
    """
    filled = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    weights = torch.softmax(filled, dim=-1) * mask.to(scores.dtype)
    return weights / weights.sum(-1, keepdim=True).clamp_min(torch.finfo(scores.dtype).tiny)


def normalise_importance(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Non-negative ``scores [B, D]`` rescaled to sum to 1 over valid slices (0 on padding).

    Uniform over valid slices where every score is 0, so the result always sums to 1
    for a volume with at least one valid slice.
    """
    valid = mask.to(scores.dtype)
    scores = scores.clamp_min(0.0) * valid
    total = scores.sum(-1, keepdim=True)
    uniform = valid / valid.sum(-1, keepdim=True).clamp_min(1.0)
    return torch.where(total > 0, scores / total.clamp_min(torch.finfo(scores.dtype).tiny), uniform)


def concat_planes(
    xs: Sequence[torch.Tensor],
    masks: Sequence[torch.Tensor | None] | None = None,
    positions: Sequence[torch.Tensor | None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Join per-plane slice embeddings into one token stream for multi-plane aggregation.

    Args:
        xs: one ``[B, D_p, E]`` tensor per plane (e.g. axial, coronal, sagittal); the
            slice counts ``D_p`` may differ.
        masks: per-plane ``[B, D_p]`` validity masks (``None`` entries = all valid).
        positions: per-plane ``[B, D_p]`` slice positions in mm along that plane's normal
            (all ``None`` = no positions).

    Returns:
        ``x [B, sum D_p, E]``, ``mask [B, sum D_p]``, ``positions [B, sum D_p]`` or ``None``
        and ``plane_ids [B, sum D_p]`` (long, plane ``p`` -> ``p``), ready for
        ``aggregator(x, mask, positions, plane_ids)``.
    """
    masks = list(masks) if masks is not None else [None] * len(xs)
    positions = list(positions) if positions is not None else [None] * len(xs)
    if not (len(xs) == len(masks) == len(positions)):
        raise ValueError(f"got {len(xs)} planes, {len(masks)} masks and {len(positions)} position tensors")
    x = torch.cat(list(xs), dim=1)
    mask = torch.cat([resolve_mask(xp, mp) for xp, mp in zip(xs, masks)], dim=1)
    plane_ids = torch.cat(
        [torch.full(xp.shape[:2], p, dtype=torch.long, device=xp.device) for p, xp in enumerate(xs)], dim=1
    )
    pos: torch.Tensor | None = None
    if any(p is not None for p in positions):
        if any(p is None for p in positions):
            raise ValueError("give positions for every plane or for none")
        pos = torch.cat([p.to(x.dtype) for p in positions if p is not None], dim=1)
    return x, mask, pos, plane_ids


# ---------------------------------------------------------------------------
# baselines


@register_aggregator("mean")
class MeanPool(SliceAggregator):
    """Masked mean of the slice embeddings followed by a linear layer (the linear-probe baseline).

    Args:
        embed_dim: slice embedding size ``E``.
        num_classes: number of logits ``K``.

    ``forward(x [B, D, E], mask [B, D] | None, positions, plane_ids) -> logits [B, K]``;
    positions and plane ids are accepted for a common signature and ignored. Importance is
    uniform over valid slices: a mean gives every slice the same weight.
    """

    def __init__(self, embed_dim: int, num_classes: int):
        super().__init__()
        check_positive("embed_dim", embed_dim)
        check_positive("num_classes", num_classes)
        self.head = nn.Linear(embed_dim, num_classes)

    def logits_and_importance(self, x, mask, positions, plane_ids, need_importance):
        """Logits ``[B, K]`` and uniform importance ``[B, D]``."""
        mask = resolve_mask(x, mask)
        logits = self.head(masked_mean(x, mask))
        return logits, normalise_importance(torch.zeros_like(x[..., 0]), mask) if need_importance else None


@register_aggregator("attention_mil")
class AttentionMIL(SliceAggregator):
    """Attention-based multiple-instance pooling (Ilse et al. 2018), slices as instances.

    ``a = softmax_d(w^T (tanh(V x_d) * sigmoid(U x_d)))`` over valid slices (the sigmoid
    gate only when ``gated``), ``z = sum_d a_d x_d``, logits = ``Linear(dropout(z))``.

    Args:
        embed_dim: slice embedding size ``E``.
        num_classes: number of logits ``K``.
        hidden: size of the attention network's hidden layer.
        gated: use the gated variant (tanh * sigmoid) rather than tanh alone.
        dropout: dropout on the pooled embedding before the classifier.

    ``forward(x [B, D, E], mask [B, D] | None, positions, plane_ids) -> logits [B, K]``;
    positions and plane ids are ignored. Importance = the attention weights ``a``.
    """

    def __init__(
        self, embed_dim: int, num_classes: int, *, hidden: int = 128, gated: bool = True, dropout: float = 0.0
    ):
        super().__init__()
        check_positive("embed_dim", embed_dim)
        check_positive("num_classes", num_classes)
        check_positive("hidden", hidden)
        check_dropout("dropout", dropout)
        self.attention_v = nn.Sequential(nn.Linear(embed_dim, hidden), nn.Tanh())
        self.attention_u = nn.Sequential(nn.Linear(embed_dim, hidden), nn.Sigmoid()) if gated else None
        self.attention_w = nn.Linear(hidden, 1)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(embed_dim, num_classes)

    def logits_and_importance(self, x, mask, positions, plane_ids, need_importance):
        """Logits ``[B, K]`` and attention weights ``[B, D]``."""
        mask = resolve_mask(x, mask)
        x = zero_padding(x, mask)
        gate = self.attention_v(x)
        if self.attention_u is not None:
            gate = gate * self.attention_u(x)
        weights = masked_softmax(self.attention_w(gate).squeeze(-1), mask)
        pooled = (weights.unsqueeze(-1) * x).sum(1)
        return self.head(self.dropout(pooled)), weights

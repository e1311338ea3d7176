"""What every aggregator is: slice embeddings ``[B, D, E]`` -> logits ``[B, K]``, and each slice's importance.

A subclass implements :meth:`SliceAggregator.logits_and_importance` once;
``forward`` (logits, what training and TorchScript call) and ``forward_with_importance``
(logits and importance ``[B, D]``, what inference reports) come from here, with one
signature: ``x [B, D, E]``, ``mask [B, D]`` (True = a real slice; None: all), ``positions
[B, D]`` in mm and ``plane_ids [B, D]`` (long), each optional and ignored by the
aggregators that do not use them.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["SliceAggregator"]


class SliceAggregator(nn.Module):
    """Base class of the aggregators (:func:`volumes.aggregators.register_aggregator` registers them)."""

    def logits_and_importance(self, x: torch.Tensor, mask: torch.Tensor | None, positions: torch.Tensor | None,
                              plane_ids: torch.Tensor | None, need_importance: bool,
                              ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits ``[B, K]`` and, when ``need_importance`` (else it may be None), importance ``[B, D]``."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, positions: torch.Tensor | None = None,
                plane_ids: torch.Tensor | None = None) -> torch.Tensor:
        return self.logits_and_importance(x, mask, positions, plane_ids, False)[0]

    def forward_with_importance(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                                positions: torch.Tensor | None = None, plane_ids: torch.Tensor | None = None,
                                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits ``[B, K]`` and importance ``[B, D]`` (non-negative, summing to 1 over a volume's real slices)."""
        logits, importance = self.logits_and_importance(x, mask, positions, plane_ids, True)
        assert importance is not None
        return logits, importance

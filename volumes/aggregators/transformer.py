"""SliceTransformer: a class-token transformer over the slices of a volume.

After the Medical Slice Transformer (Müller-Franzes et al. 2024): slice embeddings
from a 2D foundation model are projected, given a slice position, prefixed with a
learnable class token and mixed by a few pre-norm transformer layers; the class token
is classified. The class token's last-layer attention over slices is the importance.

Slice positions (``position=``):

- ``none``: the slices are a set.
- ``learned_index``: a learned embedding of the slice's rank among the valid slices
  (of its plane), so the padding layout never changes a slice's index.
- ``sinusoidal_mm``: a fixed sinusoidal code of the slice's physical position in mm,
  measured from the midpoint ``(min + max) / 2`` of the volume's valid extent (per
  plane). Millimetres instead of indices make a 2 mm and a 4 mm scan of the same
  anatomy give that anatomy the same code. The midpoint (rather than the first slice)
  is a reference that depends neither on the order the slices are stored in (head-first
  or feet-first series) nor on how densely the extent is sampled. The sign of the
  positions is kept, so pass them in one patient frame (e.g. RAS z). Without
  ``positions`` the slice rank is used as millimetres (1 mm spacing).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from volumes.aggregators.pooling import (
    check_choice,
    check_dropout,
    check_positive,
    normalise_importance,
    resolve_mask,
    zero_padding,
)
from volumes.aggregators.base import SliceAggregator
from volumes.aggregators.factory import register_aggregator
from volumes.errors import ConfigError

POSITIONS = ("sinusoidal_mm", "learned_index", "none")


def plane_masks(mask: torch.Tensor, plane_ids: torch.Tensor, planes: int) -> torch.Tensor:
    """Valid slices of each plane: ``mask [B, D]``, ``plane_ids [B, D]`` -> ``[B, P, D]`` bool."""
    plane_range = torch.arange(planes, device=mask.device).view(1, planes, 1)
    return mask.unsqueeze(1) & (plane_ids.unsqueeze(1) == plane_range)


def slice_rank(mask: torch.Tensor, plane_ids: torch.Tensor, planes: int) -> torch.Tensor:
    """Rank of each valid slice among the valid slices of its plane, ``[B, D]`` long (0 on padding)."""
    per_plane = plane_masks(mask, plane_ids, planes).long()
    rank = (per_plane.cumsum(-1) * per_plane).sum(1) - 1
    return rank.clamp_min(0)


def centre_positions(
    positions: torch.Tensor, mask: torch.Tensor, plane_ids: torch.Tensor, planes: int
) -> torch.Tensor:
    """Slice positions relative to the midpoint of their plane's valid extent, ``[B, D]`` (0 on padding).

    Args:
        positions: slice positions in mm, ``[B, D]``.
        mask: valid slices, ``[B, D]`` bool.
        plane_ids: plane of each slice, ``[B, D]`` long in ``[0, planes)``.
        planes: number of planes ``P``.
    """
    positions = positions.to(torch.float32) if not positions.is_floating_point() else positions
    per_plane = plane_masks(mask, plane_ids, planes)  # [B, P, D]
    expanded = positions.unsqueeze(1).expand_as(per_plane)
    big = torch.finfo(positions.dtype).max
    low = torch.where(per_plane, expanded, torch.full_like(expanded, big)).amin(-1)
    high = torch.where(per_plane, expanded, torch.full_like(expanded, -big)).amax(-1)
    # An empty plane leaves +-max here; zero it so its (unused) midpoint stays finite.
    midpoint = torch.where(per_plane.any(-1), (low + high) / 2, torch.zeros_like(low))  # [B, P]
    centred = positions - midpoint.gather(1, plane_ids.clamp(0, planes - 1))
    return torch.where(mask, centred, torch.zeros_like(centred))


def sinusoidal_encoding(positions: torch.Tensor, dim: int, base: float = 10000.0) -> torch.Tensor:
    """Transformer sinusoids of continuous positions: ``[...]`` -> ``[..., dim]``.

    Channel pairs ``(sin(p w_i), cos(p w_i))`` with ``w_i = base^(-2i/dim)``: wavelengths from
    ``2 pi`` to ``2 pi base`` position units, which covers a slice (mm) up to a whole body.
    Equal positions give equal codes, whatever the sampling they came from.
    """
    half = (dim + 1) // 2
    frequencies = torch.exp(
        -math.log(base) * torch.arange(half, device=positions.device, dtype=torch.float32) / half
    )
    angles = positions.to(torch.float32).unsqueeze(-1) * frequencies
    code = torch.stack((angles.sin(), angles.cos()), dim=-1).flatten(-2)[..., :dim]
    return code.to(positions.dtype) if positions.is_floating_point() else code


class SelfAttention(nn.Module):
    """Multi-head self-attention with a key padding mask that can return its weights.

    Written out (not ``nn.MultiheadAttention``) because the latter switches to a fused
    fast path depending on grad mode, which makes TorchScript traces differ between runs.

    ``forward(x [B, L, C], attend [B, L] (True = may be attended to), need_weights)``
    -> ``(x [B, L, C], head-averaged weights [B, L, L] or None)``.
    """

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.dropout = dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.attention_dropout = nn.Dropout(dropout)

    def forward(
        self, x: torch.Tensor, attend: torch.Tensor, need_weights: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch, length, channels = x.shape
        qkv = self.qkv(x).view(batch, length, 3, self.heads, channels // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, heads, L, C / heads]
        allowed = attend.view(batch, 1, 1, length)
        weights: torch.Tensor | None = None
        if need_weights:
            scores = (q @ k.transpose(-2, -1)) * (q.shape[-1] ** -0.5)
            attention = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
            weights = attention.mean(1)
            out = self.attention_dropout(attention) @ v
        else:
            out = nn.functional.scaled_dot_product_attention(
                q, k, v, attn_mask=allowed, dropout_p=self.dropout if self.training else 0.0
            )
        return self.proj(out.transpose(1, 2).reshape(batch, length, channels)), weights


class PreNormBlock(nn.Module):
    """A pre-norm transformer layer that can return its head-averaged attention weights.

    ``forward(x [B, L, C], attend [B, L] (True = may be attended to), need_weights)``
    -> ``(x [B, L, C], weights [B, L, L] or None)``.
    """

    def __init__(self, dim: int, heads: int, mlp_ratio: float, dropout: float):
        super().__init__()
        hidden = max(1, int(round(dim * mlp_ratio)))
        self.norm1 = nn.LayerNorm(dim)
        self.attention = SelfAttention(dim, heads, dropout)
        self.drop = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim), nn.Dropout(dropout)
        )

    def forward(
        self, x: torch.Tensor, attend: torch.Tensor, need_weights: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        attended, weights = self.attention(self.norm1(x), attend, need_weights)
        x = x + self.drop(attended)
        x = x + self.mlp(self.norm2(x))
        return x, weights


@register_aggregator("transformer")
class SliceTransformer(SliceAggregator):
    """Class-token transformer over slice embeddings (Medical Slice Transformer style).

    Args:
        embed_dim: slice embedding size ``E``.
        num_classes: number of logits ``K``.
        dim: transformer width.
        depth: number of transformer layers.
        heads: attention heads (must divide ``dim``).
        mlp_ratio: MLP hidden size / ``dim``.
        dropout: dropout in attention, MLP and on the input tokens.
        position: ``sinusoidal_mm``, ``learned_index`` or ``none`` (see the module docstring).
        max_slices: most slices per volume for ``learned_index`` (size of its table).
        mm_scale: position units per mm for ``sinusoidal_mm`` (1.0: 1 unit = 1 mm;
            0.1: 1 unit = 1 cm, i.e. smoother codes).
        planes: number of slice planes in one token stream (1, or 3 for axial + coronal +
            sagittal); with ``planes > 1`` a learned plane embedding is added to each slice
            token and positions / ranks are taken per plane. Build the stream with
            :func:`volumes.aggregators.concat_planes`.

    ``forward(x [B, D, E], mask [B, D] | None, positions [B, D] (mm) | None,
    plane_ids [B, D] long | None) -> logits [B, K]``. ``plane_ids`` is ignored when
    ``planes == 1`` and all zeros when omitted.
    """

    def __init__(
        self,
        embed_dim: int,
        num_classes: int,
        *,
        dim: int = 256,
        depth: int = 2,
        heads: int = 4,
        mlp_ratio: float = 2.0,
        dropout: float = 0.1,
        position: str = "sinusoidal_mm",
        max_slices: int = 1024,
        mm_scale: float = 1.0,
        planes: int = 1,
    ):
        super().__init__()
        check_positive("embed_dim", embed_dim)
        check_positive("num_classes", num_classes)
        check_positive("dim", dim)
        check_positive("depth", depth)
        check_positive("heads", heads)
        if dim % heads:
            raise ConfigError("heads", heads, [h for h in range(1, dim + 1) if dim % h == 0])
        check_positive("mlp_ratio", mlp_ratio, integer=False)
        check_dropout("dropout", dropout)
        check_choice("position", position, POSITIONS)
        check_positive("max_slices", max_slices)
        check_positive("mm_scale", mm_scale, integer=False)
        check_positive("planes", planes)
        self.dim = dim
        self.position = position
        self.max_slices = max_slices
        self.mm_scale = float(mm_scale)
        self.planes = planes

        self.project = nn.Linear(embed_dim, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.index_embedding = nn.Embedding(max_slices, dim) if position == "learned_index" else None
        self.plane_embedding = nn.Embedding(planes, dim) if planes > 1 else None
        self.input_dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(PreNormBlock(dim, heads, mlp_ratio, dropout) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for table in (self.index_embedding, self.plane_embedding):
            if table is not None:
                nn.init.trunc_normal_(table.weight, std=0.02)

    def _position_code(
        self, mask: torch.Tensor, positions: torch.Tensor | None, plane_ids: torch.Tensor
    ) -> torch.Tensor:
        """What is added to each slice token for its position (and plane): ``[B, D, dim]`` or scalar 0."""
        code: torch.Tensor = torch.zeros((), device=mask.device)
        if self.index_embedding is not None:
            # Shapes are constants in a trace; the check only guards eager use.
            if not torch.jit.is_tracing() and mask.shape[1] > self.max_slices:
                raise ValueError(f"{mask.shape[1]} slices exceed max_slices={self.max_slices} of learned_index")
            code = self.index_embedding(slice_rank(mask, plane_ids, self.planes))
        elif self.position == "sinusoidal_mm":
            if positions is None:
                positions = slice_rank(mask, plane_ids, self.planes).to(torch.float32)
            centred = centre_positions(positions.to(torch.float32), mask, plane_ids, self.planes)
            code = sinusoidal_encoding(centred * self.mm_scale, self.dim)
        if self.plane_embedding is not None:
            code = code + self.plane_embedding(plane_ids)
        return code

    def _run(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None,
        positions: torch.Tensor | None,
        plane_ids: torch.Tensor | None,
        need_weights: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        valid = resolve_mask(x, mask)
        if plane_ids is None or self.planes == 1:
            plane_ids = torch.zeros(valid.shape, dtype=torch.long, device=x.device)
        tokens = self.project(zero_padding(x, valid))
        tokens = tokens + self._position_code(valid, positions, plane_ids).to(tokens.dtype)
        tokens = zero_padding(tokens, valid)  # padded tokens carry nothing, not even a position
        tokens = torch.cat((self.cls_token.expand(x.shape[0], -1, -1).to(tokens.dtype), tokens), dim=1)
        tokens = self.input_dropout(tokens)
        # The class token is always attended to, so no row of the attention is fully masked.
        attend = torch.cat((torch.ones_like(valid[:, :1]), valid), dim=1)
        weights: torch.Tensor | None = None
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            tokens, weights = block(tokens, attend, need_weights and i == last)
        logits = self.head(self.norm(tokens[:, 0]))
        return logits, weights, valid

    def logits_and_importance(self, x, mask, positions, plane_ids, need_importance):
        """Logits ``[B, K]`` and importance ``[B, D]`` (the attention weights only when asked for).

        Importance is the class token's attention over the slices in the last layer,
        averaged over heads; its attention to itself is dropped and the rest renormalised
        over valid slices.
        """
        logits, weights, valid = self._run(x, mask, positions, plane_ids, need_weights=need_importance)
        if not need_importance:
            return logits, None
        assert weights is not None
        return logits, normalise_importance(weights[:, 0, 1:], valid)

"""SAM's image encoder (timm ``samvit_*``) with the token outputs the rest of ``volumes`` reads.

SAM's ViT has no class token and ends in a convolutional *neck* (1x1 conv, LayerNorm2d,
3x3 conv, LayerNorm2d) that maps the last block's ``[N, E, h, w]`` grid to
``[N, 256, h, w]``. :class:`SamTokenViT` presents it like a ViT with one prefix token:

* final tokens ``[N, 1 + h*w, C]``: the neck's tokens, preceded by their mean, which is
  the "CLS" of SAM (as Baharoon et al. read it); ``C`` = the neck width (256);
* intermediates with ``norm=True`` go through the neck as well (timm's own convention for
  SAM: the neck plays the final norm's part), so every grid has ``C`` channels and the
  last one equals SAM's image embedding; with ``norm=False`` they are the raw block
  outputs ``[N, E, h, w]``. Their prefix token is again the mean of the grid.

The parameters and their names are timm's (and, after timm's ``checkpoint_filter_fn``,
Meta's ``image_encoder.*`` without the prefix), so LoRA targets (``attn.qkv``, ``mlp.fc1``,
``mlp.fc2``), BitFit and layer-wise decay (``blocks.N``) work unchanged.

Input size. SAM was trained on 1024 x 1024 inputs (64 x 64 tokens, windows of 14 tokens
with global attention in four blocks and relative position tables for 64 positions).
Other sizes are honest but not what SAM saw: timm resamples the absolute position grid
(bicubic) and the relative position tables (linear, as Meta's ``get_rel_pos`` does) and
pads the token grid to whole windows. At 224 px (14 x 14 tokens) one window covers the
whole slice, so windowed and global blocks attend alike. ``--size 1024`` reproduces SAM's
own resolution (16x the tokens of 256 px: slow on CPUs).
"""

from __future__ import annotations

from typing import List, Optional, Tuple, Union

import torch
from timm.models.vision_transformer_sam import VisionTransformerSAM
from timm.models.vision_transformer_sam import checkpoint_filter_fn as _timm_filter

__all__ = ["SamTokenViT", "checkpoint_filter_fn", "to_token_vit"]


def checkpoint_filter_fn(state_dict: dict, model: torch.nn.Module) -> dict:
    """timm's SAM conversion (``image_encoder.`` prefix dropped, ``mlp.lin`` -> ``mlp.fc``)."""
    return _timm_filter(state_dict, model)


def _with_mean_token(grid: torch.Tensor) -> torch.Tensor:
    """``[N, C, h, w]`` -> ``[N, 1 + h*w, C]``: the grid's mean token first, then its tokens."""
    tokens = grid.flatten(2).transpose(1, 2)
    return torch.cat([tokens.mean(dim=1, keepdim=True), tokens], dim=1)


class SamTokenViT(VisionTransformerSAM):
    """A timm SAM ViT whose ``forward_features`` / ``forward_intermediates`` return ViT-style tokens.

    Made from a built timm model by :func:`to_token_vit` (same parameters, same names).
    """

    num_prefix_tokens = 1

    @property
    def token_dim(self) -> int:
        """Width ``C`` of the final tokens (the neck's output channels)."""
        return int(self.neck[-1].weight.shape[0]) if isinstance(self.neck, torch.nn.Sequential) else self.embed_dim

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Slices ``[N, 3, H, W]`` -> tokens ``[N, 1 + h*w, C]`` (mean of the neck tokens first)."""
        return _with_mean_token(super().forward_features(x))

    def forward_intermediates(  # type: ignore[override]
        self,
        x: torch.Tensor,
        indices: Optional[Union[int, List[int]]] = None,
        return_prefix_tokens: bool = False,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> Union[List, Tuple[torch.Tensor, List]]:
        """As timm ViT's: final tokens ``[N, 1 + h*w, C]`` and grids ``[N, C or E, h, w]`` of the blocks.

        With ``return_prefix_tokens`` every intermediate is ``(grid, mean token [N, 1, C])``.
        """
        if output_fmt != "NCHW":
            raise ValueError("SAM intermediates are NCHW grids")
        found = super().forward_intermediates(x, indices, norm=norm, stop_early=stop_early, output_fmt="NCHW",
                                              intermediates_only=intermediates_only)
        grids = found if intermediates_only else found[1]
        if return_prefix_tokens:
            grids = [(g, g.flatten(2).mean(dim=2).unsqueeze(1)) for g in grids]
        if intermediates_only:
            return grids
        return _with_mean_token(found[0]), grids

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """The mean token of :meth:`forward_features` (SAM has no head of its own)."""
        return x[:, 0]


def to_token_vit(model: VisionTransformerSAM) -> SamTokenViT:
    """Give a built timm SAM ViT the token outputs of :class:`SamTokenViT`, in place.

    Changing the class (not wrapping the module) keeps every parameter name, so checkpoints,
    LoRA targets and layer-wise learning rates see timm's model.
    """
    if not isinstance(model, VisionTransformerSAM):
        raise TypeError(f"expected a timm VisionTransformerSAM, got {type(model).__name__}")
    model.__class__ = SamTokenViT
    return model  # type: ignore[return-value]

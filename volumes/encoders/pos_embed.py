"""Position-embedding interpolation for ViTs with absolute position embeddings.

A DINOv2 checkpoint holds a position grid for one input size (37x37 patches for the
released 518 px models). Slices of another size need the grid resampled, and the
references disagree on how:

* ``bicubic_antialias``: timm's default, Meta's register models and Hugging Face's
  ``Dinov2WithRegistersModel``. PyTorch's antialiased bicubic uses the kernel
  coefficient a = -0.5, so it differs from plain bicubic even when upsampling.
* ``bicubic``: plain bicubic (a = -0.75), as Hugging Face's ``Dinov2Model`` does (and,
  up to a 0.1-patch offset, Meta's models without registers). Features of
  ``microsoft/rad-dino`` or ``facebook/dinov2-*`` match transformers only in this mode.

Both are computed once per grid size and reused while the embedding is not being
trained, instead of on every forward pass.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn

INTERPOLATIONS = ("bicubic_antialias", "bicubic")


def resample_grid(pos_embed: torch.Tensor, old_grid: tuple[int, int], new_grid: tuple[int, int], mode: str) -> torch.Tensor:
    """Resample patch position embeddings ``[1, old_h*old_w, E]`` -> ``[1, new_h*new_w, E]``."""
    if tuple(old_grid) == tuple(new_grid):
        return pos_embed
    dim = pos_embed.shape[-1]
    grid = pos_embed.float().reshape(1, old_grid[0], old_grid[1], dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=new_grid, mode="bicubic", align_corners=False, antialias=mode == "bicubic_antialias")
    return grid.permute(0, 2, 3, 1).reshape(1, -1, dim).to(pos_embed.dtype)


def _pos_embed_cached(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Drop-in for timm ``VisionTransformer._pos_embed`` with ``dynamic_img_size=True``.

    ``x`` is the patch embedding ``[B, H, W, C]``; returns tokens ``[B, prefix + H*W, C]``.
    """
    batch, height, width, channels = x.shape
    class_in_grid = 0 if self.no_embed_class else self.num_prefix_tokens
    prefix_pos, patch_pos = self.pos_embed[:, :class_in_grid], self.pos_embed[:, class_in_grid:]

    cacheable = not (torch.is_grad_enabled() and self.pos_embed.requires_grad)
    # int() under torch.onnx.export only: there the sizes are traced values, and as ints the
    # export finds the grid cached by a warm-up pass and records it as a constant (no bicubic
    # op in ONNX). Under torch.jit.trace they stay as they are: its check_trace re-traces,
    # and a cache hit on the second pass would make the two graphs differ.
    if torch.onnx.is_in_onnx_export():
        height, width = int(height), int(width)
    key = (height, width, patch_pos.dtype, patch_pos.device)
    # The parameter's version counter moves with every in-place change (an optimiser
    # step, load_state_dict), so a grid resampled from older values is never reused.
    version = (self.pos_embed.data_ptr(), self.pos_embed._version)
    cached = self._volumes_pos_cache.get(key) if cacheable else None
    resampled = cached[1] if cached is not None and cached[0] == version else None
    if resampled is None:
        resampled = resample_grid(patch_pos, tuple(self.patch_embed.grid_size), (height, width), self._volumes_pos_mode)
        if cacheable:
            self._volumes_pos_cache[key] = (version, resampled.detach())
    pos = torch.cat([prefix_pos, resampled], dim=1)

    tokens = x.reshape(batch, height * width, channels)
    prefix = [t.expand(batch, -1, -1) for t in (self.cls_token, self.reg_token) if t is not None]
    if self.no_embed_class:
        tokens = tokens + pos
        tokens = torch.cat(prefix + [tokens], dim=1)
    else:
        tokens = torch.cat(prefix + [tokens], dim=1) + pos
    return self.pos_drop(tokens)


def install(backbone: nn.Module, mode: str) -> bool:
    """Make ``backbone`` resample its position grid with ``mode``, cached per size.

    Returns False (and changes nothing) for backbones without an absolute position
    grid, such as DINOv3's rotary embeddings.
    """
    if getattr(backbone, "pos_embed", None) is None or not getattr(backbone, "dynamic_img_size", False):
        return False
    backbone._volumes_pos_mode = mode
    backbone._volumes_pos_cache = {}
    backbone._pos_embed = types.MethodType(_pos_embed_cached, backbone)
    return True


def clear_cache(backbone: nn.Module) -> None:
    """Forget cached grids (after loading new weights or an optimiser step on pos_embed)."""
    if hasattr(backbone, "_volumes_pos_cache"):
        backbone._volumes_pos_cache.clear()

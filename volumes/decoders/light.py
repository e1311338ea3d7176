"""A light 2D decoder on a ViT's patch-token grids: the same interface as the UNETR one at a fraction of its FLOPs.

:class:`SliceUNetDecoder` spends about 1.12 GFLOP per 112 px slice (39% of a 12-block
ViT-S/14): every stage is a MONAI residual block (two 3x3 convolutions and a 1x1 one) on
the concatenation of a transposed-convolution upsampling and a skip, and the deepest
grids enter with all 384 channels. This decoder keeps the shape (grid ``i`` joins at
``2**(3-i)/p`` of the slice; a convolutional stem on the raw slice is the full-resolution
skip, which thin structures such as the aorta need) and cuts the cost where it was spent:

* every grid is projected ``E -> c`` by a 1x1 convolution on its own ``1/p`` grid, before
  anything is upsampled (the projection of an 8x8 grid costs almost nothing);
* upsampling is bilinear on those few channels (no transposed convolutions, no FLOPs);
* each stage is one 3x3 convolution + instance norm + LeakyReLU on ``[upsampled, skip]``
  (``convs=2`` adds a second one), with ``4F, 2F, F`` channels at ``2/p, 4/p, 8/p``;
* at full resolution a one-convolution stem (``3 -> F``) and one fusing convolution
  (``2F -> F``).

FLOPs per slice with the 1x1 head (``scripts/decoder_flops.py``; ViT-S/14 with 12 blocks,
``F = 16``): 0.289 GFLOP against the UNETR decoder's 1.123 at 112 px, 0.101 vs 0.392 of the
encoder's 2.867 (at 224 px 1.156 vs 4.493, 0.094 vs 0.367 of 12.25). Of the 0.289, the two
full-resolution convolutions take 0.126, the three stages 0.151.

Channels-last throughout, with the fast :class:`InstanceNorm2d`, like the UNETR decoder;
exports to ONNX (``OnnxDecoder``) and traces for any slice count and size. The default of
``SliceSegmenter`` and of the segmentation bundle from 0.2.0: phantom-test Dice within
0.01 of the UNETR decoder (docs/PERFORMANCE.md, "A cheaper decoder").
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from volumes.decoders.unet import InstanceNorm2d, decoder_inputs


class ConvNormAct(nn.Sequential):
    """3x3 convolution (no bias) + instance norm (affine) + LeakyReLU(0.01), MONAI's UNETR block defaults."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3):
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
            InstanceNorm2d(out_channels, affine=True),
            nn.LeakyReLU(0.01, inplace=True),
        )


def _stage(in_channels: int, out_channels: int, convs: int) -> nn.Sequential:
    return nn.Sequential(ConvNormAct(in_channels, out_channels),
                         *(ConvNormAct(out_channels, out_channels) for _ in range(convs - 1)))


def _up2(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)


class LightSliceDecoder(nn.Module):
    """Four patch grids ``[N, E, h, w]`` and the slices ``[N, C, H, W]`` -> features ``[N, F, H, W]``.

    Args:
        embed_dim: channels ``E`` of every grid.
        in_channels: channels of the raw slice fed to the stem (3 for the encoder input).
        feature_size: ``F``, channels at full resolution; the stages at ``2/p, 4/p, 8/p``
            have ``4F, 2F, F``.
        patch_size: the encoder's patch size ``p`` (the grids are ``1/p`` of the slice).
        convs: 3x3 convolutions per stage below full resolution (1 or 2).

    A drop-in for :class:`~volumes.decoders.SliceUNetDecoder` in
    :class:`~volumes.networks.SliceSegmenter` (``decoder="light"``): same inputs, same
    output, ``feature_size`` for the head and :class:`~volumes.decoders.Refine3D`.
    """

    def __init__(self, embed_dim: int, in_channels: int = 3, feature_size: int = 16, *, patch_size: int = 14,
                 convs: int = 1):
        super().__init__()
        if convs not in (1, 2):
            raise ValueError(f"LightSliceDecoder: convs must be 1 or 2, got {convs}")
        f = int(feature_size)
        self.patch_size = int(patch_size)
        self.feature_size = f
        widths = (4 * f, 4 * f, 2 * f, f)  # deepest grid (1/p), then the stages at 2/p, 4/p, 8/p
        # grid i -> its stage's width, on its own 1/p grid (grids[3] starts the path)
        self.project = nn.ModuleList(nn.Conv2d(embed_dim, widths[3 - i], kernel_size=1) for i in range(4))
        self.stages = nn.ModuleList(_stage(widths[k] + widths[k + 1], widths[k + 1], convs) for k in range(3))
        self.stem = ConvNormAct(in_channels, f)
        self.final = ConvNormAct(2 * f, f)

    def forward(self, grids: Sequence[torch.Tensor], slices: torch.Tensor) -> torch.Tensor:
        grids, slices = decoder_inputs(type(self).__name__, grids, slices)
        x = self.project[3](grids[3])
        for k, stage in enumerate(self.stages):  # 1/p -> 2/p -> 4/p -> 8/p
            i = 2 - k
            # bilinear, on the projected (few) channels, as x below
            skip = F.interpolate(self.project[i](grids[i]), scale_factor=float(2 ** (k + 1)), mode="bilinear",
                                 align_corners=False)
            x = stage(torch.cat([_up2(x), skip], dim=1))
        # 8/p -> H/2 (p/16 exact in binary for p = 14; a scale factor keeps traces valid for any
        # size, as in SliceUNetDecoder) -> H, on F channels
        if self.patch_size != 16:
            x = F.interpolate(x, scale_factor=self.patch_size / 16, mode="bilinear", align_corners=False)
        x = _up2(x)
        return self.final(torch.cat([x, self.stem(slices)], dim=1))


__all__ = ["LightSliceDecoder", "ConvNormAct"]

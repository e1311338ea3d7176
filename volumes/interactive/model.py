"""The click model: a small class-agnostic 3D network on frozen patch features, intensities and click maps.

Input, in a local window of the working grid (``[W, W, Wz]``, in-plane aligned to the
encoder's patch grid):

* the frozen patch features ``[C, W / p, W / p, Wz]``, projected ``C -> k`` by a 1x1x1
  convolution on the patch grid and upsampled in-plane to the window (bilinear);
* two similarity maps on the patch grid, upsampled the same way: the highest cosine
  similarity of each patch's features (centred on the window's mean) to those of the
  positive clicks' patches, and the same for the negative clicks. This is the prototype
  idea of training-free DINOv2 segmentation, given to the network as evidence: "this
  looks like what was clicked" does not have to be learnt from a few hundred CPU steps;
* the three prepared CT windows ``[3, W, W, Wz]``;
* with ``intensity_cue``, four maps of the image around the clicks (positive, negative):
  the **intensity similarity** (per voxel, the highest ``exp(-d^2 / 2 s^2)`` over the
  clicks, ``d`` the distance of the voxel's three windows, 3 x 3 x 3 averaged, from the
  click's, ``s = 0.1``: the voxel-level twin of the feature similarity) and the
  **geodesic distance** from the clicks as ``exp(-D / 30)`` (:mod:`.geodesic`, DeepIGeoS'
  click encoding: small inside the clicked structure, jumping at its edges). Without
  them, the first model trained here (400 CPU steps, random encoder) drew about the same
  liver-sized blob whatever was clicked: a random encoder's 8 x 8 patch grid is too
  coarse for a kidney, and that budget did not teach the network where the click's
  structure ends;
* the click maps ``[2, W, W, Wz]`` (positive, negative) exactly as MONAI's DeepGrow makes
  them: :class:`monai.apps.deepgrow.transforms.AddGuidanceSignald` (Gaussian of sigma 2
  voxels around each click, scaled to [0, 1]).

The body is MONAI's :class:`~monai.networks.nets.BasicUNet`, the network MONAI Label's
radiology app uses for DeepGrow 3D, with fewer features and at half the in-plane
resolution of the working grid (``scale=2``: intensities and click maps average-pooled
2 x 2 in-plane, logits upsampled back), so a click costs well under a second on two
CPU cores. ``use_features=False``
gives the DeepGrow 3D baseline with the same body, inputs and training: intensities and
clicks only.
"""

from __future__ import annotations

import json
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.apps.deepgrow.transforms import AddGuidanceSignald
from monai.networks.nets import BasicUNet
from torch import nn

__all__ = ["ClickNet", "click_maps", "click_similarity", "clicked_patches", "intensity_cues", "intensity_similarity", "guidance_json", "window_slices", "crop_window", "DEFAULT_FEATURES"]

DEFAULT_FEATURES = (8, 16, 32, 64, 128, 8)


class ClickNet(nn.Module):
    """Logits ``[B, 1, W, W, Wz]`` of the clicked object from features, intensities and click maps.

    Args:
        feature_channels: channels of the stored patch features (layers x embedding size).
        projected: channels the features are projected to (``k``).
        use_features: False for the DeepGrow 3D baseline (intensities and clicks only).
        features: :class:`BasicUNet` feature sizes.
        sigma: click-map Gaussian sigma in voxels (DeepGrow's default 2).
        scale: in-plane downsampling of the body's input (1: full working resolution).
        intensity_cue: add the intensity-similarity and geodesic maps (:func:`intensity_cues`).
    """

    def __init__(self, feature_channels: int, projected: int = 16, *, use_features: bool = True,
                 features: Sequence[int] = DEFAULT_FEATURES, sigma: int = 2, scale: int = 2,
                 intensity_cue: bool = True):
        super().__init__()
        self.scale = int(scale)
        self.feature_channels = int(feature_channels)
        self.use_features = bool(use_features)
        self.sigma = int(sigma)
        self.intensity_cue = bool(intensity_cue)
        self.project = nn.Conv3d(feature_channels, projected, 1) if use_features else None
        in_channels = 3 + 2 + (projected + 2 if use_features else 0) + (4 if intensity_cue else 0)
        self.body = BasicUNet(spatial_dims=3, in_channels=in_channels, out_channels=1, features=tuple(features))
        self.config = {"feature_channels": self.feature_channels, "projected": int(projected),
                       "use_features": self.use_features, "features": list(features), "sigma": self.sigma, "scale": self.scale,
                       "intensity_cue": self.intensity_cue}

    def forward(self, features: torch.Tensor | None, image: torch.Tensor, clicks: torch.Tensor) -> torch.Tensor:
        size = image.shape[2:]
        if self.project is not None:
            if features is None:
                raise ValueError("this click model needs the patch features")
            evidence = torch.cat([self.project(features), click_similarity(features, clicked_patches(clicks, features))], 1)
        cue = intensity_cues(image, clicks, self.scale) if self.intensity_cue else None
        if self.scale > 1:
            kernel = (self.scale, self.scale, 1)
            image, clicks = F.avg_pool3d(image, kernel), F.avg_pool3d(clicks, kernel)
        parts = [image, clicks] + ([cue] if cue is not None else [])
        if self.project is not None:
            evidence = F.interpolate(evidence, size=image.shape[2:], mode="trilinear", align_corners=False)
            parts.insert(0, evidence)
        logits = self.body(torch.cat(parts, dim=1))
        if self.scale > 1:
            logits = F.interpolate(logits, size=size, mode="trilinear", align_corners=False)
        return logits


def clicked_patches(clicks: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """``[B, 2, h, w, d]`` (bool): the patches holding a click, from the click maps ``[B, 2, W, W, Wz]``.

    A click is a local maximum of its Gaussian map (above 0.1).
    """
    return F.adaptive_max_pool3d(click_peaks(clicks).float(), features.shape[2:]) > 0.5


def click_peaks(clicks: torch.Tensor) -> torch.Tensor:
    """``[B, 2, W, W, Wz]`` (bool): the clicks' voxels, local maxima (above 0.1) of their Gaussian maps."""
    return (clicks >= F.max_pool3d(clicks, 3, stride=1, padding=1)) & (clicks > 0.1)


SIMILARITY_WIDTH = 0.1  # of the intensity similarity, in prepared-window units (15 HU in the liver window)


def intensity_similarity(image: torch.Tensor, clicks: torch.Tensor, width: float = SIMILARITY_WIDTH) -> torch.Tensor:
    """``[B, 2, W, W, Wz]``: per voxel, the highest ``exp(-d^2 / 2 width^2)`` over the positive (negative) clicks.

    ``d``: Euclidean distance between the voxel's prepared intensities ``image`` ``[B, 3, ...]``
    (each 3 x 3 x 3 averaged, against noise) and the clicked voxel's. A map with no click is 0.
    """
    return _similarity_to_peaks(_smooth(image), click_peaks(clicks), width)


def _smooth(image: torch.Tensor) -> torch.Tensor:
    """The 3 x 3 x 3 mean of ``image`` ``[B, C, ...]`` (the cues read it, against noise)."""
    return F.avg_pool3d(image, 3, stride=1, padding=1, count_include_pad=False)


def _similarity_to_peaks(smooth: torch.Tensor, peaks: torch.Tensor, width: float) -> torch.Tensor:
    """:func:`intensity_similarity` from the smoothed image and the click voxels (:func:`click_peaks`)."""
    out = torch.zeros(smooth.shape[0], 2, *smooth.shape[2:], dtype=smooth.dtype, device=smooth.device)
    for b in range(smooth.shape[0]):
        for k in range(2):
            points = torch.nonzero(peaks[b, k])
            if len(points) == 0:
                continue
            refs = smooth[b][:, points[:, 0], points[:, 1], points[:, 2]].T  # [N, 3]
            d2 = ((smooth[b][None] - refs[:, :, None, None, None]) ** 2).sum(1)  # [N, W, W, Wz]
            out[b, k] = torch.exp(-d2.amin(0) / (2 * width ** 2))
    return out


GEODESIC_GAMMA = 15.0  # an intensity step of 0.1 (15 HU in the liver window) costs 1.5 voxel lengths
GEODESIC_SCALE = 30.0  # exp(-D / 30): 0.37 thirty voxel lengths along the structure


def intensity_cues(image: torch.Tensor, clicks: torch.Tensor, scale: int = 1) -> torch.Tensor:
    """``[B, 4, W / scale, W / scale, Wz]``: intensity similarity (positive, negative), then geodesic maps.

    The geodesic distance runs on the 3 x 3 x 3 averaged image pooled ``scale x scale`` in-plane
    (the click network's resolution; steps of ``scale`` voxels in-plane, 1 along z), from the
    pooled clicks; ``exp(-D / GEODESIC_SCALE)``, 0 for a side with no click.
    """
    from volumes.interactive.geodesic import geodesic_distance

    smooth, peaks = _smooth(image), click_peaks(clicks)
    similarity = _similarity_to_peaks(smooth, peaks, SIMILARITY_WIDTH)
    peaks = peaks.float()
    if scale > 1:
        kernel = (scale, scale, 1)
        similarity, smooth, peaks = F.avg_pool3d(similarity, kernel), F.avg_pool3d(smooth, kernel), F.max_pool3d(peaks, kernel)
    b = image.shape[0]
    seeds = peaks.reshape(b * 2, *peaks.shape[2:]) > 0.5
    distance = geodesic_distance(smooth.repeat_interleave(2, dim=0), seeds, gamma=GEODESIC_GAMMA,
                                 spacing=(scale, scale, 1))
    geodesic = torch.exp(-distance / GEODESIC_SCALE).reshape(b, 2, *distance.shape[1:])  # inf -> 0
    return torch.cat([similarity, geodesic.to(similarity.dtype)], dim=1)


def click_similarity(features: torch.Tensor, chosen_patches: torch.Tensor) -> torch.Tensor:
    """``[B, 2, h, w, d]``: per patch, the highest cosine similarity to the clicked patches (positive, negative).

    ``chosen_patches`` (bool ``[B, 2, h, w, d]``, :func:`clicked_patches`) marks them. Features are
    centred on the window's mean first (a random or pretrained ViT's patch tokens share a
    large common component). A map with no click is 0.
    """
    b, c = features.shape[:2]
    centred = features - features.mean(dim=(2, 3, 4), keepdim=True)
    flat = F.normalize(centred.reshape(b, c, -1), dim=1)  # [B, C, N]
    out = []
    sims = torch.einsum("bcn,bcm->bnm", flat, flat)  # [B, N, N]
    for k in range(chosen_patches.shape[1]):
        chosen = chosen_patches[:, k].reshape(b, -1)  # [B, N]
        best = sims.masked_fill(~chosen[:, None, :], -1.0).amax(dim=2)  # [B, N]
        best = torch.where(chosen.any(dim=1, keepdim=True), best, torch.zeros_like(best))
        out.append(best.reshape(b, *features.shape[2:]))
    return torch.stack(out, dim=1)


def guidance_json(foreground: Sequence[Sequence[int]], background: Sequence[Sequence[int]]) -> str:
    """Clicks as DeepGrow's guidance: ``[[positive...], [negative...]]``, points ``[flag, x, y, z]``, -1 padding."""
    pos = [[1, *map(int, p)] for p in foreground]
    neg = [[1, *map(int, p)] for p in background]
    n = max(len(pos), len(neg), 1)
    pad = [-1, -1, -1, -1]
    return json.dumps([pos + [pad] * (n - len(pos)), neg + [pad] * (n - len(neg))])


def click_maps(shape: Sequence[int], guidance: str, sigma: int = 2) -> np.ndarray:
    """``[2, *shape]`` click maps of a guidance JSON, by MONAI's :class:`AddGuidanceSignald`."""
    signal = AddGuidanceSignald(image="image", guidance="guidance", sigma=sigma, number_intensity_ch=0)
    out = signal({"image": np.zeros((1, *shape), np.float32), "guidance": guidance})["image"]
    return out.astype(np.float32)


def window_slices(centre: Sequence[int], grid_shape: Sequence[int], window: Sequence[int], patch: int,
                  ) -> list[tuple[int, int]]:
    """The window ``[(start, stop)] * 3`` around ``centre``: in-plane starts on the patch grid, inside the grid
    where it fits (a grid smaller than the window starts at 0 and is padded by :func:`crop_window`)."""
    out = []
    for axis, (c, n, w) in enumerate(zip(centre, grid_shape, window)):
        start = int(c) - w // 2
        if axis < 2:
            start = int(round(start / patch)) * patch
        start = max(0, min(start, n - w)) if n >= w else 0
        if axis < 2:
            start = (start // patch) * patch
        out.append((start, start + w))
    return out


def crop_window(tensor: torch.Tensor, window: Sequence[tuple[int, int]], scale: Sequence[int] = (1, 1, 1),
                value: float = 0.0) -> torch.Tensor:
    """``tensor[..., X, Y, Z]`` cut to ``window`` (divided by ``scale`` per axis), padded with ``value`` past the end."""
    index = [slice(None)] * (tensor.ndim - 3)
    pads = []
    for (start, stop), s, n in zip(window, scale, tensor.shape[-3:]):
        a, b = start // s, stop // s
        index.append(slice(a, min(b, n)))
        pads.append(max(0, b - max(a, n)) if b > n else 0)
    out = tensor[tuple(index)]
    if any(pads):
        out = F.pad(out, (0, pads[2], 0, pads[1], 0, pads[0]), value=value)
    return out

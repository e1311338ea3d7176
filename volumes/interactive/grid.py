"""The working grid of interactive segmentation: where the encoder's slices, the clicks and the masks meet.

A loaded volume ``[1, X, Y, Z]`` (RAS, HU) is prepared the way the segmentation bundle
prepares it (:func:`volumes.transforms.preprocessing`: axial slices, the CT window set,
longer in-plane side resized to ``size`` and padded to the patch size) after one extra
step: slices thinner than the working in-plane spacing are merged along z (linear
interpolation), so a 512 x 512 x 300 CT at 1.5 mm becomes about 112 x 112 x 120 and its
voxels are near-isotropic. Thicker slices are never interpolated up.

:class:`WorkGrid` maps between the two grids exactly as the resampling does (voxel
centres, ``align_corners=False``): :meth:`WorkGrid.to_grid` for click indices,
:meth:`WorkGrid.sample` for probabilities back on the loaded grid, box by box.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from volumes.transforms.slices import slice_geometry

__all__ = ["WorkGrid", "linear_weights"]


def linear_weights(n_out: int, n_in: int, scale: float, offset: float, start: int = 0) -> torch.Tensor:
    """``[n_out, n_in]`` linear-interpolation weights for output voxels ``start .. start + n_out``.

    Output voxel ``i`` sits at input coordinate ``(i + 0.5) * scale - 0.5 + offset``
    (``align_corners=False``); coordinates outside the input clamp to its edge.
    """
    coords = (torch.arange(start, start + n_out, dtype=torch.float64) + 0.5) * scale - 0.5 + offset
    coords = coords.clamp(0, n_in - 1)
    low = coords.floor().long().clamp(max=n_in - 1)
    high = (low + 1).clamp(max=n_in - 1)
    frac = (coords - low).float()
    weights = torch.zeros(n_out, n_in)
    rows = torch.arange(n_out)
    weights[rows, low] += 1 - frac
    weights[rows, high] += frac
    return weights


@dataclass(frozen=True)
class WorkGrid:
    """The loaded grid ``shape`` (X, Y, Z) and the working grid it is prepared onto.

    Attributes:
        shape: the loaded (RAS) volume's spatial shape.
        spacing: its voxel size in mm.
        size: the longer in-plane side after resizing (the bundles' ``size``).
        patch_size: the encoder's patch; in-plane sides are padded to its multiples.
        resample_z: merge slices thinner than the working in-plane spacing.
    """

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    size: int = 112
    patch_size: int = 14
    resample_z: bool = True

    @property
    def geometry(self) -> tuple[tuple[int, int], tuple[int, int], tuple[tuple[int, int], tuple[int, int]]]:
        return slice_geometry(self.shape[:2], self.patch_size, self.size)

    @property
    def slices(self) -> int:
        """Slices of the working grid."""
        x, y, z = self.shape
        if not self.resample_z:
            return z
        inplane_mm = max(x * self.spacing[0], y * self.spacing[1]) / self.size
        if self.spacing[2] >= inplane_mm:
            return z
        return max(1, int(round(z * self.spacing[2] / inplane_mm)))

    @property
    def grid_shape(self) -> tuple[int, int, int]:
        """``(H, W, D)`` of the working grid (padded in-plane sides)."""
        _, padded, _ = self.geometry
        return padded[0], padded[1], self.slices

    @property
    def grid_spacing(self) -> tuple[float, float, float]:
        (h, w), _, _ = self.geometry
        return (self.shape[0] * self.spacing[0] / h, self.shape[1] * self.spacing[1] / w,
                self.shape[2] * self.spacing[2] / self.slices)

    def _axes(self) -> list[tuple[float, float, int]]:
        """Per axis: (grid voxels per loaded voxel, grid offset, grid length)."""
        (h, w), padded, pad = self.geometry
        x, y, z = self.shape
        return [(h / x, pad[0][0], padded[0]), (w / y, pad[1][0], padded[1]), (self.slices / z, 0, self.slices)]

    # ---------------------------------------------------------------- points
    def to_grid(self, points: Sequence[Sequence[int]]) -> np.ndarray:
        """Loaded-grid voxel indices ``[N, 3]`` -> the nearest working-grid voxels ``[N, 3]``."""
        pts = np.asarray(points, dtype=np.float64).reshape(-1, 3)
        out = np.empty_like(pts)
        for axis, (scale, offset, length) in enumerate(self._axes()):
            out[:, axis] = np.clip(np.round((pts[:, axis] + 0.5) * scale - 0.5 + offset), 0, length - 1)
        return out.astype(np.int64)

    # ---------------------------------------------------------------- volumes
    def prepare(self, volume: torch.Tensor, preset: str = "ct_abdomen_windows", label: torch.Tensor | None = None,
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``[1, X, Y, Z]`` HU (and an integer label) -> encoder input ``[3, H, W, D]`` (and label ``[H, W, D]``)."""
        from volumes.transforms import preprocessing

        if tuple(volume.shape[1:]) != self.shape:
            raise ValueError(f"volume of shape {tuple(volume.shape[1:])} does not match the grid's {self.shape}")
        image = torch.as_tensor(volume).float()
        lab = None if label is None else torch.as_tensor(label).reshape(1, *self.shape)
        if self.slices != self.shape[2]:
            target = (*self.shape[:2], self.slices)
            image = F.interpolate(image[None], size=target, mode="trilinear", align_corners=False)[0]
            if lab is not None:
                lab = F.interpolate(lab[None].float(), size=target, mode="nearest-exact")[0].to(lab.dtype)
        data = {"image": image}
        if lab is not None:
            data["label"] = lab
        prepared = preprocessing(("image",), ("label",) if lab is not None else (), preset=preset, axis="axial",
                                 channel_mode="windows", patch_size=self.patch_size, size=self.size)(data)
        out_label = None if lab is None else torch.as_tensor(prepared["label"])[0].round().to(torch.int64)
        return torch.as_tensor(prepared["image"]).float(), out_label

    def box_of(self, window: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
        """The loaded-grid box ``[(start, stop)] * 3`` whose voxel centres fall inside a working-grid window."""
        box = []
        for (start, stop), (scale, offset, _), n in zip(window, self._axes(), self.shape):
            # loaded voxel i -> grid coordinate c(i) = (i + 0.5) * scale - 0.5 + offset; keep start - 0.5 <= c < stop - 0.5
            lo = int(np.ceil((start - offset) / scale - 0.5 - 1e-9))
            hi = int(np.ceil((stop - offset) / scale - 0.5 - 1e-9))
            box.append((max(0, lo), min(n, hi)))
        return box

    def sample(self, grid_values: torch.Tensor, box: Sequence[tuple[int, int]] | None = None) -> torch.Tensor:
        """Working-grid values ``[H, W, D]`` -> the loaded grid (``box`` of it), trilinear (separable)."""
        box = box or [(0, n) for n in self.shape]
        out = grid_values.float()
        for axis, ((start, stop), (scale, offset, length)) in enumerate(zip(box, self._axes())):
            weights = linear_weights(stop - start, length, scale, offset, start)
            out = torch.movedim(torch.tensordot(weights, torch.movedim(out, axis, 0), dims=1), 0, axis)
        return out



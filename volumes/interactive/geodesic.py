"""Geodesic distance from clicks on the image: the click encoding of DeepIGeoS (Wang et al., TPAMI 2019).

The cost of a step between two 6-neighbour voxels is ``sqrt(s^2 + (gamma * |I_p - I_q|)^2)``:
``s`` the step's length in voxels, ``I`` the voxel's (multi-channel) intensities. The
distance from the seeds is the cheapest path's cost, so it stays small inside the
clicked structure and jumps where a path must cross an edge: the map says "connected to
the click without crossing an edge", which a Gaussian click map does not.

Computed by raster scans (forward and backward along each axis, repeated): each scan is
a loop over one axis with whole-plane tensor operations, about 30 ms for a 56 x 56 x 32
window on two CPU cores. FastGeodis (MONAI Label's scribbles use it) does the same in a
compiled extension, but it ships no wheel and its source build fails here, so the scan
is written in torch.
"""

from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["geodesic_distance"]


def geodesic_distance(image: torch.Tensor, seeds: torch.Tensor, gamma: float = 20.0,
                      spacing: Sequence[float] = (1.0, 1.0, 1.0), iterations: int = 2) -> torch.Tensor:
    """``[B, X, Y, Z]`` geodesic distances (in voxel lengths) from ``seeds`` on ``image``.

    Args:
        image: ``[B, C, X, Y, Z]`` intensities (ours: the prepared CT windows in ``[0, 1]``).
        seeds: ``[B, X, Y, Z]`` bool; a batch entry with no seed gets ``inf`` everywhere.
        gamma: weight of an intensity step against a spatial one (0: Euclidean-like distance).
        spacing: step lengths along X, Y, Z.
        iterations: rounds of the six scans (two reach paths that turn twice per axis).
    """
    if image.ndim != 5 or seeds.shape != (image.shape[0], *image.shape[2:]):
        raise ValueError(f"image [B, C, X, Y, Z] and seeds [B, X, Y, Z] expected, got {tuple(image.shape)} "
                         f"and {tuple(seeds.shape)}")
    image = image.float()
    distance = torch.where(seeds, 0.0, float("inf"))
    costs = []
    for axis, step in zip((1, 2, 3), spacing):
        diff = torch.diff(image, dim=axis + 1)  # [B, C, ...] one shorter along the axis
        costs.append(torch.sqrt(float(step) ** 2 + (gamma ** 2) * (diff * diff).sum(1)))
    for _ in range(iterations):
        for axis, cost in zip((1, 2, 3), costs):
            n = distance.shape[axis]
            for i in range(1, n):  # forward
                here = distance.select(axis, i)
                torch.minimum(here, distance.select(axis, i - 1) + cost.select(axis, i - 1), out=here)
            for i in range(n - 2, -1, -1):  # backward
                here = distance.select(axis, i)
                torch.minimum(here, distance.select(axis, i + 1) + cost.select(axis, i), out=here)
    return distance

"""Intensity GraphCut from clicks: a training-free interactive-segmentation baseline.

This is the reference point for ``docs/INTERACTIVE.md``: what a user gets from a few clicks with no
learned model at all, in the manner of MONAI Label's scribbles GraphCut (histogram likelihoods plus a
contrast-sensitive Potts term, solved exactly by one min-cut; Boykov & Jolly 2001).

How it works, inside a region of interest (the clicks' bounding box grown by ``margin_mm``):

* Intensity model: one 1D histogram of foreground samples (voxels within ``click_radius_mm`` of a
  positive click) and one of background samples (voxels near negative clicks plus the ROI's outer
  1-voxel shell, which is assumed to be background). Unary cost of a label = ``-log p(intensity)``.
* Pairwise term: 6-neighbour, ``smoothness * exp(-(Ii - Ij)^2 / (2 contrast^2)) / distance_mm``, so
  cutting along strong intensity edges is cheap.
* Hard constraints: the balls around clicks are forced to their side.
* Post-processing: only the connected components that hold a positive click are kept.

Limits: there is one intensity histogram per side and nothing else (no shape, no texture, no
anatomy). It fails where the object's intensity matches its neighbours' (liver against spleen or
muscle, a tumour isoattenuating to its organ): the mask then leaks into every touching structure of
similar HU, and only negative clicks placed in the leak (which both force that ball to background and
put its intensities into the background histogram) can hold it back. An object whose intensity range
also occurs at the ROI's border is pulled towards background.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from volumes._optional import require

__all__ = ["graphcut_segment"]

_BINS = 64
_HISTOGRAM_SIGMA_BINS = 1.0
# Additive (Laplace) smoothing: this share of each histogram's mass is spread evenly over the bins, so an
# intensity neither side has seen costs the same on both sides and the pairwise term decides.
_UNIFORM_SHARE = 0.01


def graphcut_segment(
    image: np.ndarray,
    foreground: Sequence[Sequence[int]],
    background: Sequence[Sequence[int]] = (),
    *,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    smoothness: float = 5.0,
    contrast_hu: float | None = None,
    click_radius_mm: float = 5.0,
    margin_mm: float = 60.0,
) -> np.ndarray:
    """Segment the object under the positive clicks of a CT volume by an intensity graph cut.

    A training-free baseline (see the module docstring and ``docs/INTERACTIVE.md``), as MONAI
    Label's scribbles GraphCut: one intensity histogram per side, contrast-sensitive smoothing,
    clicks as hard constraints, then only the connected components holding a positive click.
    It fails where the object's intensity matches its neighbours'; negative clicks in the leak help.

    Args:
        image: 3D array ``[X, Y, Z]`` of intensities (HU for CT).
        foreground: voxel indices ``(x, y, z)`` of positive clicks; at least one.
        background: voxel indices ``(x, y, z)`` of negative clicks.
        spacing: voxel size in mm along ``x, y, z``.
        smoothness: weight of the pairwise term (per mm of neighbour distance); 0 gives the
            pure per-voxel likelihood decision.
        contrast_hu: the intensity step that counts as an edge; ``None`` estimates it as the
            root-mean-square of neighbour differences in the ROI.
        click_radius_mm: radius of the ball around each click that is sampled for the histograms
            and forced to the click's side.
        margin_mm: how far the ROI reaches beyond the clicks' bounding box, per side.

    Returns:
        Boolean mask of ``image``'s shape; False outside the ROI. Every positive click voxel is
        True and every negative click voxel False.

    Raises:
        ValueError: no positive click, a click outside the image or not a 3-index, the same voxel
            clicked both positive and negative, non-finite intensities in the ROI, a bad parameter.
    """
    image = np.asarray(image)
    if image.ndim != 3:
        raise ValueError(f"image must be 3D [X, Y, Z], got shape {image.shape}")
    shape = tuple(int(n) for n in image.shape)
    spacing_arr = np.asarray(spacing, dtype=np.float64)
    if spacing_arr.shape != (3,) or not np.all(np.isfinite(spacing_arr)) or np.any(spacing_arr <= 0):
        raise ValueError(f"spacing must be 3 positive numbers (mm), got {tuple(spacing)}")
    for name, value in (("smoothness", smoothness), ("click_radius_mm", click_radius_mm), ("margin_mm", margin_mm)):
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    if contrast_hu is not None and not (math.isfinite(contrast_hu) and contrast_hu > 0):
        raise ValueError(f"contrast_hu must be a positive number or None, got {contrast_hu!r}")

    pos = _clicks(foreground, shape, "foreground")
    neg = _clicks(background, shape, "background")
    if len(pos) == 0:
        raise ValueError("graphcut_segment needs at least one foreground (positive) click, got none")
    clash = set(map(tuple, pos.tolist())) & set(map(tuple, neg.tolist()))
    if clash:
        raise ValueError(f"voxel(s) {sorted(clash)} clicked both foreground and background")

    # ROI: bounding box of all clicks grown by margin_mm per axis, clipped to the image.
    all_clicks = np.concatenate([pos, neg]) if len(neg) else pos
    grow = np.ceil(margin_mm / spacing_arr).astype(int)
    lo = np.maximum(all_clicks.min(axis=0) - grow, 0)
    hi = np.minimum(all_clicks.max(axis=0) + grow + 1, shape)
    roi = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    sub = image[roi].astype(np.float64)
    if not np.all(np.isfinite(sub)):
        raise ValueError(f"image has {int(np.sum(~np.isfinite(sub)))} non-finite voxels inside the ROI {roi}")
    pos_roi, neg_roi = pos - lo, neg - lo

    # Hard seeds: balls around the clicks; where balls of both signs overlap, the nearer click wins.
    dist_pos = _distance_to_clicks(sub.shape, pos_roi, spacing_arr)
    dist_neg = _distance_to_clicks(sub.shape, neg_roi, spacing_arr)
    fg_seed = (dist_pos <= click_radius_mm) & (dist_pos < dist_neg)
    bg_seed = (dist_neg <= click_radius_mm) & (dist_neg <= dist_pos)
    fg_seed[tuple(pos_roi.T)] = True
    bg_seed[tuple(pos_roi.T)] = False
    if len(neg_roi):
        bg_seed[tuple(neg_roi.T)] = True
        fg_seed[tuple(neg_roi.T)] = False

    shell = np.ones(sub.shape, dtype=bool)
    shell[tuple(slice(1, -1) for _ in sub.shape)] = False
    shell &= ~fg_seed & ~bg_seed

    # Unary costs from the two histograms (a light Gaussian over bins, then Laplace smoothing). The
    # background histogram gives the negative clicks' balls and the ROI shell equal weight, so a few
    # clicked voxels are not drowned by the thousands of shell voxels.
    i_min, i_max = float(sub.min()), float(sub.max())
    if i_max <= i_min:
        i_max = i_min + 1.0
    edges = np.linspace(i_min, i_max, _BINS + 1)
    bin_of = np.clip(np.digitize(sub, edges[1:-1]), 0, _BINS - 1)
    cost_fg = -np.log(_density(bin_of[fg_seed]))[bin_of]
    cost_bg = -np.log(_density(bin_of[bg_seed], bin_of[shell]))[bin_of]
    base = np.minimum(cost_fg, cost_bg)
    cost_fg -= base
    cost_bg -= base

    # Pairwise weights along each axis (edge from a voxel to its +1 neighbour).
    diffs = [np.diff(sub, axis=a) for a in range(3)]
    if contrast_hu is None:
        squares = np.concatenate([d.ravel() ** 2 for d in diffs])
        contrast = math.sqrt(float(squares.mean())) if squares.size else 1.0
        contrast = max(contrast, 1e-3)
    else:
        contrast = float(contrast_hu)

    # Infinity for hard seeds: more than any cut through all finite edges can cost.
    infinite = 1.0 + float(cost_fg.sum() + cost_bg.sum()) + 6.0 * smoothness / float(spacing_arr.min()) * sub.size

    # Source side = foreground. A node pays its sink capacity when it stays with the source.
    maxflow = require("maxflow", "the GraphCut baseline")
    graph = maxflow.Graph[float]()
    nodes = graph.add_grid_nodes(sub.shape)
    if smoothness > 0:
        for axis, diff in enumerate(diffs):
            if diff.shape[axis] == 0:
                continue
            weights = np.zeros(sub.shape, dtype=np.float64)
            index = [slice(None)] * 3
            index[axis] = slice(0, -1)
            weights[tuple(index)] = smoothness * np.exp(-(diff**2) / (2.0 * contrast**2)) / spacing_arr[axis]
            structure = np.zeros((3, 3, 3))
            offset = [1, 1, 1]
            offset[axis] = 2
            structure[tuple(offset)] = 1.0
            graph.add_grid_edges(nodes, weights=weights, structure=structure, symmetric=True)
    source_caps = np.where(fg_seed, infinite, np.where(bg_seed, 0.0, cost_bg))
    sink_caps = np.where(bg_seed, infinite, np.where(fg_seed, 0.0, cost_fg))
    graph.add_grid_tedges(nodes, source_caps, sink_caps)
    graph.maxflow()
    fg = ~graph.get_grid_segments(nodes)
    fg |= fg_seed
    fg &= ~bg_seed

    # Keep the components (6-connected, as the graph) that hold a positive click.
    labels, _ = ndimage.label(fg)
    keep = np.unique(labels[tuple(pos_roi.T)])
    keep = keep[keep > 0]
    out = np.zeros(shape, dtype=bool)
    out[roi] = np.isin(labels, keep)
    return out


def _clicks(clicks: Sequence[Sequence[int]], shape: tuple[int, ...], side: str) -> np.ndarray:
    """Clicks as an ``(n, 3)`` int array; ValueError naming the click if it is not a voxel of ``shape``."""
    out = []
    for click in clicks:
        try:
            values = list(click)
        except TypeError:
            raise ValueError(f"{side} click {click!r} is not a voxel index (x, y, z)") from None
        if len(values) != 3 or not all(_is_integral(v) for v in values):
            raise ValueError(f"{side} click {click!r} is not a voxel index (x, y, z) of 3 integers")
        index = tuple(int(v) for v in values)
        if not all(0 <= i < n for i, n in zip(index, shape)):
            raise ValueError(f"{side} click {index} is outside the image of shape {shape}")
        out.append(index)
    return np.asarray(out, dtype=np.int64).reshape(-1, 3)


def _is_integral(value: object) -> bool:
    if isinstance(value, (bool, np.bool_)):
        return False
    if isinstance(value, (int, np.integer)):
        return True
    return isinstance(value, (float, np.floating)) and float(value).is_integer()


def _distance_to_clicks(shape: tuple[int, ...], clicks: np.ndarray, spacing: np.ndarray) -> np.ndarray:
    """Euclidean distance in mm from every voxel to the nearest click (inf with no clicks)."""
    best = np.full(shape, np.inf)
    grids = [np.arange(n, dtype=np.float64) for n in shape]
    for click in clicks:
        dx, dy, dz = (((g - c) * s) ** 2 for g, c, s in zip(grids, click, spacing))
        np.minimum(best, np.sqrt(dx[:, None, None] + dy[None, :, None] + dz[None, None, :]), out=best)
    return best


def _density(*samples: np.ndarray) -> np.ndarray:
    """Probability per bin: the equal-weight mixture of the smoothed histograms of the non-empty
    sample sets (bin indices), plus the uniform Laplace share. Uniform when every set is empty."""
    parts = []
    for bins in samples:
        if bins.size:
            counts = np.bincount(bins.ravel(), minlength=_BINS).astype(np.float64)
            counts = ndimage.gaussian_filter1d(counts, _HISTOGRAM_SIGMA_BINS, mode="constant")
            parts.append(counts / counts.sum())
    mixture = np.mean(parts, axis=0) if parts else np.full(_BINS, 1.0 / _BINS)
    return (1.0 - _UNIFORM_SHARE) * mixture + _UNIFORM_SHARE / _BINS

"""The figure of each case of ``python -m volumes infer``: three views, the mask, slice importance, QC.

:func:`case_figure` draws one case: axial, coronal and sagittal views of the volume in
radiological convention, the segmentation overlaid semi-transparently with one fixed
colour per label, for a volume classifier its slice importance against the axial slice
index, and the segmentation's quality-control flag as a badge (:func:`quality_badge`). The
figure is a PNG written atomically; ``report.html`` (:mod:`volumes.inference.report`)
shows it.

Display conventions (volumes are ``[X, Y, Z]`` arrays in RAS+ voxel order, x toward the
patient's Right, y Anterior, z Superior):

* axial: patient's right on the viewer's left, anterior up;
* coronal: patient's right on the viewer's left, superior up;
* sagittal: anterior on the viewer's left, superior up;
* each pixel is drawn with the physical aspect of its voxel spacing;
* label ``k`` (``k >= 1``) always has colour :func:`label_colour` ``(k)`` (matplotlib's
  qualitative *tab10* then *tab20* light colours, greys left out so they never look like
  tissue), blended with alpha :data:`OVERLAY_ALPHA`; background is transparent.

matplotlib is only needed by :func:`case_figure`; it is imported there (object API with
the Agg canvas, never pyplot's global state).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from volumes._optional import require
from volumes.arrays import as_numpy
from volumes.atomic import atomic_path

__all__ = [
    "FIGURE_DPI",
    "FIGURE_SIZE",
    "FIGURE_SIZE_WITH_IMPORTANCE",
    "OVERLAY_ALPHA",
    "QC_COLOURS",
    "SOFT_TISSUE_WINDOW",
    "case_figure",
    "display_window",
    "label_colour",
    "quality_badge",
]

#: Opacity of the label overlay on the grey-scale image.
OVERLAY_ALPHA = 0.45
#: Default (level, width) for data that look like CT in Hounsfield units.
SOFT_TISSUE_WINDOW = (40.0, 400.0)
#: Figure resolution and sizes (inches): three views, or three views plus the importance plot.
FIGURE_DPI = 100
FIGURE_SIZE = (12.0, 4.0)
FIGURE_SIZE_WITH_IMPORTANCE = (16.0, 4.0)
#: At most this many labels are named in the legend (the largest ones); the rest are counted.
MAX_LEGEND_ENTRIES = 12

# matplotlib's tab10 without its grey, then tab20's light colours without theirs.
_PALETTE_HEX = (
    "1f77b4", "ff7f0e", "2ca02c", "d62728", "9467bd", "8c564b", "e377c2", "bcbd22", "17becf",
    "aec7e8", "ffbb78", "98df8a", "ff9896", "c5b0d5", "c49c94", "f7b6d2", "dbdb8d", "9edae5",
)  # fmt: skip
_PALETTE = tuple(tuple(int(h[i : i + 2], 16) / 255.0 for i in (0, 2, 4)) for h in _PALETTE_HEX)


def label_colour(index: int) -> tuple[float, float, float]:
    """The fixed RGB colour (0..1) of label ``index`` (``index >= 1``); the palette repeats after 18."""
    if index < 1:
        raise ValueError(f"label {index} is background and has no colour")
    return _PALETTE[(int(index) - 1) % len(_PALETTE)]


# --------------------------------------------------------------------------- figure


def _volume_array(array: Any, name: str) -> np.ndarray:
    """A numpy copy of a numpy array or (Meta)Tensor, a leading channel of size 1 dropped; must be 3D."""
    out = as_numpy(array)
    if out.ndim == 4 and out.shape[0] == 1:
        out = out[0]
    if out.ndim != 3 or min(out.shape) < 1:
        raise ValueError(f"{name} must be a non-empty [X, Y, Z] array, got shape {tuple(out.shape)}")
    return out


def display_window(volume: np.ndarray, window: tuple[float, float] | None = None) -> tuple[float, float]:
    """The (low, high) intensities mapped to black and white.

    ``window=(level, width)`` if given; otherwise the soft-tissue window
    :data:`SOFT_TISSUE_WINDOW` when the data look like CT in HU (minimum below -500), else
    the 1st to 99th percentile. Never returns ``high <= low`` (a constant volume gets a
    window of width 1 around its value, drawn mid-grey).
    """
    if window is not None:
        level, width = (float(v) for v in window)
        if not (math.isfinite(level) and math.isfinite(width) and width > 0):
            raise ValueError(f"window must be a finite (level, width) with width > 0, got {window!r}")
        return level - width / 2.0, level + width / 2.0
    # Percentiles of a regular sub-grid of at most ~2 million voxels (a 512x512x600 CT is 157 M).
    step = max(1, math.ceil((volume.size / 2e6) ** (1.0 / volume.ndim)))
    sample = np.asarray(volume[(slice(None, None, step),) * volume.ndim], dtype=np.float64)
    finite = sample[np.isfinite(sample)]
    if finite.size == 0:
        return 0.0, 1.0
    minimum = float(np.min(volume))  # the whole volume: a thin strip of air must still count
    if not math.isfinite(minimum):
        minimum = float(finite.min())
    if minimum < -500.0:
        level, width = SOFT_TISSUE_WINDOW
        return level - width / 2.0, level + width / 2.0
    low, high = (float(v) for v in np.percentile(finite, [1.0, 99.0]))
    if not high > low:
        return low - 0.5, low + 0.5
    return low, high


def _radiological(plane: np.ndarray) -> np.ndarray:
    """A plane indexed ``[horizontal, vertical]`` in RAS+ order, as rows top-down and columns left-right.

    Axial ``[x, y]``, coronal ``[x, z]`` and sagittal ``[y, z]`` all need the same turn:
    the vertical axis (y or z) increasing upward, the horizontal one (x or y) increasing
    to the viewer's left, i.e. patient's right / anterior on the left.
    """
    return plane.T[::-1, ::-1]


def _foreground_profiles(labels: np.ndarray) -> list[np.ndarray]:
    """Foreground voxel counts per plane along each axis (no coordinate arrays: a CT-sized
    label map has millions of foreground voxels)."""
    foreground = labels > 0
    return [np.count_nonzero(foreground, axis=tuple(a for a in range(3) if a != axis)) for axis in range(3)]


def _nearest_with_foreground(profile: np.ndarray, index: int) -> int:
    """``index``, or the plane nearest to it that holds foreground (``profile``: counts per plane)."""
    planes = np.flatnonzero(profile)
    if len(planes) == 0 or index in planes:
        return index
    return int(planes[np.argmin(np.abs(planes - index))])


def _cut_positions(
    shape: tuple[int, int, int], labels: np.ndarray | None, importance: np.ndarray | None
) -> tuple[int, int, int]:
    """(x, y, z) of the sagittal, coronal and axial cuts."""
    centre = [s // 2 for s in shape]
    profiles = _foreground_profiles(labels) if labels is not None else None
    found = profiles is not None and profiles[0].sum() > 0
    if found:
        centre = [int(round(float(np.arange(len(p)) @ p / p.sum()))) for p in profiles]
    x, y, z = (min(max(c, 0), s - 1) for c, s in zip(centre, shape))
    if found:
        # A centroid can fall between organs; then cut at the nearest plane that shows some.
        x, y, z = (_nearest_with_foreground(profile, c) for profile, c in zip(profiles, (x, y, z)))
    if importance is not None:
        finite = np.where(np.isfinite(importance), importance, -np.inf)
        if np.isfinite(finite).any():
            z = int(np.argmax(finite))
    return x, y, z


def _legend_labels(labels: np.ndarray, names: Sequence[str]) -> tuple[list[tuple[int, str]], int]:
    """(index, name) of the labels present (the largest :data:`MAX_LEGEND_ENTRIES`), and how many more."""
    top = int(labels.max()) if labels.size else 0
    if top <= 255:  # the usual case: count each value in place, no sorted copy of the foreground
        counts = np.array([np.count_nonzero(labels == k) for k in range(1, top + 1)], dtype=np.int64)
        values = np.flatnonzero(counts) + 1
        counts = counts[values - 1]
    else:
        values, counts = np.unique(labels[labels > 0], return_counts=True)
    order = np.argsort(-counts, kind="stable")[:MAX_LEGEND_ENTRIES]
    shown = sorted(int(values[i]) for i in order)
    entries = [(k, str(names[k]) if k < len(names) and names[k] else f"label {k}") for k in shown]
    return entries, len(values) - len(shown)


def _overlay_rgba(plane: np.ndarray, max_label: int) -> np.ndarray:
    """RGBA image of a label plane: label colour at :data:`OVERLAY_ALPHA`, background transparent."""
    lut = np.zeros((max_label + 1, 4), dtype=np.float32)
    for k in range(1, max_label + 1):
        lut[k, :3] = label_colour(k)
        lut[k, 3] = OVERLAY_ALPHA
    return lut[np.clip(plane, 0, max_label)]


def case_figure(
    volume: Any,
    spacing: Sequence[float],
    path: str | Path,
    *,
    label_map: Any = None,
    labels: Sequence[str] = (),
    importance: Any = None,
    top_slices: Iterable[int | Mapping[str, Any]] = (),
    title: str = "",
    window: tuple[float, float] | None = None,
    badge: tuple[str, str] | None = None,
) -> Path:
    """Draw one case (three orthogonal views, optional mask and slice importance) to a PNG.

    Args:
        volume: ``[X, Y, Z]`` intensities in RAS+ voxel order (numpy or torch; a leading
            channel of size 1 is dropped), CT in HU or MR in arbitrary units.
        spacing: voxel size ``(sx, sy, sz)`` in mm; sets the pixel aspect of each view.
        path: the PNG to write (atomically; parent folders are created).
        label_map: optional integer ``[X, Y, Z]`` labels on the same grid, 0 = background.
        labels: label names by index (``labels[0]`` is background); unnamed labels are
            called ``"label k"``.
        importance: optional slice importance of a volume classifier, one value per axial
            slice (length Z); adds a fourth panel and puts the axial cut at its maximum.
        top_slices: z indices (or ``{"slice": z, ...}`` dicts as in predictions.jsonl) to
            mark on the importance plot.
        title: figure title.
        window: ``(level, width)``; default see :func:`display_window`.
        badge: ``(text, colour)`` drawn in a coloured box at the top left (the quality-control
            flag: :func:`quality_badge`).

    The axial cut is at the most important slice when ``importance`` is given, else at the
    centroid of the label foreground, else at the centre; coronal and sagittal cuts go
    through the label centroid (or the centre). A centroid cut that misses every label
    (organs on both sides of it) moves to the nearest plane that shows one. Views follow the radiological convention
    described in the module docstring.

    Returns:
        ``Path(path)``.

    Raises:
        ValueError: shapes that do not match, a bad spacing or window, an importance whose
            length is not the number of axial slices, or a top slice outside the volume.
    """
    mpl_figure = require("matplotlib.figure", "the inference report figures")
    mpl_agg = require("matplotlib.backends.backend_agg", "the inference report figures")
    mpl_patches = require("matplotlib.patches", "the inference report figures")

    data = _volume_array(volume, "volume")
    shape = tuple(int(s) for s in data.shape)
    sx, sy, sz = (float(s) for s in (np.asarray(spacing, dtype=np.float64).reshape(-1).tolist()))
    if not all(math.isfinite(s) and s > 0 for s in (sx, sy, sz)):
        raise ValueError(f"spacing must be three positive finite numbers, got {spacing!r}")

    lab: np.ndarray | None = None
    if label_map is not None:
        lab = _volume_array(label_map, "label_map")
        if lab.shape != shape:
            raise ValueError(f"label_map shape {lab.shape} differs from the volume's {shape}")
        if lab.dtype.kind == "f":
            lab = np.rint(lab).astype(np.int32)
        elif lab.dtype.kind == "b":
            lab = lab.view(np.uint8)
        # integer maps are used as they are (uint8 from the segmenter: no CT-sized copy);
        # negative values count as background where they are used

    imp: np.ndarray | None = None
    if importance is not None:
        imp = as_numpy(importance)
        imp = imp.astype(np.float64).reshape(-1)
        if imp.size != shape[2]:
            raise ValueError(
                f"importance has {imp.size} values but the volume has {shape[2]} axial slices; "
                "pass it on the volume's grid"
            )
    marks = sorted({int(t["slice"]) if isinstance(t, Mapping) else int(t) for t in top_slices})
    if marks and not (0 <= marks[0] and marks[-1] < shape[2]):
        raise ValueError(f"top_slices {marks} outside the volume's {shape[2]} axial slices")

    low, high = display_window(data, window)
    cx, cy, cz = _cut_positions(shape, lab, imp)  # type: ignore[arg-type]

    def grey(plane: np.ndarray) -> np.ndarray:
        plane = np.nan_to_num(plane.astype(np.float64), nan=low, posinf=high, neginf=low)
        return np.clip((plane - low) / (high - low), 0.0, 1.0)

    # (caption, grey plane, label plane, row spacing / column spacing, edge letters L R T B)
    cuts = [(slice(None), slice(None), cz), (slice(None), cy, slice(None)), (cx, slice(None), slice(None))]
    captions = [f"axial  z={cz}/{shape[2] - 1}", f"coronal  y={cy}/{shape[1] - 1}", f"sagittal  x={cx}/{shape[0] - 1}"]
    views = [
        (caption, grey(data[cut]), None if lab is None else lab[cut], aspect, letters)
        for caption, cut, aspect, letters in zip(captions, cuts, (sy / sx, sz / sx, sz / sy), ("RLAP", "RLSI", "APSI"))
    ]

    with_importance = imp is not None
    fig = mpl_figure.Figure(figsize=FIGURE_SIZE_WITH_IMPORTANCE if with_importance else FIGURE_SIZE, dpi=FIGURE_DPI)
    mpl_agg.FigureCanvasAgg(fig)
    ncols = 4 if with_importance else 3
    grid = fig.add_gridspec(
        1, ncols, left=0.02, right=0.98, top=0.86, bottom=0.12,
        wspace=0.25 if with_importance else 0.1,
        width_ratios=[1.0, 1.0, 1.0, 1.1] if with_importance else None,
    )  # fmt: skip
    max_label = int(lab.max()) if lab is not None and lab.size else 0
    for col, (caption, plane, plane_labels, aspect, letters) in enumerate(views):
        ax = fig.add_subplot(grid[0, col])
        ax.imshow(_radiological(plane), cmap="gray", vmin=0.0, vmax=1.0, aspect=aspect)
        if plane_labels is not None and max_label > 0:
            ax.imshow(_overlay_rgba(_radiological(plane_labels), max_label), aspect=aspect, interpolation="nearest")
        ax.set_axis_off()
        ax.set_title(caption, fontsize=9)
        style = {"color": "white", "fontsize": 8, "transform": ax.transAxes}
        ax.text(0.02, 0.5, letters[0], ha="left", va="center", **style)
        ax.text(0.98, 0.5, letters[1], ha="right", va="center", **style)
        ax.text(0.5, 0.98, letters[2], ha="center", va="top", **style)
        ax.text(0.5, 0.02, letters[3], ha="center", va="bottom", **style)

    if imp is not None:
        ax = fig.add_subplot(grid[0, 3])
        z = np.arange(imp.size)
        ax.plot(z, imp, color="0.25", linewidth=1.2, marker="." if imp.size <= 64 else None)
        if marks:
            ax.scatter(marks, imp[marks], color="tab:red", zorder=3, s=24, label="top slices")
        ax.axvline(cz, color="tab:blue", linestyle="--", linewidth=1.0, label=f"axial cut z={cz}")
        ax.set_xlim(-0.5, imp.size - 0.5)
        ax.set_xlabel("axial slice (z index)", fontsize=8)
        ax.set_ylabel("importance", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.set_title("slice importance", fontsize=9)
        ax.legend(fontsize=7, loc="best")

    if lab is not None:
        entries, more = _legend_labels(lab, labels)
        if entries:
            handles = [
                mpl_patches.Patch(facecolor=label_colour(k), edgecolor="none", label=name) for k, name in entries
            ]
            if more:
                handles.append(mpl_patches.Patch(facecolor="none", edgecolor="none", label=f"+{more} more"))
            fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 7), fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=11)
    if badge:
        text, colour = badge
        fig.text(0.01, 0.97, text, ha="left", va="top", fontsize=9, color="white", wrap=True,
                 bbox={"boxstyle": "round,pad=0.3", "facecolor": colour, "edgecolor": "none"})

    path = Path(path)
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=FIGURE_DPI)
    return path


#: Badge colours of the quality-control flags.
QC_COLOURS = {"pass": "#2e7d32", "review": "#e65100"}


def quality_badge(quality: Mapping[str, Any] | None, max_reasons: int = 3) -> tuple[str, str] | None:
    """``(text, colour)`` of a segmentation's quality-control result for :func:`case_figure`; None without one."""
    if not quality:
        return None
    flag = str(quality.get("flag", "?"))
    number = lambda v: f"{float(v):.1f}" if isinstance(v, (int, float)) and math.isfinite(v) else "n/a"  # noqa: E731
    text = f"QC {flag} (score {number(quality.get('score'))}, threshold {number(quality.get('threshold'))})"
    reasons = list(quality.get("reasons") or [])
    if reasons:
        text += ": " + "; ".join(reasons[:max_reasons]) + (f" (+{len(reasons) - max_reasons})" if len(reasons) > max_reasons else "")
    return text, QC_COLOURS.get(flag, "#555555")

"""The visual report of ``python -m volumes infer``: one PNG figure per case and one HTML page.

The batch-inference command writes, per case, segmentation masks and classification
probabilities (``predictions.jsonl``). This module turns them into something a person can
check at a glance:

* :func:`case_figure` draws one case: axial, coronal and sagittal views of the volume in
  radiological convention, the segmentation overlaid semi-transparently with one fixed
  colour per label, and, for a volume classifier, its slice importance against the axial
  slice index. The figure is a PNG written atomically.
* :func:`write_report` writes ``report.html``: a summary, the failures, and one section per
  case with the predictions of every bundle (classes as percent, organ volumes in mL, links
  to the mask files, timings per stage) and the case's figure. The page is self-contained
  (inline CSS, no script, no external resource); images and masks are linked by their
  path relative to the report, and every piece of text that comes from a case (ids, file
  names, error messages) is HTML-escaped.

Display conventions of the figure (volumes are ``[X, Y, Z]`` arrays in RAS+ voxel order,
x toward the patient's Right, y Anterior, z Superior):

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

import html
import math
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence
from urllib.parse import quote

import numpy as np

from volumes._optional import require
from volumes.arrays import as_numpy
from volumes.atomic import atomic_path, atomic_write_bytes

__all__ = [
    "OVERLAY_ALPHA",
    "SOFT_TISSUE_WINDOW",
    "case_figure",
    "display_window",
    "label_colour",
    "write_report",
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
    text = f"QC {flag} (score {_number(quality.get('score'), '.1f')}, threshold {_number(quality.get('threshold'), '.1f')})"
    reasons = list(quality.get("reasons") or [])
    if reasons:
        text += ": " + "; ".join(reasons[:max_reasons]) + (f" (+{len(reasons) - max_reasons})" if len(reasons) > max_reasons else "")
    return text, QC_COLOURS.get(flag, "#555555")


# --------------------------------------------------------------------------- HTML report

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 1.5em auto;
       max-width: 1200px; padding: 0 1em; color: #222; line-height: 1.4; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: 0.2em; margin-top: 1.6em; }
h3 { margin: 1em 0 0.3em; font-size: 1.05em; }
.meta, .muted { color: #666; font-size: 0.9em; }
table { border-collapse: collapse; margin: 0.3em 0 0.8em; font-size: 0.92em; }
th, td { border: 1px solid #ddd; padding: 0.2em 0.6em; text-align: left; vertical-align: top; }
th { background: #f4f4f4; font-weight: 600; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.predicted td { font-weight: 600; background: #eef5ff; }
.failures td { background: #fff3f3; }
.error { font-family: ui-monospace, Menlo, Consolas, monospace; white-space: pre-wrap; font-size: 0.88em; }
code { font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 0.9em; }
section.case { border-top: 2px solid #888; margin-top: 2em; }
.bundle { display: inline-block; vertical-align: top; margin-right: 2em; }
img.figure { max-width: 100%; height: auto; border: 1px solid #ddd; }
nav ol { columns: 3; font-size: 0.92em; }
.qc { padding: 0 0.4em; border-radius: 0.3em; color: white; font-weight: 600; }
.qc.pass { background: #2e7d32; } .qc.review { background: #e65100; }
.flagged td { background: #fff6ec; }
"""


def _e(value: Any) -> str:
    """HTML-escaped ``str(value)`` (quotes too, so it is safe in attributes)."""
    return html.escape(str(value), quote=True)


def _href(relative: Any) -> str:
    """A relative file path as an escaped URL: percent-encoded, so ``#``, ``?`` or ``:`` stay part of the name."""
    return _e(quote(str(relative).replace("\\", "/"), safe="/"))


def _number(value: Any, spec: str, unit: str = "") -> str:
    """``format(value, spec) + unit``, or ``"n/a"`` for anything that is not a finite number."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return "n/a"
    if not math.isfinite(number):
        return "n/a"
    return f"{number:{spec}}{unit}"


def _short(digest: Any, n: int = 12) -> str:
    """The first ``n`` characters of a hash, the full hash as a tooltip."""
    if not digest:
        return '<span class="muted">n/a</span>'
    text = str(digest)
    return f'<code title="{_e(text)}">{_e(text[:n])}</code>'


def _anchor(index: int, case_id: str) -> str:
    """A unique, valid HTML id for a case section."""
    slug = re.sub(r"[^A-Za-z0-9_-]+", "-", case_id).strip("-")[:60]
    return f"case-{index}-{slug}" if slug else f"case-{index}"


def _key_value_table(facts: Mapping[str, Any], css: str = "") -> str:
    cls = f' class="{css}"' if css else ""
    body = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in facts.items())
    return f"<table{cls}>{body}</table>"


def _percent(p: Any) -> float | None:
    """A probability 0..1 as percent, None when it is not a number."""
    try:
        return float(p) * 100.0
    except (TypeError, ValueError):
        return None


def _classification_html(row: Mapping[str, Any]) -> str:
    probabilities = row.get("probabilities") or {}
    predicted = row.get("predicted")
    parts = [f"<p>Predicted: <strong>{_e(predicted) if predicted is not None else 'n/a'}</strong></p>"]
    if probabilities:

        def sort_key(item: tuple[str, Any]) -> float:
            try:
                value = float(item[1])
            except (TypeError, ValueError):
                return math.inf
            return -value if math.isfinite(value) else math.inf

        lines = []
        for name, p in sorted(probabilities.items(), key=sort_key):
            cls = ' class="predicted"' if predicted is not None and str(name) == str(predicted) else ""
            lines.append(f'<tr{cls}><td>{_e(name)}</td><td class="num">{_number(_percent(p), ".1f", "%")}</td></tr>')
        parts.append("<table><tr><th>class</th><th>probability</th></tr>" + "".join(lines) + "</table>")
    top = row.get("top_slices") or []
    if top:
        items = []
        for t in top:
            if isinstance(t, Mapping):
                imp = t.get("importance")
                extra = f" ({_number(imp, '.3g')})" if imp is not None else ""
                items.append(f"z={_e(t.get('slice', '?'))}{extra}")
            else:
                items.append(f"z={_e(t)}")
        parts.append(f"<p>Top slices: {', '.join(items)}</p>")
    return "".join(parts)



def _flag_html(flag: Any) -> str:
    flag = str(flag or "n/a")
    return f'<span class="qc {_e(flag)}">{_e(flag)}</span>'


def _segmentation_html(row: Mapping[str, Any]) -> str:
    volumes = row.get("organ_volumes_ml") or {}
    if not volumes:
        return '<p class="muted">No organ volumes.</p>'
    quality = row.get("quality") or {}
    organs = quality.get("organs") or {}
    head = "<tr><th>organ</th><th>volume (mL)</th>" + ("<th>QC</th><th>score</th><th>reasons</th>" if quality else "")
    lines = []
    for k, v in volumes.items():
        cells = f'<td>{_e(k)}</td><td class="num">{_number(v, ".1f")}</td>'
        if quality:
            o = organs.get(k, {})
            cells += (f"<td>{_flag_html(o.get('flag'))}</td><td class=\"num\">{_number(o.get('score'), '.1f')}</td>"
                      f"<td>{_e(', '.join(o.get('reasons') or []))}</td>")
        lines.append(f"<tr>{cells}</tr>")
    summary = ""
    if quality:
        summary = (f"<p>Quality control: {_flag_html(quality.get('flag'))} (score {_number(quality.get('score'), '.2f')}, "
                   f"threshold {_number(quality.get('threshold'), '.2f')}, image z {_number(quality.get('ood_z'), '.2f')})</p>")
    return f"{summary}<table>{head}</tr>{''.join(lines)}</table>"


def _flagged_html(rows: Sequence[Mapping[str, Any]], anchors: Mapping[str, str]) -> str:
    """The segmentations quality control flagged for review, worst first (the report's first table)."""
    checked = [r for r in rows if r.get("quality")]
    if not checked:
        return ""
    flagged = sorted((r for r in checked if r["quality"].get("flag") == "review"),
                     key=lambda r: -float(r["quality"].get("score") or 0.0))
    parts = [f'<section id="quality"><h2>Flagged for review ({len(flagged)} of {len(checked)} segmentations)</h2>']
    if not flagged:
        parts.append("<p>Quality control passed every segmentation.</p></section>")
        return "".join(parts)
    lines = []
    for r in flagged:
        case_id = str(r.get("case_id", ""))
        name = f'<a href="#{anchors[case_id]}">{_e(case_id)}</a>' if case_id in anchors else _e(case_id)
        q = r["quality"]
        organs = ", ".join(k for k, o in (q.get("organs") or {}).items() if o.get("flag") == "review")
        lines.append(f"<tr><td>{name}</td><td>{_e(r.get('bundle', ''))}</td>"
                     f'<td class="num">{_number(q.get("score"), ".1f")}</td><td>{_e(organs)}</td>'
                     f"<td>{_e('; '.join(q.get('reasons') or []))}</td></tr>")
    parts.append('<table class="flagged"><tr><th>case</th><th>bundle</th><th>score</th><th>organs</th>'
                 f"<th>reasons</th></tr>{''.join(lines)}</table>")
    parts.append('<p class="muted">Score: the largest z-score of the quality signs (docs/QC.md); '
                 f"review above the threshold fitted on the validation split "
                 f"({_number(flagged[0]['quality'].get('threshold'), '.2f')}).</p></section>")
    return "".join(parts)


_OUTPUT_NAMES = {"segmentation": "segmentation (NIfTI)", "dicom_seg": "DICOM SEG"}


def _outputs_html(row: Mapping[str, Any]) -> str:
    outputs = {k: v for k, v in (row.get("outputs") or {}).items() if k != "figure" and v}
    if not outputs:
        return ""
    links = [f'<a href="{_href(v)}">{_e(_OUTPUT_NAMES.get(k, k))}</a>' for k, v in outputs.items()]
    return f"<p>Files: {' · '.join(links)}</p>"


def _timings_html(row: Mapping[str, Any]) -> str:
    timings = row.get("timings_s") or {}
    if not timings:
        return ""
    total = 0.0
    for v in timings.values():
        try:
            total += float(v) if math.isfinite(float(v)) else 0.0
        except (TypeError, ValueError):
            pass
    heads = "".join(f"<th>{_e(k)}</th>" for k in timings) + "<th>total</th>"
    cells = "".join(f'<td class="num">{_number(v, ".2f")}</td>' for v in timings.values())
    return (
        f'<table class="timings"><tr><th>seconds</th>{heads}</tr>'
        f'<tr><td></td>{cells}<td class="num">{total:.2f}</td></tr></table>'
    )


def _bundle_html(row: Mapping[str, Any]) -> str:
    task = str(row.get("task", ""))
    version = row.get("bundle_version")
    name = f"{_e(row.get('bundle', '?'))}{' ' + _e(version) if version else ''}"
    head = f"<h3>{name} <span class=\"muted\">({_e(task or 'unknown task')})</span></h3>"
    if task == "classification":
        body = _classification_html(row)
    elif task == "segmentation":
        body = _segmentation_html(row)
    else:
        body = ""
    weights = f'<p class="muted">weights {_short(row.get("weights_sha256"))}</p>' if row.get("weights_sha256") else ""
    return f'<div class="bundle">{head}{body}{_outputs_html(row)}{_timings_html(row)}{weights}</div>'


def _case_html(anchor: str, case_id: str, rows: list[Mapping[str, Any]], failed: list[Mapping[str, Any]]) -> str:
    first = rows[0]
    parts = [
        f'<section class="case" id="{anchor}">',
        f"<h2>{_e(case_id)}</h2>",
        f"<table><tr><th>source</th><td>{_e(first.get('source', 'n/a'))}</td></tr>"
        f"<tr><th>input sha256</th><td>{_short(first.get('input_sha256'))}</td></tr></table>",
    ]
    if failed:
        stages = ", ".join(_e(f.get("stage", "?")) for f in failed)
        parts.append(f'<p class="error">Also failed at: {stages} (see <a href="#failures">failures</a>)</p>')
    parts.extend(_bundle_html(row) for row in rows)
    figure = next((r.get("outputs", {}).get("figure") for r in rows if (r.get("outputs") or {}).get("figure")), None)
    if figure:
        parts.append(
            f'<p><img class="figure" src="{_href(figure)}" alt="views of {_e(case_id)}" loading="lazy"></p>'
        )
    parts.append("</section>")
    return "\n".join(parts)


def write_report(
    output_dir: str | Path,
    rows: Sequence[Mapping[str, Any]],
    failures: Sequence[Mapping[str, Any]],
    *,
    title: str = "volumes inference report",
    summary: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``output_dir/report.html`` (atomically) for the results of one inference run.

    Args:
        output_dir: the run's output folder; figure and mask paths in ``rows`` are relative
            to it, and so are the report's links.
        rows: one dict per (case, bundle) result, as in ``predictions.jsonl``: ``case_id``,
            ``source``, ``input_sha256``, ``bundle``, ``bundle_version``, ``task``,
            ``weights_sha256``; classification rows ``probabilities`` (class -> 0..1),
            ``predicted``, ``top_slices``; segmentation rows ``organ_volumes_ml``;
            any row ``outputs`` (``segmentation``, ``dicom_seg``, ``figure``, ...) and
            ``timings_s`` (stage -> seconds). Missing keys are shown as "n/a" or left out.
        failures: ``{"case_id", "source", "stage", "error"}`` dicts.
        title: page title.
        summary: extra facts shown at the top (e.g. cases, failed, wall time, device).

    Cases appear in the order they first appear in ``rows``; all text from rows, failures
    and summary is HTML-escaped.

    Returns:
        the path of ``report.html``.
    """
    output_dir = Path(output_dir)
    cases: dict[str, list[Mapping[str, Any]]] = {}
    for row in rows:
        cases.setdefault(str(row.get("case_id", "")), []).append(row)
    anchors = {case_id: _anchor(i, case_id) for i, case_id in enumerate(cases)}
    failed_by_case: dict[str, list[Mapping[str, Any]]] = {}
    for failure in failures:
        failed_by_case.setdefault(str(failure.get("case_id", "")), []).append(failure)

    generated = datetime.now(timezone.utc).isoformat(timespec="seconds")
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>",
        f"<header><h1>{_e(title)}</h1><p class=\"meta\">Generated {_e(generated)}</p>",
    ]
    if summary:
        parts.append(_key_value_table(summary, "summary"))
    parts.append("</header>")
    parts.append(_flagged_html(rows, anchors))

    toc = []
    for case_id, anchor in anchors.items():
        tasks = ", ".join(dict.fromkeys(str(r.get("task", "?")) for r in cases[case_id]))
        toc.append(f'<li><a href="#{anchor}">{_e(case_id)}</a> <span class="muted">({_e(tasks)})</span></li>')
    parts.append(f"<nav><h2>Cases ({len(cases)})</h2>")
    parts.append(f"<ol>{''.join(toc)}</ol>" if toc else '<p class="muted">No results.</p>')
    parts.append(f'<p><a href="#failures">Failures ({len(failures)})</a></p></nav>')

    parts.append(f'<section id="failures"><h2>Failures ({len(failures)})</h2>')
    if failures:
        lines = []
        for f in failures:
            case_id = str(f.get("case_id", ""))
            name = f'<a href="#{anchors[case_id]}">{_e(case_id)}</a>' if case_id in anchors else _e(case_id)
            lines.append(
                f"<tr><td>{name}</td><td>{_e(f.get('source', ''))}</td><td>{_e(f.get('stage', ''))}</td>"
                f'<td class="error">{_e(f.get("error", ""))}</td></tr>'
            )
        parts.append(
            '<table class="failures"><tr><th>case</th><th>source</th><th>stage</th><th>error</th></tr>'
            + "".join(lines)
            + "</table>"
        )
    else:
        parts.append("<p>No failures.</p>")
    parts.append("</section>")

    for case_id, case_rows in cases.items():
        parts.append(_case_html(anchors[case_id], case_id, case_rows, failed_by_case.get(case_id, [])))
    parts.append("</body></html>\n")

    text = "\n".join(parts)
    path = output_dir / "report.html"
    atomic_write_bytes(path, lambda stream: stream.write(text.encode("utf-8")))
    return path

"""2D slice classification: per-slice labels for the slices of each volume.

A slice task embeds every slice of every volume once (the same cached per-volume
embeddings as a volume task) and classifies slices. Each datalist item gets

* ``slice_labels``: one class index per slice along the slicing axis;
* ``slice_keep``: which slices take part (e.g. only slices that show the liver, so that
  "lesion or not" is not answered by "liver or not").

Sources of the labels (``source``):

``"datalist"``
    the items carry ``slice_labels`` themselves (a list, one entry per slice of the
    prepared volume along the slicing axis).
``"lesion"``
    a phantom cohort (``python -m volumes phantoms --task lesion``): slices holding lesion
    voxels, from ``cases.json`` beside the datalist (``info["lesion"]["slices"]``).
    Axial slices only (the phantom records lesion slices along z).
an organ name (``"liver"``, ``"spleen"``, ... of :data:`volumes.data.phantoms.ORGANS`) or ``"label:N"``
    whether the slice of the item's label map (``item["label"]``) holds that label value.

``within`` (an organ name or ``"label:N"``) keeps only the slices whose label map holds
that value; ``"all"`` or ``None`` keeps every slice, except that the ``"lesion"`` source
defaults to ``"liver"``. Splits stay by case: slices of one volume never straddle splits.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from volumes.errors import ConfigError, VolumesError

__all__ = ["attach_slice_labels", "label_presence", "slice_label_sources"]


def slice_label_sources() -> list[str]:
    """The accepted ``source`` values (organ names from the phantom label table)."""
    from volumes.data.phantoms import ORGANS

    return ["datalist", "lesion", *[name for name in ORGANS if name != "background"], "label:N"]


def _label_value(name: str) -> int:
    from volumes.data.phantoms import ORGANS

    if name.startswith("label:"):
        try:
            value = int(name.split(":", 1)[1])
        except ValueError:
            raise ConfigError("slice_label", name, "label:N with an integer N") from None
        return value
    if name in ORGANS and name != "background":
        return ORGANS[name]
    raise ConfigError("slice_label", name, slice_label_sources())


@lru_cache(maxsize=256)
def _presence(label_path: str, axis: str) -> np.ndarray:
    """``[D, V]`` bool: which label values 0..V-1 each slice along ``axis`` holds (cached per file)."""
    from volumes.data.io import load_volume
    from volumes.transforms import SLICE_AXES

    label = np.asarray(load_volume(label_path, dtype=np.int16).as_tensor()[0])
    moved = np.moveaxis(label, SLICE_AXES[axis], -1)
    values = int(moved.max()) + 1 if moved.size else 1
    out = np.zeros((moved.shape[-1], max(values, 1)), dtype=bool)
    flat = moved.reshape(-1, moved.shape[-1])
    for value in np.unique(flat):
        out[:, int(value)] = (flat == value).any(axis=0)
    return out


def label_presence(item: dict[str, Any], name: str, axis: str) -> np.ndarray:
    """``[D]`` bool: whether each slice of ``item["label"]`` along ``axis`` holds label ``name``."""
    if "label" not in item or not isinstance(item["label"], str):
        raise ConfigError(f"{item.get('case_id', '?')}.label", item.get("label"),
                          f"a label-map path (needed for slice label / filter {name!r})")
    table = _presence(str(item["label"]), axis)
    value = _label_value(name)
    return table[:, value] if value < table.shape[1] else np.zeros(table.shape[0], dtype=bool)


def _lesion_slices(datalist_dir: Path) -> dict[str, dict]:
    path = datalist_dir / "cases.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise VolumesError(f"{path}: slice_label 'lesion' needs the phantom cohort's cases.json ({exc})") from exc


def attach_slice_labels(
    items: list[dict[str, Any]],
    source: str,
    *,
    datalist_dir: str | Path,
    axis: str = "axial",
    within: str | None = None,
) -> list[dict[str, Any]]:
    """Copies of ``items`` with ``slice_labels`` and ``slice_keep`` (see the module docstring).

    Raises:
        ConfigError: an unknown source or filter, a lesion source on another axis than axial,
            an item without the labels or label map it needs, or lengths that disagree.
    """
    datalist_dir = Path(datalist_dir)
    if source == "lesion" and axis != "axial":
        raise ConfigError("axis", axis, "'axial' for slice_label 'lesion' (phantoms record lesion slices along z)")
    if within is None and source == "lesion":
        within = "liver"
    if within == "all":
        within = None
    if source not in ("datalist", "lesion"):
        _label_value(source)  # validates the name up front
    if within is not None:
        _label_value(within)
    cases = _lesion_slices(datalist_dir) if source == "lesion" else {}
    out = []
    for item in items:
        case_id = item["case_id"]
        if source == "datalist":
            if "slice_labels" not in item:
                raise ConfigError(f"{case_id}.slice_labels", None, "a list of per-slice class labels on every item")
            labels = np.asarray(item["slice_labels"], dtype=np.int64)
        elif source == "lesion":
            info = cases.get(case_id)
            if info is None:
                raise ConfigError(f"{case_id}", None, f"a case in {datalist_dir / 'cases.json'}")
            labels = np.zeros(int(info["shape"][2]), dtype=np.int64)
            lesion = info.get("lesion") or {}
            labels[np.asarray(lesion.get("slices", []), dtype=np.int64)] = 1
        else:
            labels = label_presence(item, source, axis).astype(np.int64)
        keep = np.ones(len(labels), dtype=bool) if within is None else label_presence(item, within, axis)
        if len(keep) != len(labels):
            raise ConfigError(f"{case_id}.slice_labels", len(labels), f"{len(keep)} entries (the slice count)")
        if labels.ndim != 1 or (labels < 0).any():
            raise ConfigError(f"{case_id}.slice_labels", labels.tolist()[:8], "a flat list of class indices >= 0")
        out.append({**item, "slice_labels": labels.tolist(), "slice_keep": keep.tolist()})
    return out

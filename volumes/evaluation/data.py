"""Evaluation data: a MONAI datalist or a MedMNIST 3D archive, split into train / val / test.

:func:`load_evaluation_data` reads

* a MONAI datalist JSON (``training`` / ``validation`` / ``test`` lists of ``{"image": path,
  "class_label": int, ...}``; paths relative to the file's folder), e.g. what
  ``python -m volumes phantoms`` writes; volumes go through ``LoadVolumed`` and
  :func:`volumes.transforms.preprocessing` (intensity preset, slicing axis, slice size);
* a MedMNIST v2 3D ``.npz`` (e.g. AdrenalMNIST3D) with its official splits, through
  :func:`volumes.data.medmnist.load_medmnist3d` and ``PrepareSlicesd`` (no intensity preset:
  the archives hold 0..255 values).

A datalist without a ``validation`` list gets a stratified, seeded share of ``training``
as validation; one without labelled ``test`` items is an error. For a slice task
(``task="slice"``) every item also gets per-slice labels (see :mod:`volumes.evaluation.slices`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from volumes.errors import ConfigError, VolumesError

__all__ = ["SPLITS", "TASKS", "EvaluationData", "load_evaluation_data", "stratified_split"]

SPLITS: tuple[str, ...] = ("train", "val", "test")
TASKS: tuple[str, ...] = ("volume", "slice")
_DATALIST_KEYS = {"train": ("training", "train"), "val": ("validation", "val"), "test": ("test", "testing")}


@dataclass
class EvaluationData:
    """Items of each split plus how to turn an item into encoder input.

    Attributes:
        name: a short description (file name).
        kind: ``"datalist"`` or ``"medmnist3d"``.
        task: ``"volume"`` (one label per volume) or ``"slice"`` (one label per slice).
        splits: ``{"train": [...], "val": [...], "test": [...]}`` of datalist items with
            ``image``, ``class_label`` and ``case_id`` (plus ``slice_labels`` / ``slice_keep``
            for slice tasks).
        num_classes: number of classes ``K``.
        settings: the preprocessing settings (preset, axis, channel mode, size).
    """

    name: str
    kind: str
    task: str
    splits: dict[str, list[dict[str, Any]]]
    num_classes: int
    settings: dict[str, Any] = field(default_factory=dict)

    def transform(self, patch_size: int) -> Callable[[dict], dict]:
        """Item -> ``{"image": [3, H, W, D], ...}`` for an encoder with this patch size (or CNN stride)."""
        from monai.transforms import Compose

        from volumes.transforms import PrepareSlicesd, preprocessing

        s = self.settings
        if self.kind == "medmnist3d":
            return PrepareSlicesd("image", axis="axial", channel_mode=s["channel_mode"], patch_size=patch_size,
                                  size=s["size"])
        from volumes.data.io import LoadVolumed

        return Compose([
            LoadVolumed("image"),
            preprocessing(("image",), preset=s["preset"], axis=s["axis"], channel_mode=s["channel_mode"],
                          patch_size=patch_size, size=s["size"]),
        ])

    def preprocessing(self, patch_size: int) -> dict[str, Any]:
        """The settings that change the encoder input, for embedding-cache keys."""
        return {**self.settings, "patch_size": int(patch_size), "source": self.kind}

    def counts(self) -> dict[str, int]:
        return {split: len(items) for split, items in self.splits.items()}

    def labels(self, split: str) -> list[int]:
        return [int(item["class_label"]) for item in self.splits[split]]


def stratified_split(labels: list[int], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices ``(kept, taken)``: ``fraction`` of each class taken (at least one per class with 2+ members)."""
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0xE7A1]))
    kept, taken = [], []
    for cls in sorted(set(labels)):
        members = [i for i, c in enumerate(labels) if c == cls]
        rng.shuffle(members)
        n = int(round(len(members) * fraction))
        if len(members) >= 2:
            n = min(max(n, 1), len(members) - 1)
        taken += members[:n]
        kept += members[n:]
    return sorted(kept), sorted(taken)


def _check_items(items: list[dict], split: str, label_key: str, source: Path) -> list[dict]:
    out = []
    for index, item in enumerate(items):
        if not isinstance(item, dict) or "image" not in item:
            raise ConfigError(f"{source}:{split}[{index}]", item, "an item with an 'image'")
        if label_key not in item:
            raise ConfigError(f"{source}:{split}[{index}].{label_key}", None, "an integer class label on every item")
        try:
            label = int(item[label_key])
        except (TypeError, ValueError):
            raise ConfigError(f"{source}:{split}[{index}].{label_key}", item[label_key], "an integer class label") from None
        if label < 0:
            raise ConfigError(f"{source}:{split}[{index}].{label_key}", label, "class indices >= 0")
        out.append({**item, "class_label": label, "case_id": str(item.get("case_id", Path(str(item["image"])).name))})
    return out


def _read_datalist(path: Path, label_key: str, val_fraction: float, seed: int) -> dict[str, list[dict]]:
    try:
        datalist = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise VolumesError(f"{path}: not a readable datalist JSON ({exc})") from exc
    if not isinstance(datalist, dict):
        raise VolumesError(f"{path}: a datalist is a JSON object with 'training' / 'validation' / 'test' lists")
    base = path.parent
    splits: dict[str, list[dict]] = {}
    for split, keys in _DATALIST_KEYS.items():
        key = next((k for k in keys if isinstance(datalist.get(k), list) and datalist[k]), None)
        if key is None:
            continue
        items = []
        for item in datalist[key]:
            item = dict(item) if isinstance(item, dict) else item
            if isinstance(item, dict):
                for field_name in ("image", "label"):
                    value = item.get(field_name)
                    if isinstance(value, str) and not Path(value).is_absolute():
                        item[field_name] = str(base / value)
            items.append(item)
        splits[split] = _check_items(items, key, label_key, path)
    if "train" not in splits or "test" not in splits:
        raise VolumesError(f"{path}: needs labelled 'training' and 'test' lists (found: "
                           f"{sorted(k for k, v in datalist.items() if isinstance(v, list))})")
    if "val" not in splits:
        kept, taken = stratified_split([i["class_label"] for i in splits["train"]], val_fraction, seed)
        splits["val"] = [splits["train"][i] for i in taken]
        splits["train"] = [splits["train"][i] for i in kept]
    return splits


def load_evaluation_data(
    path: str | Path,
    *,
    task: str = "volume",
    preset: str | None = None,
    axis: str = "axial",
    channel_mode: str = "repeat",
    size: int | None = None,
    label_key: str = "class_label",
    slice_label: str | None = None,
    slice_within: str | None = None,
    val_fraction: float = 0.2,
    seed: int = 0,
) -> EvaluationData:
    """Read a datalist JSON or a MedMNIST 3D ``.npz`` for evaluation.

    Args:
        path: the datalist (``.json``) or archive (``.npz``).
        task: ``volume`` or ``slice``.
        preset: intensity preset for datalist volumes (default ``soft_tissue``); not allowed
            for MedMNIST archives, which hold 0..255 values.
        axis, channel_mode, size: as :func:`volumes.transforms.preprocessing` (``size`` is the
            longer in-plane side; ``None`` keeps it and pads to the patch grid).
        label_key: the item key of the class label.
        slice_label, slice_within: per-slice labels of a slice task, see
            :func:`volumes.evaluation.slices.attach_slice_labels`.
        val_fraction, seed: the validation share carved from ``training`` when a datalist has none.

    Raises:
        ConfigError: a bad option or item.
        VolumesError: an unreadable file or missing splits.
    """
    from volumes.transforms import CHANNEL_MODES, INTENSITY_PRESETS, SLICE_AXES

    path = Path(path)
    if task not in TASKS:
        raise ConfigError("task", task, list(TASKS))
    if axis not in SLICE_AXES:
        raise ConfigError("axis", axis, list(SLICE_AXES))
    if channel_mode not in CHANNEL_MODES:
        raise ConfigError("channel_mode", channel_mode, list(CHANNEL_MODES))
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
        raise ConfigError("size", size, "a positive number of pixels or None")
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError("val_fraction", val_fraction, "a fraction in (0, 1)")
    if not path.exists():
        raise VolumesError(f"{path}: no such file")

    if path.suffix == ".npz":
        if preset is not None:
            raise ConfigError("preset", preset, "None for a MedMNIST archive (its volumes are already 0..255)")
        if axis != "axial":
            raise ConfigError("axis", axis, "'axial' for a MedMNIST archive (the loader puts MedMNIST's frame axis last)")
        if task == "slice":
            raise ConfigError("task", task, "'volume' for a MedMNIST archive (it has no per-slice labels)")
        from volumes.data.medmnist import load_medmnist3d_splits

        raw = load_medmnist3d_splits(path)
        splits = {split: raw[split] for split in SPLITS}
        settings = {"channel_mode": channel_mode, "size": size, "axis": "axial", "medmnist_slice_axis": 0}
        kind = "medmnist3d"
    elif path.suffix == ".json":
        preset = preset or "soft_tissue"
        if preset not in INTENSITY_PRESETS:
            raise ConfigError("preset", preset, list(INTENSITY_PRESETS))
        splits = _read_datalist(path, label_key, val_fraction, seed)
        settings = {"preset": preset, "axis": axis, "channel_mode": channel_mode, "size": size}
        kind = "datalist"
    else:
        raise ConfigError("data", str(path), "a MONAI datalist .json or a MedMNIST 3D .npz")

    if task == "slice":
        from volumes.evaluation.slices import attach_slice_labels

        source = slice_label or "datalist"
        for split in SPLITS:
            splits[split] = attach_slice_labels(splits[split], source, datalist_dir=path.parent, axis=axis,
                                                within=slice_within)
    elif slice_label is not None or slice_within is not None:
        raise ConfigError("slice_label", slice_label or slice_within, "only with task='slice'")

    if task == "slice":
        labels = {int(v) for items in splits.values() for item in items
                  for v, keep in zip(item["slice_labels"], item["slice_keep"]) if keep}
    else:
        labels = {item["class_label"] for items in splits.values() for item in items}
    num_classes = max(labels) + 1 if labels else 0
    if num_classes < 2:
        raise VolumesError(f"{path}: needs at least two classes, found labels {sorted(labels)}")
    return EvaluationData(name=path.name, kind=kind, task=task, splits=splits, num_classes=num_classes,
                          settings=settings)

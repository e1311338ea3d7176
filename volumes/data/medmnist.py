"""MedMNIST v2 3D datasets (e.g. AdrenalMNIST3D) as MONAI volumes.

A MedMNIST 3D file is an ``.npz`` archive with ``{train,val,test}_images``
``[N, S, S, S]`` uint8 (``S`` = 28, or 64 for MedMNIST+) and ``{split}_labels``
``[N, 1]``. The volumes are already cropped and resampled around the organ, and
intensities are already mapped to 0..255 (AdrenalMNIST3D holds binary shape masks,
0 or 255), so no CT window applies: :func:`load_medmnist3d` only scales them to
``[0, 1]``. Continue with :class:`volumes.transforms.PrepareSlicesd` (3 channels by
repetition, ImageNet normalisation), not with :class:`~volumes.transforms.IntensityPresetd`.

Slicing axis. MedMNIST's own tools treat the first axis of a stored volume as the
frame axis: ``medmnist.utils.montage3d`` builds one montage per ``imgs[:, i]`` and
the GIF export writes one frame per ``volume[i]``. The loader moves that axis last
(``slice_axis=0``), where :mod:`volumes.transforms` and the networks expect the
slicing ("axial") axis, keeping the order of the other two:
``[S0, S1, S2] -> [1, S1, S2, S0]``. The archives carry no orientation or spacing,
so the affine is the identity: 1 mm isotropic voxels, slice index = position in mm.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor

from volumes.errors import ConfigError, VolumeReadError

__all__ = ["SPLITS", "ADRENAL_CLASS_NAMES", "load_medmnist3d", "load_medmnist3d_splits", "medmnist3d_arrays"]

#: The official MedMNIST splits, in file-key spelling.
SPLITS: tuple[str, ...] = ("train", "val", "test")

#: AdrenalMNIST3D label index -> name (MedMNIST INFO: 0 normal, 1 hyperplasia).
ADRENAL_CLASS_NAMES: tuple[str, str] = ("normal", "hyperplasia")


def medmnist3d_arrays(path: str | Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """The raw arrays of one split: images ``[N, S, S, S]`` uint8 and labels ``[N]`` int64.

    Raises:
        ConfigError: ``split`` is not one of :data:`SPLITS`.
        VolumeReadError: the file is missing, not a readable ``.npz``, lacks the split's
            keys, or holds arrays of the wrong shape or type.
    """
    if split not in SPLITS:
        raise ConfigError("split", split, list(SPLITS))
    path = Path(path)
    if not path.is_file():
        raise VolumeReadError(path, "file not found (expected a MedMNIST 3D .npz archive)")
    image_key, label_key = f"{split}_images", f"{split}_labels"
    try:
        with np.load(path, allow_pickle=False) as archive:
            missing = [k for k in (image_key, label_key) if k not in archive.files]
            if missing:
                raise VolumeReadError(
                    path, f"missing key(s) {missing}; the archive has {sorted(archive.files)} "
                    "(a MedMNIST 3D file has {train,val,test}_{images,labels})"
                )
            images = archive[image_key]
            labels = archive[label_key]
    except VolumeReadError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as exc:
        raise VolumeReadError(path, f"not a readable .npz archive ({type(exc).__name__}: {exc})") from exc

    if images.ndim != 4 or len(set(images.shape[1:])) != 1:
        raise VolumeReadError(path, f"{image_key} must be [N, S, S, S] cubes, got shape {images.shape}")
    if images.dtype != np.uint8:
        raise VolumeReadError(path, f"{image_key} must be uint8 (0..255), got {images.dtype}")
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise VolumeReadError(
            path, f"{label_key} must be [N, 1] with N = {images.shape[0]} (as {image_key}), got shape {labels.shape}"
        )
    if not np.issubdtype(labels.dtype, np.integer):
        raise VolumeReadError(path, f"{label_key} must hold integer class indices, got {labels.dtype}")
    return images, labels.astype(np.int64)


def _volume(cube: np.ndarray, slice_axis: int, source: str) -> MetaTensor:
    """One ``[S, S, S]`` uint8 cube -> ``[1, *, *, S]`` float32 MetaTensor in ``[0, 1]``, identity affine."""
    values = np.moveaxis(cube, slice_axis, -1).astype(np.float32) / np.float32(255.0)
    return MetaTensor(
        torch.from_numpy(np.ascontiguousarray(values))[None],
        affine=torch.eye(4, dtype=torch.float64),
        meta={"filename_or_obj": source, "space": "RAS"},
    )


def load_medmnist3d(path: str | Path, split: str, *, slice_axis: int = 0) -> list[dict[str, Any]]:
    """Load one split of a MedMNIST 3D ``.npz`` as datalist items.

    Args:
        path: e.g. ``../shared/data/medmnist3d/adrenalmnist3d.npz`` (28³) or ``adrenalmnist3d_64.npz`` (64³).
        split: ``train``, ``val`` or ``test`` (the official split).
        slice_axis: the stored axis (0, 1 or 2) that becomes the last, slicing axis;
            0 is MedMNIST's frame axis (see the module docstring).

    Returns:
        ``[{"image": MetaTensor [1, S, S, S] float32 in [0, 1], "class_label": int,
        "case_id": "train_0001"}, ...]`` in file order; the affine is the identity
        (1 mm spacing), ``image.meta["filename_or_obj"]`` is ``"<path>#<case_id>"``.

    Raises:
        ConfigError: unknown ``split`` or ``slice_axis``.
        VolumeReadError: missing or corrupt file, missing keys, wrong shapes or types.
    """
    if slice_axis not in (0, 1, 2):
        raise ConfigError("slice_axis", slice_axis, [0, 1, 2])
    images, labels = medmnist3d_arrays(path, split)
    items = []
    for index, (cube, label) in enumerate(zip(images, labels)):
        case_id = f"{split}_{index:04d}"
        items.append(
            {"image": _volume(cube, slice_axis, f"{path}#{case_id}"), "class_label": int(label), "case_id": case_id}
        )
    return items


def load_medmnist3d_splits(path: str | Path, *, slice_axis: int = 0) -> dict[str, list[dict[str, Any]]]:
    """All three official splits: ``{"train": [...], "val": [...], "test": [...]}`` (see :func:`load_medmnist3d`)."""
    return {split: load_medmnist3d(path, split, slice_axis=slice_axis) for split in SPLITS}

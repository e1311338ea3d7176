"""Uploads are checked before they enter the datastore.

MONAI Label's ``PUT /datastore/image`` and ``PUT /datastore/label`` copy whatever arrives into
the studies folder; a 2D slice, a truncated file, a text file or a volume of NaNs was then
listed and served as the next sample. :class:`CheckedDatastore` reads every upload fully
first and refuses a bad one with HTTP 422 saying what is wrong; nothing is stored then.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
from monailabel.datastore.local import LocalDatastore

__all__ = ["CheckedDatastore", "UploadError", "check_image", "check_label"]

logger = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii.gz", ".nii")


class UploadError(ValueError):
    """An upload the datastore refuses (answered with HTTP 422 and this message)."""


def _read(path: str | Path, what: str, name: str | None = None) -> np.ndarray:
    import nibabel as nib

    name = name or Path(path).name
    if not Path(path).name.lower().endswith(NIFTI_SUFFIXES):
        raise UploadError(f"{what} {name!r} ({Path(path).suffix or 'no suffix'}): the datastore holds NIfTI volumes "
                          "(.nii.gz or .nii)")
    try:
        array = np.asarray(nib.load(str(path)).dataobj)  # reads every voxel: a truncated file fails here
    except Exception as exc:
        raise UploadError(f"{what} {name!r} is not a readable NIfTI volume: {str(exc).splitlines()[0][:200]}") from None
    if array.ndim == 4 and array.shape[3] == 1:
        array = array[..., 0]
    if array.ndim != 3 or min(array.shape) < 2:
        raise UploadError(f"{what} {name!r} has shape {list(array.shape)}: a volume needs 3 dimensions of at least "
                          "2 voxels each")
    return array


def check_image(path: str | Path, name: str | None = None) -> np.ndarray:
    """The uploaded image's voxels, or :class:`UploadError` (not NIfTI, unreadable, not 3D, not finite).

    ``name`` is what the messages call it (the image id; the file is a server-side temporary).
    """
    array = _read(path, "image", name)
    if np.issubdtype(array.dtype, np.floating):
        bad = int((~np.isfinite(array)).sum())
        if bad:
            raise UploadError(f"image {name or Path(path).name!r}: {bad} voxels are NaN or infinite")
    return array


def check_label(path: str | Path, image_shape: tuple[int, ...] | None, name: str | None = None) -> np.ndarray:
    """The uploaded label's voxels: readable, 3D, the image's shape, non-negative whole numbers."""
    array = _read(path, "label", name)
    name = name or Path(path).name
    if image_shape is not None and tuple(array.shape) != tuple(image_shape):
        raise UploadError(f"label {name!r} has shape {list(array.shape)}, its image {list(image_shape)}")
    values = np.asarray(array, np.float64)
    if not np.isfinite(values).all() or (values < 0).any() or (values != np.round(values)).any():
        raise UploadError(f"label {name!r}: values must be non-negative whole numbers (label indices)")
    return array


def _http_error(exc: UploadError) -> Exception:
    from fastapi import HTTPException

    return HTTPException(status_code=422, detail=str(exc))


class CheckedDatastore(LocalDatastore):
    """MONAI Label's local datastore, with every uploaded image and label checked before it is stored."""

    def add_image(self, image_id: str, image_filename: str, image_info: dict[str, Any]) -> str:
        try:
            check_image(image_filename, name=image_id)
        except UploadError as exc:
            logger.info("upload refused: %s", exc)
            raise _http_error(exc) from exc
        return super().add_image(image_id, image_filename, image_info)

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: dict[str, Any]) -> str:
        shape = None
        try:
            uri = self.get_image_uri(image_id)
            if uri:
                import nibabel as nib

                shape = tuple(int(n) for n in nib.load(uri).shape[:3])
        except Exception:  # an image the datastore cannot read: the label is checked on its own
            shape = None
        try:
            check_label(label_filename, shape, name=f"{image_id} ({label_tag})")
        except UploadError as exc:
            logger.info("label upload refused: %s", exc)
            raise _http_error(exc) from exc
        return super().save_label(image_id, label_filename, label_tag, label_info)

"""The volume file formats the package reads, by file name: what the reader and the case finder agree on."""

from __future__ import annotations

from pathlib import Path

__all__ = ["ITK_SUFFIXES", "NIFTI_SUFFIXES", "VOLUME_SUFFIXES", "volume_suffix"]

NIFTI_SUFFIXES = (".nii.gz", ".nii")
ITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")
VOLUME_SUFFIXES = NIFTI_SUFFIXES + ITK_SUFFIXES


def volume_suffix(path: str | Path) -> str | None:
    """The volume suffix of a file name (``".nii.gz"``, ``".mha"``...), or None."""
    name = Path(path).name.lower()
    return next((suffix for suffix in VOLUME_SUFFIXES if name.endswith(suffix)), None)

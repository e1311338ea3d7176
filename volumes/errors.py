"""Errors raised for bad input. Each names the file and the problem."""

from __future__ import annotations

from pathlib import Path


class VolumesError(Exception):
    """Base class of every error this package raises on purpose."""


class VolumeReadError(VolumesError, ValueError):
    """An input volume (file or DICOM series folder) cannot be used.

    The message always starts with the offending path, so a batch job can log
    it as is: ``"/data/case7.nii.gz: contains 12 NaN voxels"``.
    """

    def __init__(self, path: str | Path, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class WeightsError(VolumesError, ValueError):
    """A weights file does not fit the encoder it is loaded into."""

    def __init__(self, path: str | Path, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class ConfigError(VolumesError, ValueError):
    """A configuration value is not one of the allowed values."""

    def __init__(self, key: str, value: object, allowed: object):
        self.key = key
        self.value = value
        self.allowed = allowed
        super().__init__(f"{key}={value!r} is not allowed; choose from {allowed}")


def volumes_error_in(exc: BaseException) -> VolumesError | None:
    """The :class:`VolumesError` behind ``exc``, if any: MONAI's ``Compose`` re-raises a
    transform's error as ``RuntimeError("applying transform ...")`` with the original as its cause."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, VolumesError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None

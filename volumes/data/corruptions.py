"""Controlled corruptions of a CT and its label map, for studying quality control (docs/QC.md).

Each corruption takes an image in Hounsfield units ``[X, Y, Z]``, its label map and its
affine, and returns the three after the change, as a scanner, a reconstruction or a
pipeline mistake would make them:

* ``noise``: white Gaussian noise of ``sigma_hu`` (a low-dose scan);
* ``blur``: a Gaussian blur of ``sigma_mm`` (a smooth reconstruction kernel, thick slices);
* ``truncate``: the central ``keep`` fraction of the field of view in x and y (a small
  reconstruction field of view; the matrix and the affine's origin change with it);
* ``no_intercept``: stored values read without the rescale intercept (``HU + 1024``);
* ``mr_like``: tissue intensities remapped to an MR-like contrast (fat bright, bone dark,
  arbitrary units): a T1-weighted series sent to a CT model;
* ``remove_organ``: an organ replaced by fat (HU -100 plus noise) and removed from the labels.

The label map changes only where the anatomy does (cropping, a removed organ).
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from volumes.arrays import spacing_mm

__all__ = ["CORRUPTIONS", "corrupt"]

# MR-like contrast: HU knots -> arbitrary units (air dark, fat bright, soft tissue grey, bone dark)
_MR_HU = (-1024.0, -100.0, 0.0, 60.0, 200.0, 1000.0)
_MR_VALUES = (0.0, 800.0, 350.0, 450.0, 300.0, 80.0)


def _noise(image, label, affine, rng, sigma_hu: float = 100.0):
    return image + rng.normal(0.0, sigma_hu, image.shape).astype(np.float32), label, affine


def _blur(image, label, affine, rng, sigma_mm: float = 4.0):
    from scipy.ndimage import gaussian_filter

    sigma = [sigma_mm / s for s in spacing_mm(affine)]
    return gaussian_filter(image.astype(np.float32), sigma=sigma), label, affine


def _truncate(image, label, affine, rng, keep: float = 0.6):
    x, y = image.shape[:2]
    kx, ky = max(1, round(x * keep)), max(1, round(y * keep))
    x0, y0 = (x - kx) // 2, (y - ky) // 2
    moved = np.array(affine, dtype=np.float64, copy=True)
    moved[:3, 3] = affine[:3, :3] @ np.array([x0, y0, 0.0]) + affine[:3, 3]
    crop = (slice(x0, x0 + kx), slice(y0, y0 + ky))
    return image[crop].copy(), label[crop].copy(), moved


def _no_intercept(image, label, affine, rng):
    return image + 1024.0, label, affine


def _mr_like(image, label, affine, rng):
    return np.interp(image, _MR_HU, _MR_VALUES).astype(np.float32), label, affine


def _remove_organ(image, label, affine, rng, organ: int = 2, fat_hu: float = -100.0, sigma_hu: float = 15.0):
    where = label == organ
    out, lab = image.copy(), label.copy()
    out[where] = fat_hu + rng.normal(0.0, sigma_hu, int(where.sum()))
    lab[where] = 0
    return out, lab, affine


CORRUPTIONS: dict[str, Callable] = {
    "noise": _noise, "blur": _blur, "truncate": _truncate, "no_intercept": _no_intercept, "mr_like": _mr_like,
    "remove_organ": _remove_organ,
}


def corrupt(kind: str, image: np.ndarray, label: np.ndarray, affine: np.ndarray, *, seed: int = 0,
            **options: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Apply corruption ``kind`` (:data:`CORRUPTIONS`) with ``options``; returns ``(image, label, affine)``."""
    if kind not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {kind!r}; choose from {sorted(CORRUPTIONS)}")
    rng = np.random.default_rng(seed)
    image = np.asarray(image, dtype=np.float32)
    return CORRUPTIONS[kind](image, np.asarray(label), np.asarray(affine, dtype=np.float64), rng, **options)

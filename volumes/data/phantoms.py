"""Synthetic abdominal CT phantoms: organ labels plus a volume-level diagnosis.

Every case is drawn from one integer seed and is built in physical millimetres,
so the anatomy does not depend on the voxel grid it is sampled on:

* a body with an elliptical outline, subcutaneous fat, an abdominal muscle wall
  and a cavity of bowel loops and visceral fat (with a little gas);
* labelled organs (:data:`ORGANS`): liver (patient's right, upper abdomen),
  spleen (patient's left, postero-lateral), both kidneys (posterior, either side
  of the spine), the aorta (anterior-left of the spine) and the column of
  vertebral bodies (posterior midline);
* unlabelled structures that make the picture less trivial: stomach with a gas
  cap, IVC, portal vessels in the liver, spinal canal, posterior vertebral
  elements, paraspinal muscles, intervertebral discs.

Each organ is an ellipsoid deformed by a few smooth radial bumps, a bend (the
spleen's crescent, the kidneys' bean) or a taper (the liver's thin left lobe),
randomly placed, sized and rotated. The image gets a little blur (the scanner's
point-spread function, which also gives partial-volume edges) and Gaussian noise
with a short in-plane correlation, like filtered back-projection noise.

World coordinates follow nibabel's RAS+ convention: +x points to the patient's
**Right**, +y to the **Anterior**, +z to the **Superior**. The affine is diagonal
(voxel ``i`` grows toward the patient's right, ``k`` toward the head), so the
liver sits at larger x than the spleen.

Volume-level tasks (``PhantomConfig.task``), all needing 3D context:

``"splenomegaly"`` (class 1 = enlarged spleen)
    Rule: ``class_label == 1`` iff the labelled spleen volume is above
    ``spleen_threshold_ml`` (default 314 mL, in the range of the CT-volumetry
    cut-offs used for splenomegaly). Negatives are drawn from
    ``spleen_normal_ml`` (110-250 mL) and positives from ``spleen_enlarged_ml``
    (380-650 mL), so there is a margin around the threshold. Positives grow
    mostly in the cranio-caudal direction (the spleen tip descends), so their
    largest axial cross-section overlaps that of the negatives: one slice does
    not decide the class, the spleen's length over many slices does.
``"lesion"`` (class 1 = focal liver lesion)
    Positives contain one hypodense liver lesion, 8-20 mm across and 30-50 HU
    darker than the liver, visible on a few slices only. The lesion stays part
    of the liver label; its mask is :attr:`Phantom.lesion_mask` and its centre,
    size and slices are in ``Phantom.info["lesion"]``.
``"hepatomegaly"`` (class 1 = enlarged liver)
    Rule: ``class_label == 1`` iff the labelled liver's cranio-caudal span (first
    to last slice holding liver, ``Phantom.info["liver_span_mm"]``) is above
    ``liver_span_threshold_mm`` (default 170 mm; a liver span above about 16-17 cm
    is the usual clinical cut-off). Negatives are drawn with a span in
    ``liver_normal_span_mm`` (110-140 mm), positives in ``liver_enlarged_span_mm``
    (200-240 mm). The dome stays under the diaphragm and the right lobe reaches
    further down (below the lower pole of the right kidney, a CT sign of
    hepatomegaly); the in-plane size is drawn as for a normal liver, so the
    largest axial cross-sections of the classes overlap and no single slice
    decides the class. The liver is large and homogeneous, so unlike the
    near-isodense spleen it is plain to see even for a randomly initialised
    encoder: this is the task for checking that an aggregator learns a 3D label
    end to end. The scan always covers the largest liver the task can draw,
    whatever the case's class, so scan length and slice count carry no label.

Two presets (both are just :class:`PhantomConfig` values):

==================  ==================  =====================================
                    small (default)     ``PhantomConfig.realistic()``
==================  ==================  =====================================
in-plane spacing    2.5-3.5 mm          0.6-1.0 mm
in-plane matrix     fits the body       512 x 512
                    (about 100-180)
slice spacing       3.0-5.0 mm          1.5-5.0 mm
cranio-caudal       150-250 mm          150-250 mm
noise               10-20 HU            10-20 HU
time per case       0.1-0.3 s           2-7 s (2 CPU cores)
==================  ==================  =====================================

The small preset is coarser than clinical CT on purpose: it keeps tests and
demos fast while the field of view (about 340-450 mm) stays body-sized.

Typical use::

    from volumes.data.phantoms import PhantomConfig, generate_phantom, write_cohort
    ph = generate_phantom(7)                     # ph.image [X, Y, Z] HU, ph.label
    datalist = write_cohort("out/spleen", n=40, seed=0)
    # python -m volumes phantoms --out out/spleen --n 40 --seed 0
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import shutil
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from scipy import ndimage

from volumes.errors import ConfigError

__all__ = [
    "ORGANS",
    "LABEL_NAMES",
    "TASKS",
    "CLASS_NAMES",
    "HU_RANGES",
    "PORTAL_VENOUS_HU",
    "PhantomConfig",
    "Phantom",
    "generate_phantom",
    "write_case",
    "write_cohort",
    "case_seed",
    "phantoms_main",
]

ORGANS: dict[str, int] = {
    "background": 0,
    "liver": 1,
    "spleen": 2,
    "kidney_left": 3,
    "kidney_right": 4,
    "aorta": 5,
    "vertebrae": 6,
}
"""Organ name -> label value. Stable: new organs only ever get new numbers."""

LABEL_NAMES: tuple[str, ...] = tuple(sorted(ORGANS, key=ORGANS.__getitem__))
"""Organ names in label order (index == label value)."""

TASKS: tuple[str, ...] = ("splenomegaly", "lesion", "hepatomegaly")

CLASS_NAMES: dict[str, tuple[str, str]] = {
    "splenomegaly": ("normal_spleen", "splenomegaly"),
    "lesion": ("no_lesion", "liver_lesion"),
    "hepatomegaly": ("normal_liver", "hepatomegaly"),
}

# Per-case tissue means are drawn from these ranges (HU). Air is exact because
# scanners calibrate it; contrast-enhanced structures are in a portal-ish phase.
HU_RANGES: dict[str, tuple[float, float]] = {
    "air": (-1000.0, -1000.0),
    "lung": (-880.0, -820.0),
    "fat": (-120.0, -80.0),
    "muscle": (40.0, 60.0),
    "bowel": (20.0, 40.0),
    "gas": (-1000.0, -900.0),
    "stomach_content": (0.0, 20.0),
    "liver": (55.0, 65.0),
    "spleen": (45.0, 55.0),
    "kidney_cortex": (150.0, 200.0),
    "kidney_medulla": (90.0, 130.0),
    "aorta": (150.0, 250.0),
    "ivc": (90.0, 130.0),
    "portal_vessels": (130.0, 180.0),
    "bone_cortical": (700.0, 1000.0),
    "bone_cancellous": (250.0, 400.0),
    "disc": (70.0, 100.0),
    "csf": (0.0, 20.0),
}

_HU_MIN, _HU_MAX = -1024.0, 3071.0  # the range a 12-bit CT stores

PORTAL_VENOUS_HU: dict[str, tuple[float, float]] = {"liver": (100.0, 120.0), "spleen": (105.0, 125.0)}
"""``PhantomConfig.hu_ranges`` for a portal-venous phase: liver and spleen enhance like the
portal vessels and kidneys already do (:data:`HU_RANGES` keeps them unenhanced)."""


def _check_range(key: str, value: Sequence[float], low: float = 0.0, high: float = math.inf) -> tuple[float, float]:
    if len(value) != 2 or not (low <= float(value[0]) <= float(value[1]) <= high):
        raise ConfigError(key, tuple(value), f"(lo, hi) with {low} <= lo <= hi <= {high}")
    return float(value[0]), float(value[1])


@dataclass
class PhantomConfig:
    """Ranges the phantom generator samples from (all lengths in mm).

    The defaults are the fast "small" preset; :meth:`realistic` gives clinical
    spacing on a 512 x 512 matrix. See the module docstring for the class rules.

    Attributes:
        task: ``"splenomegaly"``, ``"lesion"`` or ``"hepatomegaly"``, what ``class_label`` means.
        prevalence: probability that a case is positive when not forced.
        inplane_spacing_mm: in-plane pixel spacing range (x and y share it).
        slice_spacing_mm: spacing between axial slices.
        extent_mm: cranio-caudal coverage from just above the liver dome down.
            Extended when needed so that the whole spleen is always in view.
        matrix: fixed in-plane matrix (e.g. 512); ``None`` sizes it to the
            field of view (body plus a margin) at the drawn spacing.
        noise_hu: standard deviation range of the image noise.
        noise_correlation_mm: in-plane Gaussian correlation length of the noise.
        spleen_threshold_ml: splenomegaly cut-off on the labelled spleen volume.
        spleen_normal_ml: spleen volumes of negatives (and of all lesion cases).
        spleen_enlarged_ml: spleen volumes of splenomegaly positives.
        lesion_diameter_mm: lesion diameter range (lesion task).
        lesion_contrast_hu: how much darker than the liver a lesion is.
        liver_span_threshold_mm: hepatomegaly cut-off on the labelled liver's
            cranio-caudal span.
        liver_normal_span_mm: liver spans of hepatomegaly negatives.
        liver_enlarged_span_mm: liver spans of hepatomegaly positives (the other
            tasks keep their own, normal, liver).
        hu_ranges: per-tissue overrides of :data:`HU_RANGES` (``{"liver": (100, 120)}``),
            e.g. :data:`PORTAL_VENOUS_HU` for parenchyma enhanced like the vessels;
            ``None`` keeps :data:`HU_RANGES` (unenhanced liver and spleen).
    """

    task: str = "splenomegaly"
    prevalence: float = 0.5
    inplane_spacing_mm: tuple[float, float] = (2.5, 3.5)
    slice_spacing_mm: tuple[float, float] = (3.0, 5.0)
    extent_mm: tuple[float, float] = (150.0, 250.0)
    matrix: int | None = None
    noise_hu: tuple[float, float] = (10.0, 20.0)
    noise_correlation_mm: float = 0.8
    spleen_threshold_ml: float = 314.0
    spleen_normal_ml: tuple[float, float] = (110.0, 250.0)
    spleen_enlarged_ml: tuple[float, float] = (380.0, 650.0)
    lesion_diameter_mm: tuple[float, float] = (8.0, 20.0)
    lesion_contrast_hu: tuple[float, float] = (30.0, 50.0)
    liver_span_threshold_mm: float = 170.0
    liver_normal_span_mm: tuple[float, float] = (110.0, 140.0)
    liver_enlarged_span_mm: tuple[float, float] = (200.0, 240.0)
    hu_ranges: dict[str, tuple[float, float]] | None = None

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ConfigError("task", self.task, TASKS)
        if not 0.0 <= float(self.prevalence) <= 1.0:
            raise ConfigError("prevalence", self.prevalence, "a probability in [0, 1]")
        for key in ("inplane_spacing_mm", "slice_spacing_mm", "extent_mm", "noise_hu", "spleen_normal_ml",
                    "spleen_enlarged_ml", "lesion_diameter_mm", "lesion_contrast_hu", "liver_normal_span_mm",
                    "liver_enlarged_span_mm"):
            setattr(self, key, _check_range(key, getattr(self, key)))
        if self.hu_ranges is not None:
            unknown = sorted(set(self.hu_ranges) - set(HU_RANGES))
            if unknown:
                raise ConfigError("hu_ranges", unknown, sorted(HU_RANGES))
            self.hu_ranges = {name: _check_range(f"hu_ranges[{name!r}]", value, _HU_MIN, _HU_MAX)
                              for name, value in self.hu_ranges.items()}
        if self.inplane_spacing_mm[0] <= 0 or self.slice_spacing_mm[0] <= 0:
            raise ConfigError("spacing", (self.inplane_spacing_mm, self.slice_spacing_mm), "positive spacings")
        if self.matrix is not None and int(self.matrix) < 32:
            raise ConfigError("matrix", self.matrix, "None or an int >= 32")
        if not self.spleen_normal_ml[1] < self.spleen_threshold_ml < self.spleen_enlarged_ml[0]:
            raise ConfigError(
                "spleen_threshold_ml", self.spleen_threshold_ml,
                f"a value strictly between spleen_normal_ml[1]={self.spleen_normal_ml[1]} "
                f"and spleen_enlarged_ml[0]={self.spleen_enlarged_ml[0]}",
            )
        if self.liver_normal_span_mm[0] < 60.0:
            raise ConfigError("liver_normal_span_mm", self.liver_normal_span_mm, "spans of at least 60 mm")
        if not self.liver_normal_span_mm[1] < self.liver_span_threshold_mm < self.liver_enlarged_span_mm[0]:
            raise ConfigError(
                "liver_span_threshold_mm", self.liver_span_threshold_mm,
                f"a value strictly between liver_normal_span_mm[1]={self.liver_normal_span_mm[1]} "
                f"and liver_enlarged_span_mm[0]={self.liver_enlarged_span_mm[0]}",
            )

    @classmethod
    def realistic(cls, **overrides: Any) -> PhantomConfig:
        """Clinical-like geometry: 0.6-1.0 mm pixels on 512 x 512, 1.5-5 mm slices."""
        values: dict[str, Any] = dict(inplane_spacing_mm=(0.6, 1.0), slice_spacing_mm=(1.5, 5.0), matrix=512)
        values.update(overrides)
        return cls(**values)

    @classmethod
    def classification_demo(cls, **overrides: Any) -> PhantomConfig:
        """The classification bundle's default cohort: hepatomegaly, learnable from random features.

        Fixed field of view (96 x 96 pixels of 5 mm, as a scanner protocol's fixed
        reconstruction diameter), 5-6 mm slices and portal-venous enhancement, so the
        liver stands out in the liver window. A random-initialised encoder's embeddings
        separate the classes (validation AUC >= 0.99 for every aggregator in
        ``tests/test_classification_learning.py``); the spleen of the default preset is
        almost isodense with its neighbours and random features cannot find it.
        """
        values: dict[str, Any] = dict(task="hepatomegaly", matrix=96, inplane_spacing_mm=(5.0, 5.0),
                                      slice_spacing_mm=(5.0, 6.0), hu_ranges=dict(PORTAL_VENOUS_HU))
        values.update(overrides)
        return cls(**values)

    @classmethod
    def segmentation_demo(cls, **overrides: Any) -> PhantomConfig:
        """The segmentation bundle's default cohort: the small preset in a portal-venous phase.

        Contrast-enhanced CT is the usual protocol for abdominal organ segmentation; with
        liver and spleen enhanced, organ boundaries are visible in the soft-tissue window.
        """
        values: dict[str, Any] = dict(hu_ranges=dict(PORTAL_VENOUS_HU))
        values.update(overrides)
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready copy (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


@dataclass
class Phantom:
    """One synthetic CT case.

    Attributes:
        image: ``[X, Y, Z]`` float32, Hounsfield units, axes RAS (x toward the
            patient's right, y anterior, z superior).
        label: ``[X, Y, Z]`` uint8 organ labels (:data:`ORGANS`).
        affine: ``4 x 4`` float64 voxel -> RAS world (mm), nibabel convention.
        spacing: voxel size ``(sx, sy, sz)`` in mm.
        class_label: volume-level class (0 or 1) for ``info["task"]``.
        info: JSON-ready facts: seed, task, organ volumes (mL), spleen volume and
            threshold, lesion centre/size/slices (or None), noise, HU means.
        lesion_mask: ``[X, Y, Z]`` bool, the lesion voxels, or None.
    """

    image: np.ndarray
    label: np.ndarray
    affine: np.ndarray
    spacing: tuple[float, float, float]
    class_label: int
    info: dict[str, Any] = field(default_factory=dict)
    lesion_mask: np.ndarray | None = None

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.image.shape)  # type: ignore[return-value]

    @property
    def voxel_volume_ml(self) -> float:
        return float(np.prod(self.spacing)) / 1000.0


# ---------------------------------------------------------------- geometry ---


def _fibonacci_sphere(n: int) -> np.ndarray:
    """``[n, 3]`` nearly uniform unit vectors (for volumes and bounding boxes)."""
    i = np.arange(n) + 0.5
    polar = np.arccos(1.0 - 2.0 * i / n)
    azimuth = np.pi * (1.0 + 5.0**0.5) * i
    return np.stack([np.cos(azimuth) * np.sin(polar), np.sin(azimuth) * np.sin(polar), np.cos(polar)], axis=1)


_SPHERE = _fibonacci_sphere(3000)


def _rotation(rx: float, ry: float, rz: float) -> np.ndarray:
    """Rotation matrix ``Rz @ Ry @ Rx`` for angles in degrees."""
    a, b, c = np.deg2rad([rx, ry, rz])
    mx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    my = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    mz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return mz @ my @ mx


def _random_bumps(rng: np.random.Generator, k: int, amplitude: float) -> tuple[np.ndarray, np.ndarray]:
    dirs = rng.normal(size=(k, 3))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    return dirs, rng.uniform(-amplitude, amplitude, size=k)


@dataclass
class _Blob:
    """A star-shaped organ: an ellipsoid with smooth radial bumps, bend and taper.

    Body-frame point ``p`` -> local ``u = R^T (p - centre) / axes``; then taper
    (``u1, u2`` divided by ``1 + taper * u0``) and bend (``u[b0] += bend *
    u[b1]**2``, a shear, so it keeps the volume); inside where ``|u| <=
    rho(u / |u|)`` with ``rho = 1 + sum_k a_k exp((d . d_k - 1) / w^2)``.
    """

    centre: np.ndarray
    axes: np.ndarray
    rotation: np.ndarray
    bump_dirs: np.ndarray
    bump_amps: np.ndarray
    bump_width: float = 0.6
    bend: float = 0.0
    bend_axes: tuple[int, int] = (1, 0)
    taper: float = 0.0

    def _rho(self, d0: Any, d1: Any, d2: Any) -> Any:
        rho = 1.0
        inv_w2 = 1.0 / self.bump_width**2
        for (a, b, c), amp in zip(self.bump_dirs, self.bump_amps):
            rho = rho + amp * np.exp((d0 * a + d1 * b + d2 * c - 1.0) * inv_w2)
        return rho

    def level(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        """``|u| / rho`` on broadcastable body-frame coordinates; < 1 inside."""
        dx, dy, dz = x - self.centre[0], y - self.centre[1], z - self.centre[2]
        r = self.rotation
        u = [(r[0, j] * dx + r[1, j] * dy + r[2, j] * dz) / self.axes[j] for j in range(3)]
        if self.taper:
            scale = np.maximum(1.0 + self.taper * u[0], 0.2)
            u[1], u[2] = u[1] / scale, u[2] / scale
        if self.bend:
            target, source = self.bend_axes
            u[target] = u[target] + self.bend * u[source] ** 2
        radius = np.sqrt(u[0] ** 2 + u[1] ** 2 + u[2] ** 2)
        safe = np.maximum(radius, 1e-6)
        return (radius / self._rho(u[0] / safe, u[1] / safe, u[2] / safe)).astype(np.float32)

    def surface_points(self, scale: float = 1.0, every: int = 1) -> np.ndarray:
        """``[N, 3]`` body-frame points on the surface (inverse of :meth:`level`).

        ``scale < 1`` gives points on the inner level set ``level == scale``.
        """
        d = _SPHERE[::every]
        u = d * (scale * self._rho(d[:, 0], d[:, 1], d[:, 2]))[:, None]
        if self.bend:
            target, source = self.bend_axes
            u[:, target] -= self.bend * u[:, source] ** 2
        if self.taper:
            scale = np.maximum(1.0 + self.taper * u[:, 0], 0.2)
            u[:, 1] *= scale
            u[:, 2] *= scale
        return self.centre + (u * self.axes) @ self.rotation.T

    def volume_ml(self) -> float:
        """Exact (up to direction sampling) volume; valid without taper."""
        rho = self._rho(_SPHERE[:, 0], _SPHERE[:, 1], _SPHERE[:, 2])
        return float(np.prod(self.axes) * 4.0 / 3.0 * np.pi * np.mean(rho**3)) / 1000.0


class _Grid:
    """Body-frame voxel-centre coordinates of the volume, as 1D float32 axes."""

    def __init__(self, x: np.ndarray, y: np.ndarray, z: np.ndarray, spacing: tuple[float, float, float]):
        self.x, self.y, self.z = (a.astype(np.float32) for a in (x, y, z))
        self.spacing = spacing
        self.shape = (len(x), len(y), len(z))

    def box(self, lo: np.ndarray, hi: np.ndarray) -> tuple[slice, slice, slice] | None:
        """Index box covering body-frame ``[lo, hi]`` (None when outside)."""
        out = []
        for axis, a, b in zip((self.x, self.y, self.z), lo, hi):
            i0, i1 = int(np.searchsorted(axis, a, "left")), int(np.searchsorted(axis, b, "right"))
            if i1 <= i0:
                return None
            out.append(slice(i0, i1))
        return tuple(out)  # type: ignore[return-value]

    def coords(self, box: tuple[slice, slice, slice]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self.x[box[0]][:, None, None], self.y[box[1]][None, :, None], self.z[box[2]][None, None, :]

    def blob(self, blob: _Blob) -> tuple[tuple[slice, slice, slice], np.ndarray] | None:
        """(index box, level array on it) for a blob; None when out of view."""
        pts = blob.surface_points()
        margin = 2.0 + max(self.spacing)
        box = self.box(pts.min(axis=0) - margin, pts.max(axis=0) + margin)
        if box is None:
            return None
        return box, blob.level(*self.coords(box))


def _smooth_field(rng: np.random.Generator, grid: _Grid, cell_mm: float) -> np.ndarray:
    """``[X, Y, Z]`` float32 smooth random field, about unit std, features ~``cell_mm``.

    Random values on a coarse lattice blended with separable Gaussian weights:
    a few small matrix products, far cheaper than interpolating the full grid.
    """
    weights = []
    for n, spacing in zip(grid.shape, grid.spacing):
        pos = np.arange(n) * spacing
        knots = np.arange(-cell_mm, n * spacing + 2 * cell_mm, cell_mm)
        w = np.exp(-0.5 * ((pos[:, None] - knots[None, :]) / (0.6 * cell_mm)) ** 2)
        weights.append((w / w.sum(axis=1, keepdims=True)).astype(np.float32))
    coarse = rng.standard_normal([w.shape[1] for w in weights]).astype(np.float32)
    out = np.einsum("ia,abc->ibc", weights[0], coarse)
    out = np.einsum("jb,ibc->ijc", weights[1], out)
    out = out @ weights[2].T  # the big product last, as one matmul
    sample = out[::3, ::3, ::3]
    out -= sample.mean()
    out /= max(float(sample.std()), 1e-6)
    return out.astype(np.float32, copy=False)


def _segment_distance(x: np.ndarray, y: np.ndarray, z: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Distance (mm) from broadcast points to the segment a-b."""
    ab = b - a
    t = ((x - a[0]) * ab[0] + (y - a[1]) * ab[1] + (z - a[2]) * ab[2]) / float(ab @ ab)
    t = np.clip(t, 0.0, 1.0)
    return np.sqrt((x - a[0] - t * ab[0]) ** 2 + (y - a[1] - t * ab[1]) ** 2 + (z - a[2] - t * ab[2]) ** 2)


# ---------------------------------------------------------------- generator --


def _draw_hu(rng: np.random.Generator, overrides: dict[str, tuple[float, float]] | None = None) -> dict[str, float]:
    # One draw per tissue in HU_RANGES order whatever the overrides, so overriding
    # one tissue leaves every other tissue's value (and the rest of the stream) alone.
    ranges = {**HU_RANGES, **(overrides or {})}
    return {name: float(rng.uniform(*ranges[name])) for name in HU_RANGES}


def _spleen_blob(rng: np.random.Generator, config: PhantomConfig, positive: bool, body: dict[str, float]) -> tuple[_Blob, float]:
    """The spleen and its target volume; the class only changes its size.

    The cranio-caudal semi-axis is drawn per class (negatives 35-58 mm,
    positives 80-92 mm) and the in-plane axes are solved from the target volume,
    so the classes' largest axial cross-sections overlap while the spleen's
    length over the slices separates them.
    """
    enlarged = positive and config.task == "splenomegaly"
    target_ml = rng.uniform(*(config.spleen_enlarged_ml if enlarged else config.spleen_normal_ml))
    length = rng.uniform(80.0, 92.0) if enlarged else rng.uniform(35.0, 58.0)
    ratio = rng.uniform(1.5, 2.1)  # width along the ribs / thickness across them
    dirs, amps = _random_bumps(rng, 5, 0.08)
    tilt_x, tilt_y = rng.uniform(-6.0, 6.0), rng.uniform(8.0, 18.0)
    angle = np.deg2rad(rng.uniform(188.0, 208.0))  # patient's left (-x), a little posterior (-y)
    top = -rng.uniform(5.0, 20.0)  # just under the left dome of the diaphragm

    a_c, b_c = body["cavity_a"], body["cavity_b"]
    wall = np.array([a_c * np.cos(angle), b_c * np.sin(angle)])
    normal = np.array([np.cos(angle) / a_c, np.sin(angle) / b_c])
    normal /= np.linalg.norm(normal)
    tangent = np.array([-normal[1], normal[0]])  # points postero-medially
    curvature_radius = (a_c**2 * np.sin(angle) ** 2 + b_c**2 * np.cos(angle) ** 2) ** 1.5 / (a_c * b_c)
    frame = np.array([[tangent[0], normal[0], 0.0], [tangent[1], normal[1], 0.0], [0.0, 0.0, 1.0]])
    # Tilt about the normal: the lower pole swings antero-laterally, as it does
    # when a spleen enlarges, which keeps it in front of the left kidney.
    rotation = frame @ _rotation(tilt_x, tilt_y, 0.0)

    unit = _Blob(np.zeros(3), np.array([ratio**0.5, ratio**-0.5, length]), rotation, dirs, amps, bump_width=0.6)
    scale = math.sqrt(target_ml / unit.volume_ml())  # bend and bumps do not change the volume
    width, thick = ratio**0.5 * scale, ratio**-0.5 * scale
    blob = _Blob(np.zeros(3), np.array([width, thick, length]), rotation, dirs, amps, bump_width=0.6,
                 bend_axes=(1, 0))
    # The spleen's outer surface follows the ribs: bend it like the wall.
    blob.bend = float(np.clip(width**2 / (2.0 * curvature_radius * thick), 0.1, 1.0))
    inset = thick * (1.0 + float(np.max(amps, initial=0.0))) + 3.0
    # Slide it a little forward along the ribs, away from the left kidney.
    blob.centre = np.array([*(wall - normal * inset - tangent * 0.25 * width), 0.0])
    blob.centre[2] = top - (blob.surface_points()[:, 2].max())
    return blob, float(target_ml)


def _make_room(organ: _Blob, spleen: _Blob, max_overlap: float = 0.03) -> float:
    """Push ``organ`` down (and a little back) until the spleen hardly overlaps it.

    The spleen is painted last so its labelled volume is exact; a big spleen
    displaces the left kidney caudally instead of eating it (mass effect).
    Returns the displacement in mm.
    """
    start = organ.centre.copy()
    step = np.array([0.0, -1.0, -5.0])
    for _ in range(30):
        pts = np.concatenate([organ.surface_points(f, every=4) for f in (0.3, 0.6, 0.9)])
        if np.mean(spleen.level(pts[:, 0], pts[:, 1], pts[:, 2]) < 1.0) <= max_overlap:
            break
        organ.centre = organ.centre + step
    return float(np.linalg.norm(organ.centre - start))


def _z_range(blob: _Blob) -> tuple[float, float]:
    z = blob.surface_points()[:, 2]
    return float(z.min()), float(z.max())


def _set_liver_span(liver: _Blob, span_mm: float) -> None:
    """Stretch the liver along its cranio-caudal axis to ``span_mm``, keeping the dome's height.

    The span of the deformed surface (bumps, taper, tilt) is not exactly twice the
    semi-axis, so the semi-axis is rescaled a few times until it is; the liver grows
    or shrinks at its lower end, as a liver does under the diaphragm.
    """
    low, dome = _z_range(liver)
    for _ in range(4):
        axes = liver.axes.copy()
        axes[2] *= span_mm / (dome - low)
        liver.axes = axes
        low, high = _z_range(liver)
        liver.centre = liver.centre + np.array([0.0, 0.0, dome - high])
        low = low + (dome - high)


def _draw_anatomy(rng: np.random.Generator, config: PhantomConfig, positive: bool, spleen_rng: np.random.Generator,
                  liver_span_mm: float | None = None) -> dict[str, Any]:
    """All geometric parameters of one case, in the body frame (mm).

    Body frame: origin on the body's axis at the height of the liver dome;
    axes as RAS (x = patient's right, y = anterior, z = superior).
    ``liver_span_mm`` (hepatomegaly task) sets the liver's cranio-caudal span.
    """
    cavity_a, cavity_b = rng.uniform(115.0, 135.0), rng.uniform(80.0, 100.0)
    fat, muscle = rng.uniform(8.0, 35.0), rng.uniform(8.0, 14.0)
    body = dict(
        cavity_a=cavity_a, cavity_b=cavity_b, fat=fat, muscle=muscle,
        a=cavity_a + fat + muscle, b=cavity_b + fat + muscle,
        taper=rng.uniform(-0.06, 0.06),  # the abdomen widens or narrows a little downward
    )
    # Spine: vertebral bodies 50-60 mm in front of the back of the cavity.
    spine_y = -cavity_b + rng.uniform(50.0, 60.0)
    vert_a, vert_b = rng.uniform(20.0, 25.0), rng.uniform(15.0, 18.0)
    canal_r = rng.uniform(7.0, 9.0)
    spine = dict(
        x=rng.uniform(-3.0, 3.0), y=spine_y, a=vert_a, b=vert_b,
        height=rng.uniform(24.0, 30.0), disc=rng.uniform(7.0, 10.0), phase=rng.uniform(0.0, 40.0),
        canal_y=spine_y - vert_b - canal_r - 1.0, canal_r=canal_r,
        lordosis=rng.uniform(0.0, 8.0),
    )
    aorta_r = rng.uniform(9.0, 13.0)
    vessels = dict(
        aorta_x=-rng.uniform(8.0, 18.0),  # left of midline
        aorta_y=spine_y + vert_b + aorta_r + rng.uniform(2.0, 5.0), aorta_r=aorta_r,
        aorta_wiggle=rng.uniform(0.0, 4.0),
        ivc_x=rng.uniform(18.0, 28.0),  # right of midline
        ivc_y=spine_y + vert_b + rng.uniform(6.0, 12.0),
        ivc_a=rng.uniform(10.0, 13.0), ivc_b=rng.uniform(7.0, 10.0),
    )

    liver_axes = np.array([rng.uniform(80.0, 95.0), rng.uniform(65.0, 80.0), rng.uniform(65.0, 78.0)])
    liver = _Blob(
        np.array([rng.uniform(40.0, 55.0), rng.uniform(0.0, 15.0), -liver_axes[2] * rng.uniform(0.95, 1.05)]),
        liver_axes, _rotation(*rng.uniform(-8.0, 8.0, size=3)), *_random_bumps(rng, 6, 0.10),
        bump_width=0.7, taper=rng.uniform(0.3, 0.45),
    )
    liver_dome_mm = _z_range(liver)[1]
    if liver_span_mm is not None:
        _set_liver_span(liver, liver_span_mm)

    kidneys = {}
    left_z = -rng.uniform(95.0, 115.0)
    for name, side, z in (("kidney_left", -1.0, left_z), ("kidney_right", 1.0, left_z - rng.uniform(10.0, 25.0))):
        # local axis 0 points laterally; a reflection for the left kidney is fine
        frame = np.diag([side, 1.0, 1.0])
        # upper pole tilted medially, hilum turned antero-medially
        local = _rotation(0.0, -rng.uniform(10.0, 20.0), -rng.uniform(20.0, 40.0))
        kidneys[name] = _Blob(
            np.array([side * rng.uniform(55.0, 68.0), spine_y - rng.uniform(0.0, 10.0), z]),
            np.array([rng.uniform(24.0, 29.0), rng.uniform(18.0, 23.0), rng.uniform(48.0, 58.0)]),
            frame @ local, *_random_bumps(rng, 4, 0.08), bump_width=0.6,
            bend=rng.uniform(0.15, 0.3), bend_axes=(0, 2),
        )

    stomach = _Blob(
        np.array([-rng.uniform(30.0, 50.0), rng.uniform(15.0, 35.0), -rng.uniform(40.0, 70.0)]),
        np.array([rng.uniform(35.0, 45.0), rng.uniform(25.0, 35.0), rng.uniform(40.0, 55.0)]),
        _rotation(*rng.uniform(-15.0, 15.0, size=3)), *_random_bumps(rng, 5, 0.12), bump_width=0.6,
    )
    stomach_gas = rng.uniform(0.3, 0.6)  # gas floats anteriorly in a supine patient

    # Portal vessels: branches from the hilum (medial, posterior part of the liver).
    hilum = liver.centre + np.array([-0.35 * liver.axes[0], -0.2 * liver.axes[1], -0.1 * liver.axes[2]])
    branches = []
    for _ in range(int(rng.integers(3, 6))):
        direction = rng.normal(size=3) * np.array([1.0, 0.6, 0.8]) + np.array([0.8, 0.3, 0.0])
        direction /= np.linalg.norm(direction)
        branches.append((hilum, hilum + direction * rng.uniform(40.0, 75.0), rng.uniform(2.5, 5.5)))

    spleen, spleen_target_ml = _spleen_blob(spleen_rng, config, positive, body)
    kidney_shift = _make_room(kidneys["kidney_left"], spleen)
    return dict(body=body, spine=spine, vessels=vessels, liver=liver, kidneys=kidneys, stomach=stomach,
                stomach_gas=stomach_gas, branches=branches, spleen=spleen, spleen_target_ml=spleen_target_ml,
                kidney_left_shift_mm=kidney_shift, liver_dome_mm=liver_dome_mm, liver_span_target_mm=liver_span_mm)


def _draw_geometry(rng: np.random.Generator, config: PhantomConfig, anatomy: dict[str, Any]) -> dict[str, Any]:
    """Spacing, matrix, scan range and where the body lies in the scanner."""
    body = anatomy["body"]
    offset = np.array([rng.uniform(-10.0, 10.0), rng.uniform(-15.0, 15.0)])  # body centre vs. scanner isocentre
    needed_fov = 2.0 * (max(body["a"] * (1.0 + abs(body["taper"])), body["b"]) + np.abs(offset).max()) + rng.uniform(20.0, 50.0)
    lo, hi = config.inplane_spacing_mm
    if config.matrix is None:
        sxy = rng.uniform(lo, hi)
        matrix = int(math.ceil(needed_fov / sxy / 2.0) * 2)
    else:
        matrix = int(config.matrix)
        # Scanners pick the reconstruction FOV to fit the patient; stay in range.
        sxy = rng.uniform(min(max(lo, needed_fov / matrix), hi), hi)
    sz = rng.uniform(*config.slice_spacing_mm)

    top = rng.uniform(5.0, 20.0)  # above the liver dome
    extent = rng.uniform(*config.extent_mm)
    spleen_bottom = anatomy["spleen"].surface_points()[:, 2].min()
    extent = max(extent, top - spleen_bottom + 10.0)  # the class rule needs the whole spleen
    if config.task == "hepatomegaly":
        # The class rule needs the whole liver. Cover the longest liver the task can
        # draw below this case's dome (which does not depend on the class), never this
        # liver's own span: a scan length that followed the liver would give the class away.
        extent = max(extent, top - anatomy["liver_dome_mm"] + config.liver_enlarged_span_mm[1] + 10.0)
    nz = int(round(extent / sz)) + 1
    table_z = rng.uniform(-400.0, -100.0)  # world z of the body frame's origin (table position)
    return dict(sxy=float(sxy), sz=float(sz), matrix=matrix, nz=nz, top=float(top), offset=offset, table_z=float(table_z))


def generate_phantom(seed: int, config: PhantomConfig | None = None, *, positive: bool | None = None) -> Phantom:
    """Draw one synthetic abdominal CT case.

    Args:
        seed: the case's seed; the same seed and config give identical arrays.
        config: ranges to draw from (default: the small preset, splenomegaly).
        positive: force the class; ``None`` draws it with ``config.prevalence``.
            Forcing it changes only the class-specific part, so ``seed`` with
            ``positive=True`` / ``False`` is a matched pair: for ``"lesion"`` the
            two images differ only around the lesion; for ``"splenomegaly"`` the
            spleen differs, and with it the left kidney's displacement and the
            scan length when the bigger spleen needs more slices; for
            ``"hepatomegaly"`` the liver's span differs (and the portal vessels
            that hang from it), the scan geometry does not.

    Returns:
        A :class:`Phantom`: ``image`` ``[X, Y, Z]`` float32 HU and ``label``
        ``[X, Y, Z]`` uint8 on a RAS grid with ``affine``; X = Y = the in-plane
        matrix, Z = the number of slices (inferior to superior).
    """
    config = config or PhantomConfig()
    seq = np.random.SeedSequence(int(seed))
    # Independent streams: forcing the class or changing noise leaves the anatomy alone.
    class_rng, anatomy_rng, spleen_rng, geometry_rng, texture_rng, lesion_rng = (
        np.random.default_rng(s) for s in seq.spawn(6)
    )
    drawn_positive = bool(class_rng.random() < config.prevalence)
    positive = drawn_positive if positive is None else bool(positive)

    liver_span_mm = None
    if config.task == "hepatomegaly":
        # Drawn after the class from the class stream, so seed with positive=True / False
        # is a matched pair whose livers differ in span only.
        span_range = config.liver_enlarged_span_mm if positive else config.liver_normal_span_mm
        liver_span_mm = float(class_rng.uniform(*span_range))
    anatomy = _draw_anatomy(anatomy_rng, config, positive, spleen_rng, liver_span_mm)
    geo = _draw_geometry(geometry_rng, config, anatomy)
    hu = _draw_hu(texture_rng, config.hu_ranges)
    sxy, sz, n, nz = geo["sxy"], geo["sz"], geo["matrix"], geo["nz"]
    spacing = (sxy, sxy, sz)

    # Voxel (0, 0, 0) in world; the FOV is centred on the scanner isocentre.
    origin = np.array([-(n - 1) / 2.0 * sxy, -(n - 1) / 2.0 * sxy, geo["table_z"] + geo["top"] - (nz - 1) * sz])
    affine = np.diag([sxy, sxy, sz, 1.0])
    affine[:3, 3] = origin
    body_to_world = np.array([geo["offset"][0], geo["offset"][1], geo["table_z"]])
    grid = _Grid(
        origin[0] - body_to_world[0] + np.arange(n) * sxy,
        origin[1] - body_to_world[1] + np.arange(n) * sxy,
        origin[2] - body_to_world[2] + np.arange(nz) * sz,
        spacing,
    )

    image, label = _paint(grid, anatomy, hu, texture_rng)

    spleen_voxels = int(np.count_nonzero(label == ORGANS["spleen"]))
    spleen_ml = spleen_voxels * float(np.prod(spacing)) / 1000.0
    liver_span = _extent_along_z(label == ORGANS["liver"], sz)
    if config.task == "splenomegaly":
        class_label = int(spleen_ml > config.spleen_threshold_ml)
    elif config.task == "hepatomegaly":
        class_label = int(liver_span > config.liver_span_threshold_mm)
    else:
        class_label = int(positive)

    lesion_info, lesion_mask = None, None
    if config.task == "lesion" and positive:
        lesion_info, lesion_mask = _add_lesion(lesion_rng, config, grid, image, label, hu, affine)
        if lesion_mask is None:  # no room in the liver (it never happens with the default anatomy)
            class_label = 0

    image, noise_sigma = _acquire(image, grid, config, texture_rng)

    organ_ml = {name: float(np.count_nonzero(label == value)) * float(np.prod(spacing)) / 1000.0
                for name, value in ORGANS.items() if value}
    info: dict[str, Any] = {
        "seed": int(seed),
        "task": config.task,
        "class_label": class_label,
        "class_name": CLASS_NAMES[config.task][class_label],
        "positive": positive,
        "spacing_mm": [float(s) for s in spacing],
        "shape": [int(s) for s in image.shape],
        "organ_ml": organ_ml,
        "spleen_ml": spleen_ml,
        "spleen_target_ml": anatomy["spleen_target_ml"],
        "spleen_threshold_ml": config.spleen_threshold_ml,
        "spleen_length_mm": _extent_along_z(label == ORGANS["spleen"], sz),
        "liver_span_mm": liver_span,
        "liver_span_target_mm": anatomy["liver_span_target_mm"],
        "lesion": lesion_info,
        "noise_hu": noise_sigma,
        "hu": hu,
        "body_centre_mm": [float(body_to_world[0]), float(body_to_world[1])],
        "kidney_left_shift_mm": anatomy["kidney_left_shift_mm"],
    }
    return Phantom(image=image, label=label, affine=affine, spacing=spacing, class_label=class_label,
                   info=info, lesion_mask=lesion_mask)


def _extent_along_z(mask: np.ndarray, sz: float) -> float:
    slices = np.flatnonzero(mask.any(axis=(0, 1)))
    return float((slices[-1] - slices[0] + 1) * sz) if slices.size else 0.0


def _paint(grid: _Grid, anatomy: dict[str, Any], hu: dict[str, float], rng: np.random.Generator
           ) -> tuple[np.ndarray, np.ndarray]:
    """Noise-free HU image and label, structures painted back to front (later wins)."""
    x, y, z = grid.x[:, None, None], grid.y[None, :, None], grid.z[None, None, :]
    body = anatomy["body"]
    # Body outline: ellipse per slice, slowly tapering along z.
    widen = (1.0 + body["taper"] * (-grid.z / 200.0)).astype(np.float32)[None, None, :]

    def ellipse(a: float, b: float) -> np.ndarray:
        return (x / (a * widen)) ** 2 + (y / (b * widen)) ** 2 < 1.0

    image = np.full(grid.shape, HU_RANGES["air"][0], dtype=np.float32)
    label = np.zeros(grid.shape, dtype=np.uint8)
    skin = ellipse(body["a"], body["b"])
    image[skin] = hu["fat"]
    inner_a, inner_b = body["cavity_a"] + body["muscle"], body["cavity_b"] + body["muscle"]
    image[ellipse(inner_a, inner_b)] = hu["muscle"]
    cavity = ellipse(body["cavity_a"], body["cavity_b"])
    del skin

    # Bowel loops and visceral fat from a smooth random field; gas floats anteriorly.
    loops = _smooth_field(rng, grid, 14.0)
    texture = _smooth_field(rng, grid, 8.0)  # slow parenchymal inhomogeneity
    mix = np.where(loops > rng.uniform(-0.3, 0.3), hu["bowel"] + 6.0 * texture, hu["fat"] + 8.0 * texture)
    gas = (loops > 1.9) & (y > -10.0)
    mix = np.where(gas, hu["gas"], mix)
    image[cavity] = mix[cavity]
    del mix, gas, loops
    # Lung bases above the diaphragm, lowest in the postero-lateral recesses;
    # the organs painted below cover the dome.
    radius2 = (x / body["cavity_a"]) ** 2 + (y / body["cavity_b"]) ** 2
    lung = cavity & (z > 12.0 + 18.0 * (1.0 - radius2) + 12.0 * (y / body["cavity_b"]))
    image[lung] = hu["lung"] + 15.0 * texture[lung]
    del lung, radius2

    def paint_blob(blob: _Blob, value: float | None, organ: str | None, clip: np.ndarray | None = None,
                   level: float = 1.0) -> tuple[tuple[slice, slice, slice], np.ndarray] | None:
        found = grid.blob(blob)
        if found is None:
            return None
        box, lev = found
        mask = lev < level
        if clip is not None:
            mask &= clip[box]
        if value is not None:
            image[box][mask] = value + 4.0 * texture[box][mask]
        if organ is not None:
            label[box][mask] = ORGANS[organ]
        return box, lev

    stomach = paint_blob(anatomy["stomach"], hu["muscle"] - 10.0, None, cavity)
    if stomach is not None:
        box, lev = stomach
        st = anatomy["stomach"]
        inner = (lev < 0.85) & cavity[box]
        local_y = (st.rotation[0, 1] * (grid.x[box[0]][:, None, None] - st.centre[0])
                   + st.rotation[1, 1] * (grid.y[box[1]][None, :, None] - st.centre[1])
                   + st.rotation[2, 1] * (grid.z[box[2]][None, None, :] - st.centre[2])) / st.axes[1]
        image[box][inner] = hu["stomach_content"]
        image[box][inner & (local_y > anatomy["stomach_gas"])] = hu["gas"]

    spine = anatomy["spine"]
    # The spine curves a little (lordosis) along z.
    sy = spine["y"] + spine["lordosis"] * np.sin(grid.z / 120.0)[None, None, :]
    canal_y = spine["canal_y"] + (sy - spine["y"])
    for side in (-1.0, 1.0):
        para = ((x - side * (spine["canal_r"] + 22.0)) / 26.0) ** 2 + ((y - (canal_y - 14.0)) / 20.0) ** 2 < 1.0
        image[np.broadcast_to(para, grid.shape)] = hu["muscle"]
    period = spine["height"] + spine["disc"]
    in_body_segment = (((grid.z + spine["phase"]) % period) < spine["height"])[None, None, :]
    canal_d = np.sqrt((x - spine["x"]) ** 2 + (y - canal_y) ** 2)
    arch = (canal_d < spine["canal_r"] + 5.0) | (
        (np.abs(x - spine["x"]) < 4.0) & (y < canal_y) & (y > canal_y - spine["canal_r"] - 28.0))
    image[arch & in_body_segment] = hu["bone_cortical"] * 0.7
    image[np.broadcast_to(canal_d < spine["canal_r"], grid.shape)] = hu["csf"]
    del canal_d, arch

    liver = anatomy["liver"]
    found = paint_blob(liver, hu["liver"], "liver", cavity)
    if found is not None:
        box, lev = found
        in_liver = label[box] == ORGANS["liver"]
        bx, by, bz = grid.coords(box)
        for a, b, radius in anatomy["branches"]:
            vessel = (_segment_distance(bx, by, bz, a, b) < radius) & in_liver
            image[box][vessel] = hu["portal_vessels"]

    vessels = anatomy["vessels"]
    ivc = ((x - vessels["ivc_x"]) / vessels["ivc_a"]) ** 2 + ((y - vessels["ivc_y"] - (sy - spine["y"])) / vessels["ivc_b"]) ** 2 < 1.0
    ivc = np.broadcast_to(ivc, grid.shape)
    image[ivc] = hu["ivc"]
    label[ivc] = 0  # the IVC runs through the liver but is not liver

    for name, kidney in anatomy["kidneys"].items():
        found = paint_blob(kidney, hu["kidney_medulla"], name)
        if found is not None:
            box, lev = found
            cortex = (lev < 1.0) & (lev > 0.72)
            image[box][cortex] = hu["kidney_cortex"]

    aorta_x = vessels["aorta_x"] + vessels["aorta_wiggle"] * np.sin(grid.z / 90.0)[None, None, :]
    aorta_y = vessels["aorta_y"] + (sy - spine["y"])
    aorta = ((x - aorta_x) ** 2 + (y - aorta_y) ** 2) < vessels["aorta_r"] ** 2
    image[aorta] = hu["aorta"] + 3.0 * texture[aorta]
    label[aorta] = ORGANS["aorta"]
    del aorta

    # Vertebral column: cortical rim, cancellous core; discs between bodies.
    column = ((x - spine["x"]) / spine["a"]) ** 2 + ((y - sy) / spine["b"]) ** 2
    vertebra = (column < 1.0) & in_body_segment
    dist_to_disc = np.minimum((grid.z + spine["phase"]) % period, spine["height"] - (grid.z + spine["phase"]) % period)
    rim = (column > 0.72) | (dist_to_disc < 1.5)[None, None, :]
    image[(column < 1.0) & ~in_body_segment] = hu["disc"]
    image[vertebra] = hu["bone_cancellous"] + 15.0 * texture[vertebra]
    image[vertebra & rim] = hu["bone_cortical"]
    label[vertebra] = ORGANS["vertebrae"]
    del column, vertebra, rim

    # Spleen last: nothing may cut into it, so its labelled volume is the drawn one.
    paint_blob(anatomy["spleen"], hu["spleen"], "spleen")
    return image, label


def _add_lesion(rng: np.random.Generator, config: PhantomConfig, grid: _Grid, image: np.ndarray, label: np.ndarray,
                hu: dict[str, float], affine: np.ndarray) -> tuple[dict[str, Any] | None, np.ndarray | None]:
    """Put one hypodense lesion deep enough in the liver; returns (info, mask)."""
    liver = label == ORGANS["liver"]
    if not liver.any():
        return None, None
    idx = np.argwhere(liver)
    lo, hi = idx.min(axis=0), idx.max(axis=0) + 1
    box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    depth = ndimage.distance_transform_edt(np.pad(liver[box], 1), sampling=grid.spacing)[1:-1, 1:-1, 1:-1]
    diameter = rng.uniform(*config.lesion_diameter_mm)
    radius = diameter / 2.0
    candidates = np.argwhere(depth >= radius + 4.0)
    if len(candidates) == 0:
        candidates = np.argwhere(depth >= min(radius, float(depth.max())))
    pick = candidates[rng.integers(len(candidates))] + lo
    centre = np.array([grid.x[pick[0]], grid.y[pick[1]], grid.z[pick[2]]], dtype=np.float64)
    dirs, amps = _random_bumps(rng, 3, 0.08)
    blob = _Blob(centre, radius * rng.uniform(0.85, 1.15, size=3), _rotation(*rng.uniform(-90, 90, size=3)), dirs, amps)
    found = grid.blob(blob)
    if found is None:
        return None, None
    lbox, lev = found
    mask = np.zeros(grid.shape, dtype=bool)
    mask[lbox] = (lev < 1.0) & liver[lbox]
    if not mask.any():
        return None, None
    contrast = rng.uniform(*config.lesion_contrast_hu)
    image[mask] = hu["liver"] - contrast + 2.0 * rng.standard_normal(int(mask.sum())).astype(np.float32)
    slices = np.flatnonzero(mask.any(axis=(0, 1)))
    voxel = pick.astype(np.float64)
    world = (affine @ np.array([*voxel, 1.0]))[:3]
    info = {
        "center_mm": [float(v) for v in world],
        "center_voxel": [int(v) for v in pick],
        "diameter_mm": float(diameter),
        "contrast_hu": float(contrast),
        "volume_ml": float(mask.sum() * np.prod(grid.spacing) / 1000.0),
        "slices": [int(s) for s in slices],
    }
    return info, mask


def _acquire(image: np.ndarray, grid: _Grid, config: PhantomConfig, rng: np.random.Generator
             ) -> tuple[np.ndarray, float]:
    """Scanner blur (partial volume) and correlated noise; clip to the CT range."""
    sxy, _, sz = grid.spacing
    # At least half a voxel of blur: point-sampled edges would otherwise be too crisp.
    psf = (max(0.5, 0.7 / sxy), max(0.5, 0.7 / sxy), max(0.4, 0.5 / sz))
    image = ndimage.gaussian_filter(image, psf, mode="nearest")
    sigma = float(rng.uniform(*config.noise_hu))
    noise = rng.standard_normal(image.shape, dtype=np.float32)
    corr = config.noise_correlation_mm / sxy
    if corr > 0.25:  # below a quarter voxel the correlation is invisible
        noise = ndimage.gaussian_filter(noise, (corr, corr, 0.0))
        noise /= max(float(noise[::3, ::3, ::2].std()), 1e-6)
    image += sigma * noise
    np.clip(image, _HU_MIN, _HU_MAX, out=image)
    return image.astype(np.float32, copy=False), sigma


# ------------------------------------------------------------------ writing --


def _save_nifti(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
    """Write a NIfTI atomically (temporary name in the same folder, then rename)."""
    import nibabel as nib

    img = nib.Nifti1Image(array, affine)
    img.header.set_xyzt_units("mm")
    img.set_qform(affine, code=1)  # scanner anatomical
    img.set_sform(affine, code=1)
    tmp = path.with_name(f".{path.name[:-7]}.{uuid.uuid4().hex[:8]}.tmp.nii.gz")
    try:
        nib.save(img, str(tmp))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _image_int16(image: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(image), _HU_MIN, _HU_MAX).astype(np.int16)


def _dicom_uids(case_id: str, seed: int) -> tuple[str, str]:
    """Stable study/series UIDs, so a rewritten case is the same DICOM series."""
    from volumes._optional import require

    pydicom_uid = require("pydicom.uid", "writing phantoms as DICOM")
    study = pydicom_uid.generate_uid(entropy_srcs=["volumes-phantom-study", case_id, str(seed)])
    series = pydicom_uid.generate_uid(entropy_srcs=["volumes-phantom-series", case_id, str(seed)])
    return study, series


def write_case(phantom: Phantom, out_dir: str | Path, case_id: str, *, fmt: str = "nifti") -> dict[str, Any]:
    """Write one phantom under ``out_dir``.

    ``fmt="nifti"``: ``images/<id>.nii.gz`` (int16 HU) and ``labels/<id>.nii.gz``
    (uint8). ``fmt="dicom"``: a CT series in ``dicom/<id>/`` (via
    :func:`volumes.data.dicom.write_dicom_series`) plus the label NIfTI on the
    same grid. ``fmt="both"``: all three. Files appear atomically.

    Returns:
        ``{"case_id", "image", "label", "class_label"}`` with paths relative to
        ``out_dir`` (``image`` is the DICOM folder for ``fmt="dicom"``), plus
        ``"dicom"`` when a series was written.
    """
    if fmt not in ("nifti", "dicom", "both"):
        raise ConfigError("fmt", fmt, ("nifti", "dicom", "both"))
    out = Path(out_dir)
    (out / "labels").mkdir(parents=True, exist_ok=True)
    entry: dict[str, Any] = {"case_id": case_id, "class_label": int(phantom.class_label)}
    hu = _image_int16(phantom.image)
    if fmt in ("nifti", "both"):
        (out / "images").mkdir(parents=True, exist_ok=True)
        _save_nifti(hu, phantom.affine, out / "images" / f"{case_id}.nii.gz")
        entry["image"] = f"images/{case_id}.nii.gz"
    _save_nifti(np.ascontiguousarray(phantom.label, dtype=np.uint8), phantom.affine, out / "labels" / f"{case_id}.nii.gz")
    entry["label"] = f"labels/{case_id}.nii.gz"
    if fmt in ("dicom", "both"):
        from volumes.data.dicom import write_dicom_series

        final = out / "dicom" / case_id
        tmp = out / "dicom" / f".{case_id}.{uuid.uuid4().hex[:8]}.tmp"
        tmp.mkdir(parents=True)
        study, series = _dicom_uids(case_id, int(phantom.info.get("seed", 0)))
        try:
            write_dicom_series(
                hu, phantom.affine, tmp,
                series_description=f"volumes phantom {case_id} ({phantom.info.get('task', '')})",
                patient_id=case_id, study_uid=study, series_uid=series, modality="CT",
            )
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)
        entry["dicom"] = f"dicom/{case_id}"
        if fmt == "dicom":
            entry["image"] = entry["dicom"]
    return {k: entry[k] for k in ("case_id", "image", "label", "class_label", "dicom") if k in entry}


def case_seed(seed: int, index: int) -> int:
    """Seed of case ``index`` of a cohort: depends on (seed, index) only."""
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1, dtype=np.uint32)[0])


def _stratified_splits(labels: Sequence[int], fractions: Sequence[float], seed: int) -> list[int]:
    """Split index (0, 1, 2, ...) per case, keeping the class mix in every split."""
    total = float(sum(fractions))
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x5B117]))
    out = [0] * len(labels)
    for cls in sorted(set(labels)):
        members = [i for i, c in enumerate(labels) if c == cls]
        rng.shuffle(members)
        # Rounded cumulative boundaries: counts add up exactly and small
        # classes spread over the splits instead of piling into the first.
        bounds = [0] + [int(round(len(members) * c / total)) for c in np.cumsum(fractions)]
        for split in range(len(fractions)):
            for i in members[bounds[split]:bounds[split + 1]]:
                out[i] = split
    return out


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


SPLIT_NAMES = ("training", "validation", "test")


def write_cohort(out_dir: str | Path, n: int, seed: int, config: PhantomConfig | None = None, *,
                 splits: Sequence[float] = (0.6, 0.2, 0.2), dicom_cases: int = 0, name: str | None = None,
                 progress: bool | None = None) -> Path:
    """Generate and write ``n`` phantoms plus a MONAI datalist.

    Layout under ``out_dir``: ``images/``, ``labels/``, ``dicom/<id>/`` (for
    ``dicom_cases`` cases, test split first, written in addition to NIfTI),
    ``datalist.json`` (MONAI decathlon style: ``training`` / ``validation`` /
    ``test`` lists of ``{"image", "label", "class_label", "case_id"}`` with
    paths relative to ``out_dir``, plus a ``dicom`` list of the DICOM copies),
    ``cohort.csv`` (one row per case) and ``cases.json`` (each case's info).

    Case ``i`` uses :func:`case_seed` ``(seed, i)``, so it is the same case
    whatever ``n`` is; splits are stratified by class and depend on ``n``.

    Returns:
        Path of ``datalist.json``.
    """
    config = config or PhantomConfig()
    if n < 1:
        raise ConfigError("n", n, "a positive number of cases")
    if len(splits) != 3 or min(splits) < 0 or sum(splits) <= 0:
        raise ConfigError("splits", tuple(splits), "three non-negative fractions (training, validation, test)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = name or f"volumes-phantoms-{config.task}"
    show = sys.stderr.isatty() if progress is None else progress

    from tqdm.auto import tqdm

    phantom_infos: list[dict[str, Any]] = []
    entries: list[dict[str, Any]] = []
    for index in tqdm(range(n), desc=f"phantoms ({config.task})", disable=not show, unit="case"):
        case_id = f"case_{index:04d}"
        phantom = generate_phantom(case_seed(seed, index), config)
        entries.append(write_case(phantom, out, case_id, fmt="nifti"))
        phantom_infos.append(phantom.info)
        del phantom

    split_of = _stratified_splits([e["class_label"] for e in entries], splits, seed)
    ordered = sorted(range(n), key=lambda i: (-split_of[i], i))  # test split first for DICOM copies
    dicom_ids = set()
    for i in ordered[: max(0, min(int(dicom_cases), n))]:
        # Regenerating is cheaper than keeping every phantom in memory.
        phantom = generate_phantom(case_seed(seed, i), config)
        entries[i] = write_case(phantom, out, entries[i]["case_id"], fmt="both")
        dicom_ids.add(i)

    class_names = CLASS_NAMES[config.task]
    datalist: dict[str, Any] = {
        "name": name,
        "description": f"Synthetic abdominal CT phantoms (volumes.data.phantoms), task '{config.task}'",
        "modality": {"0": "CT"},
        "labels": {str(v): k for k, v in ORGANS.items()},
        "task": config.task,
        "class_names": {"0": class_names[0], "1": class_names[1]},
        "seed": int(seed),
        "numCases": n,
        "config": config.to_dict(),
    }
    for split, split_name in enumerate(SPLIT_NAMES):
        datalist[split_name] = [
            {"image": entries[i]["image"], "label": entries[i]["label"], "class_label": entries[i]["class_label"],
             "case_id": entries[i]["case_id"]}
            for i in range(n) if split_of[i] == split
        ]
    datalist["dicom"] = [
        {"image": entries[i]["dicom"], "label": entries[i]["label"], "class_label": entries[i]["class_label"],
         "case_id": entries[i]["case_id"], "split": SPLIT_NAMES[split_of[i]]}
        for i in sorted(dicom_ids)
    ]
    datalist_path = out / "datalist.json"
    _atomic_write_text(datalist_path, json.dumps(datalist, indent=2) + "\n")
    _atomic_write_text(out / "cases.json", json.dumps(
        {entries[i]["case_id"]: phantom_infos[i] for i in range(n)}, indent=1) + "\n")

    fields = ["case_id", "image", "label", "class_label", "class_name", "split", "seed", "spleen_ml", "liver_ml",
              "spacing_x", "spacing_y", "spacing_z", "nx", "ny", "nz", "lesion_diameter_mm", "dicom"]
    rows = []
    for i in range(n):
        info = phantom_infos[i]
        lesion = info.get("lesion") or {}
        rows.append({
            "case_id": entries[i]["case_id"], "image": entries[i]["image"], "label": entries[i]["label"],
            "class_label": entries[i]["class_label"], "class_name": info["class_name"],
            "split": SPLIT_NAMES[split_of[i]], "seed": info["seed"],
            "spleen_ml": f"{info['spleen_ml']:.1f}", "liver_ml": f"{info['organ_ml']['liver']:.1f}",
            "spacing_x": f"{info['spacing_mm'][0]:.4f}", "spacing_y": f"{info['spacing_mm'][1]:.4f}",
            "spacing_z": f"{info['spacing_mm'][2]:.4f}",
            "nx": info["shape"][0], "ny": info["shape"][1], "nz": info["shape"][2],
            "lesion_diameter_mm": f"{lesion['diameter_mm']:.1f}" if lesion else "",
            "dicom": entries[i].get("dicom", ""),
        })
    tmp = out / f".cohort.csv.{uuid.uuid4().hex[:8]}.tmp"
    with open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, out / "cohort.csv")
    return datalist_path


def cohort_summary(datalist_path: Path) -> str:
    """One paragraph on a cohort written by :func:`write_cohort`: classes, splits, geometry, files."""
    datalist = json.loads(datalist_path.read_text())
    out = datalist_path.parent
    cases = json.loads((out / "cases.json").read_text())
    parts = []
    for split in SPLIT_NAMES:
        items = datalist[split]
        parts.append(f"{split} {len(items)} ({sum(e['class_label'] for e in items)} positive)")
    spacing = np.array([c["spacing_mm"] for c in cases.values()])
    shapes = np.array([c["shape"] for c in cases.values()])
    n_pos = sum(c["class_label"] for c in cases.values())
    text = (
        f"Wrote {len(cases)} synthetic CT phantoms for task '{datalist['task']}' "
        f"({n_pos} {datalist['class_names']['1']}, {len(cases) - n_pos} {datalist['class_names']['0']}) to {out}: "
        f"{', '.join(parts)}. In-plane spacing {spacing[:, 0].min():.2f}-{spacing[:, 0].max():.2f} mm, "
        f"slice spacing {spacing[:, 2].min():.2f}-{spacing[:, 2].max():.2f} mm, "
        f"matrix {shapes[:, 0].min()}-{shapes[:, 0].max()}, {shapes[:, 2].min()}-{shapes[:, 2].max()} slices."
    )
    if datalist.get("dicom"):
        text += f" {len(datalist['dicom'])} case(s) also written as DICOM series under {out / 'dicom'}."
    text += f" Datalist (MONAI decathlon format): {datalist_path}; per-case table: {out / 'cohort.csv'}."
    return text

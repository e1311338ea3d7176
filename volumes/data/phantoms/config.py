"""Phantom configuration: organ labels, tasks, tissue HU ranges, :class:`PhantomConfig`, :class:`Phantom`.

The class rules of the tasks and the presets are explained in ``docs/PHANTOMS.md``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from volumes.errors import ConfigError

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
    spacing on a 512 x 512 matrix. The class rules are in ``docs/PHANTOMS.md``.

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


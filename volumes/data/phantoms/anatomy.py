"""One case's anatomy and scan geometry, drawn in the body frame (mm) from its random streams.

What is drawn and why (organ sizes, positions, the class-specific parts) is in
``docs/PHANTOMS.md``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from volumes.data.phantoms.config import HU_RANGES, PhantomConfig
from volumes.data.phantoms.shapes import _Blob, _random_bumps, _rotation


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


@dataclass
class _Case:
    """Everything one seed draws before a voxel is painted (see :func:`_draw_case`)."""

    positive: bool
    anatomy: dict[str, Any]
    geometry: dict[str, Any]
    hu: dict[str, float]
    texture_rng: np.random.Generator  # then draws the smooth fields and the noise, in that order
    lesion_rng: np.random.Generator


def _draw_case(seed: int, config: PhantomConfig, positive: bool | None) -> _Case:
    """The class, anatomy, scan geometry and tissue HU of case ``seed``; ``positive`` forces the class."""
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
    geometry = _draw_geometry(geometry_rng, config, anatomy)
    hu = _draw_hu(texture_rng, config.hu_ranges)
    return _Case(positive, anatomy, geometry, hu, texture_rng, lesion_rng)

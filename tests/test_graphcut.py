"""Intensity GraphCut from clicks (volumes.interactive.graphcut): accuracy on synthetic CT, connected
components, what a negative click can and cannot do, the click guarantees and the input errors."""

from __future__ import annotations

import numpy as np
import pytest

from volumes.interactive.graphcut import graphcut_segment

SPACING = (2.0, 2.0, 3.0)
SHAPE = (48, 48, 24)  # 96 x 96 x 72 mm


def _mm_grid() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return np.meshgrid(*[np.arange(n) * s for n, s in zip(SHAPE, SPACING)], indexing="ij")


def _sphere(centre_mm: tuple[float, float, float], radius_mm: float) -> np.ndarray:
    x, y, z = _mm_grid()
    return (x - centre_mm[0]) ** 2 + (y - centre_mm[1]) ** 2 + (z - centre_mm[2]) ** 2 <= radius_mm**2


def _ct(regions: list[tuple[np.ndarray, float]], seed: int = 0) -> np.ndarray:
    """HU 40 soft tissue with the given regions painted in, plus Gaussian noise of 10 HU."""
    image = np.full(SHAPE, 40.0)
    for mask, hu in regions:
        image[mask] = hu
    return image + np.random.default_rng(seed).normal(0.0, 10.0, SHAPE)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / float(a.sum() + b.sum())


def test_one_click_segments_bright_ellipsoid():
    x, y, z = _mm_grid()
    ellipsoid = ((x - 48) / 20) ** 2 + ((y - 48) / 14) ** 2 + ((z - 36) / 12) ** 2 <= 1.0
    image = _ct([(ellipsoid, 150.0)])
    mask = graphcut_segment(image, [(24, 24, 12)], spacing=SPACING)
    assert mask.shape == SHAPE and mask.dtype == bool
    assert _dice(mask, ellipsoid) > 0.9  # measured 1.000 (110 HU step vs 10 HU noise)


def test_only_the_clicked_blob_is_kept():
    a = _sphere((30, 48, 36), 12)
    b = _sphere((70, 48, 36), 12)  # same HU, 16 mm gap
    image = _ct([(a | b, 150.0)], seed=1)
    mask = graphcut_segment(image, [(15, 24, 12)], spacing=SPACING)
    assert _dice(mask, a) > 0.9  # measured 1.000
    assert not (mask & b).any()


def test_negative_click_cuts_off_touching_region_of_other_intensity():
    """Sphere A (150 HU) overlaps sphere B by a 7 mm-radius neck. With B at 110 HU (unseen by both
    histograms) a click in A takes B along; a negative click in B puts 110 HU in the background
    histogram, and the cut then follows the A/B edge."""
    a = _sphere((34, 48, 36), 14)
    b = _sphere((58, 48, 36), 14) & ~a
    image = _ct([(a, 150.0), (b, 110.0)], seed=2)
    positive, negative = (17, 24, 12), (29, 24, 12)
    assert a[positive] and b[negative]

    only_positive = graphcut_segment(image, [positive], spacing=SPACING)
    assert (only_positive & b).sum() / b.sum() > 0.9  # measured 0.999: B leaks in

    mask = graphcut_segment(image, [positive], [negative], spacing=SPACING)
    assert not mask[negative]
    assert (mask & b).sum() / b.sum() < 0.3  # measured 0.000
    assert _dice(mask, a) > 0.8  # measured 1.000


def test_negative_click_cannot_separate_same_intensity():
    """The documented limit: with A and B both at 150 HU the histograms cannot tell them apart, so
    the negative click removes only its own ball (click_radius_mm) and B stays mostly in."""
    a = _sphere((34, 48, 36), 14)
    b = _sphere((58, 48, 36), 14) & ~a
    image = _ct([(a | b, 150.0)], seed=2)
    mask = graphcut_segment(image, [(17, 24, 12)], [(29, 24, 12)], spacing=SPACING)
    assert not mask[29, 24, 12]
    assert (mask & b).sum() / b.sum() > 0.8  # measured 0.944


def test_click_voxels_are_guaranteed():
    ball = _sphere((48, 48, 36), 14)
    image = _ct([(ball, 150.0)], seed=3)
    # A positive click in plain background, a negative one inside the object, and a positive and a
    # negative click 2 mm apart (overlapping balls): every click voxel ends up on its own side.
    positive = [(24, 24, 12), (5, 5, 5), (24, 30, 12)]
    negative = [(26, 24, 12), (24, 31, 12)]
    mask = graphcut_segment(image, positive, negative, spacing=SPACING)
    assert all(mask[p] for p in positive)
    assert not any(mask[n] for n in negative)
    # Outside the ROI (clicks' box grown by margin_mm) nothing is segmented.
    small = graphcut_segment(image, [(24, 24, 12)], spacing=SPACING, margin_mm=10.0)
    assert small[24, 24, 12] and not small[:18].any() and not small[31:].any()


def test_errors_name_the_problem():
    image = np.zeros((8, 8, 4))
    with pytest.raises(ValueError, match="at least one foreground"):
        graphcut_segment(image, [], [(1, 1, 1)])
    with pytest.raises(ValueError, match=r"foreground click \(8, 0, 0\) is outside the image of shape \(8, 8, 4\)"):
        graphcut_segment(image, [(8, 0, 0)])
    with pytest.raises(ValueError, match=r"background click \(0, 0, -1\) is outside"):
        graphcut_segment(image, [(1, 1, 1)], [(0, 0, -1)])
    with pytest.raises(ValueError, match="not a voxel index"):
        graphcut_segment(image, [(1, 1)])
    with pytest.raises(ValueError, match="both foreground and background"):
        graphcut_segment(image, [(1, 1, 1)], [(1, 1, 1)])

"""Controlled corruptions of a CT (volumes.data.corruptions), the QC study's inputs, against known answers."""

from __future__ import annotations

import numpy as np
import pytest

from volumes.data.corruptions import CORRUPTIONS, corrupt

SHAPE = (40, 30, 12)
AFFINE = np.diag([0.8, 0.8, 2.5, 1.0])
AFFINE[:3, 3] = [-10.0, 5.0, 100.0]


def _case():
    image = np.full(SHAPE, 40.0, np.float32)  # soft tissue
    label = np.zeros(SHAPE, np.uint8)
    label[10:20, 8:16, 3:9] = 2
    label[25:30, 5:10, 2:6] = 1
    image[label == 2] = 120.0
    return image, label, AFFINE.copy()


def test_noise_adds_its_sigma_and_changes_nothing_else():
    image, label, affine = _case()
    out, lab, aff = corrupt("noise", image, label, affine, seed=3, sigma_hu=40.0)
    assert np.std(out - image) == pytest.approx(40.0, rel=0.03) and abs(np.mean(out - image)) < 1.0
    assert (lab == label).all() and (aff == affine).all()
    again, _, _ = corrupt("noise", image, label, affine, seed=3, sigma_hu=40.0)
    assert (again == out).all()  # seeded


def test_no_intercept_and_mr_like_remap_the_values():
    image, label, affine = _case()
    shifted, _, _ = corrupt("no_intercept", image, label, affine)
    np.testing.assert_array_equal(shifted, image + 1024.0)
    mr, _, _ = corrupt("mr_like", np.array([-1024.0, -100.0, 0.0, 1000.0, 30.0]), label, affine)
    np.testing.assert_allclose(mr, [0.0, 800.0, 350.0, 80.0, 400.0])  # 30 HU: halfway between 0 and 60


def test_blur_keeps_the_mean_and_smooths_the_edge():
    image, label, affine = _case()
    out, _, _ = corrupt("blur", image, label, affine, sigma_mm=2.0)
    assert out.mean() == pytest.approx(image.mean(), rel=1e-3)
    assert 40.0 < out[9, 12, 6] < 120.0  # just outside the bright organ: now between the two
    assert np.abs(np.diff(out, axis=0)).max() < np.abs(np.diff(image, axis=0)).max()


def test_truncate_crops_x_and_y_and_moves_the_origin_with_the_crop():
    image, label, affine = _case()
    out, lab, aff = corrupt("truncate", image, label, affine, keep=0.5)
    assert out.shape == lab.shape == (20, 15, 12)
    x0, y0 = 10, 7
    np.testing.assert_array_equal(lab, label[x0:x0 + 20, y0:y0 + 15])
    # the world position of a kept voxel does not change
    np.testing.assert_allclose(aff @ [0, 0, 0, 1], affine @ [x0, y0, 0, 1])
    np.testing.assert_allclose(aff[:3, :3], affine[:3, :3])


def test_remove_organ_fills_it_with_fat_and_drops_its_label():
    image, label, affine = _case()
    out, lab, _ = corrupt("remove_organ", image, label, affine, organ=2, seed=0)
    assert not (lab == 2).any() and (lab == 1).sum() == (label == 1).sum()
    assert np.mean(out[label == 2]) == pytest.approx(-100.0, abs=3.0)
    np.testing.assert_array_equal(out[label != 2], image[label != 2])


def test_unknown_corruption_is_named():
    image, label, affine = _case()
    with pytest.raises(ValueError, match=r"unknown corruption 'rotate'.*no_intercept"):
        corrupt("rotate", image, label, affine)
    assert set(CORRUPTIONS) == {"noise", "blur", "truncate", "no_intercept", "mr_like", "remove_organ"}

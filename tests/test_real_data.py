"""Real CT data from ../shared/data/totalsegmentator_example (skipped when the folder is absent)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from volumes.data.io import load_label, load_volume

pytestmark = pytest.mark.shared


@pytest.fixture(scope="module")
def example(shared_data: Path) -> Path:
    folder = shared_data / "totalsegmentator_example"
    if not folder.is_dir():
        pytest.skip(f"{folder} not found")
    return folder


@pytest.fixture(scope="module")
def dicom_ct(example):
    return load_volume(example / "example_ct_dicom")


def spacing_of(volume) -> np.ndarray:
    return np.linalg.norm(volume.affine.numpy()[:3, :3], axis=0)


def assert_ras(volume) -> None:
    matrix = volume.affine.numpy()[:3, :3]
    assert np.allclose(matrix, np.diag(np.diag(matrix))) and np.all(np.diag(matrix) > 0), matrix


def test_nifti_ct(example):
    ct = load_volume(example / "example_ct.nii.gz")
    assert tuple(ct.shape) == (1, 122, 101, 112)
    np.testing.assert_allclose(spacing_of(ct), [3.0, 3.0, 3.0], atol=1e-4)
    assert (ct.min().item(), ct.max().item()) == (-1207.0, 3382.0)
    assert_ras(ct)


def test_dicom_ct(dicom_ct):
    assert tuple(dicom_ct.shape) == (1, 512, 512, 20)
    np.testing.assert_allclose(spacing_of(dicom_ct), [0.9765625, 0.9765625, 2.0], atol=1e-5)
    assert (dicom_ct.min().item(), dicom_ct.max().item()) == (-1024.0, 1839.0)
    assert_ras(dicom_ct)
    # First slice (lowest z in RAS) is the one at ImagePositionPatient z = -804.5.
    np.testing.assert_allclose(dicom_ct.affine.numpy()[:3, 3], [-249.51171875, -61.51171875, -804.5], atol=1e-4)


def test_dicom_read_by_monai_pydicom_reader_agrees(example, dicom_ct):
    """An independent reader (pydicom + MONAI's affine code) gives the same volume."""
    pytest.importorskip("pydicom")
    from monai.data import PydicomReader
    from monai.transforms import LoadImage, Orientation

    other = LoadImage(reader=PydicomReader(), image_only=True, ensure_channel_first=True)(
        str(example / "example_ct_dicom")
    )
    other = Orientation(axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S")))(other)
    assert other.shape == dicom_ct.shape
    np.testing.assert_allclose(spacing_of(other), spacing_of(dicom_ct), atol=1e-5)
    np.testing.assert_allclose(other.affine.numpy(), dicom_ct.affine.numpy(), atol=1e-4)
    np.testing.assert_array_equal(other.numpy(), dicom_ct.numpy())


def test_dicom_segmentation_aligns_in_physical_space(example, dicom_ct):
    """The README says the seg has the series' grid with y flipped; after orientation they coincide."""
    seg = load_label(example / "example_seg_dicom.nii.gz", dicom_ct)
    assert seg.shape == dicom_ct.shape
    np.testing.assert_allclose(seg.affine.numpy(), dicom_ct.affine.numpy(), atol=1e-3)
    # Organ voxels lie inside the body: a flipped or shifted mask would land in air often.
    organs = seg[0].numpy() > 0
    assert organs.sum() > 1000
    assert (dicom_ct[0].numpy()[organs] > -500).mean() > 0.95

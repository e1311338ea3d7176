"""write_dicom_series round trips; check_dicom_series rejects broken series with clear messages."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")

from volumes.data.dicom import check_dicom_series, split_series, write_dicom_series  # noqa: E402
from volumes.data.io import load_volume  # noqa: E402
from volumes.errors import VolumeReadError  # noqa: E402

SHAPE = (12, 10, 7)


def hu_volume(seed: int = 0) -> np.ndarray:
    """Random HU values with fractions, so the int16 rounding is exercised."""
    return np.random.default_rng(seed).uniform(-1024, 2000, SHAPE).astype(np.float32)


def axial_affine() -> np.ndarray:
    affine = np.diag([0.7, 0.9, 3.0, 1.0])
    affine[:3, 3] = [-40.0, 25.0, -300.0]
    return affine


def oblique_descending_affine() -> np.ndarray:
    """Rotated 30 degrees about z, x/y flipped (LPS-like) and slices stepping downwards."""
    angle = np.deg2rad(30)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([-0.7, -0.9, -3.0])
    affine[:3, 3] = [10.0, -20.0, 30.0]
    return affine


def write_series(folder: Path, **kwargs) -> list[Path]:
    return write_dicom_series(hu_volume(), axial_affine(), folder, **kwargs)


def expect_error(folder: Path, phrase: str, **kwargs) -> None:
    with pytest.raises(VolumeReadError) as caught:
        check_dicom_series(folder, **kwargs)
    message = str(caught.value)
    assert message.startswith(str(folder)), message
    assert phrase in message, message


def edit(path: Path, **tags) -> None:
    ds = pydicom.dcmread(path)
    for name, value in tags.items():
        setattr(ds, name, value)
    ds.save_as(path)


@pytest.mark.parametrize("make_affine", [axial_affine, oblique_descending_affine], ids=["axial", "oblique"])
def test_round_trip_matches_nifti(tmp_path, make_affine):
    image, affine = hu_volume(), make_affine()
    files = write_dicom_series(image, affine, tmp_path / "series")
    assert len(files) == SHAPE[2] and all(f.exists() for f in files)
    nib.save(nib.Nifti1Image(np.rint(image), affine), tmp_path / "ref.nii.gz")

    from_dicom, from_nifti = load_volume(tmp_path / "series"), load_volume(tmp_path / "ref.nii.gz")
    assert from_dicom.shape == from_nifti.shape == (1, *SHAPE)
    np.testing.assert_array_equal(from_dicom.numpy(), from_nifti.numpy())
    np.testing.assert_allclose(from_dicom.affine.numpy(), from_nifti.affine.numpy(), atol=1e-4)
    assert from_dicom.meta["format"] == "dicom"


def test_written_headers(tmp_path):
    image = hu_volume()
    files = write_series(tmp_path, patient_id="P7", series_description="test series")
    ds = pydicom.dcmread(files[0])
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.2"
    assert (ds.Modality, ds.PatientID, ds.SeriesDescription, ds.InstanceNumber) == ("CT", "P7", "test series", 1)
    assert (ds.Rows, ds.Columns) == (SHAPE[1], SHAPE[0])
    assert [float(v) for v in ds.PixelSpacing] == [0.9, 0.7]
    assert float(ds.SliceThickness) == float(ds.SpacingBetweenSlices) == 3.0
    # RAS (-40, 25, -300) is LPS (40, -25, -300).
    assert [float(v) for v in ds.ImagePositionPatient] == [40.0, -25.0, -300.0]
    np.testing.assert_array_equal(ds.pixel_array, np.rint(image[:, :, 0]).T.astype(np.int16))
    assert not list(tmp_path.glob(".*.tmp")), "temporary files left behind"


def test_written_series_passes_dciodvfy(tmp_path):
    from dicom_conformance import dciodvfy_errors

    files = write_series(tmp_path, patient_id="P7", series_description="test series")
    assert pydicom.dcmread(files[0]).BodyPartExamined == "ABDOMEN"
    for path in (files[0], files[-1]):
        assert dciodvfy_errors(path) == [], path


def test_writer_rejects_sheared_affine(tmp_path):
    affine = axial_affine()
    affine[0, 2] = 1.0  # slices shifted sideways: not representable in DICOM
    with pytest.raises(ValueError, match="sheared"):
        write_dicom_series(hu_volume(), affine, tmp_path)


def test_check_returns_files_in_slice_order(tmp_path):
    files = write_dicom_series(hu_volume(), oblique_descending_affine(), tmp_path)
    # Slices step against the normal, so ascending position is reverse writing order.
    assert check_dicom_series(tmp_path) == files[::-1]


def test_empty_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("no dicom here")
    expect_error(tmp_path, "holds no DICOM files")


def test_missing_slice(tmp_path):
    files = write_series(tmp_path)
    files[3].unlink()
    expect_error(tmp_path, "missing slice between positions -294.00 and -288.00 mm")


def test_inconsistent_spacing(tmp_path):
    files = write_series(tmp_path)
    edit(files[3], ImagePositionPatient=[40.0, -25.0, -300.0 + 3 * 3.0 + 1.2])
    expect_error(tmp_path, "non-uniform slice spacing")


def test_duplicate_position(tmp_path):
    files = write_series(tmp_path)
    edit(files[3], ImagePositionPatient=[40.0, -25.0, -300.0 + 2 * 3.0])
    expect_error(tmp_path, "share the position")


def test_two_series_in_one_folder(tmp_path):
    write_series(tmp_path, file_prefix="a_", series_number=1)
    write_dicom_series(hu_volume(1), axial_affine(), tmp_path, file_prefix="b_", series_number=2)
    expect_error(tmp_path, "holds 2 DICOM series")
    expect_error(tmp_path, "splits such a folder")

    series = split_series(tmp_path)
    assert len(series) == 2 and sorted(len(files) for files in series.values()) == [SHAPE[2]] * 2
    volumes = [load_volume(tmp_path, series_uid=uid) for uid in series]
    assert not np.array_equal(volumes[0].numpy(), volumes[1].numpy())
    expect_error(tmp_path, "has no series with SeriesInstanceUID", series_uid="1.2.3")


def test_single_slice(tmp_path):
    write_dicom_series(hu_volume()[:, :, :1], axial_affine(), tmp_path)
    expect_error(tmp_path, "single slice")


def test_inconsistent_rows(tmp_path):
    files = write_series(tmp_path)
    edit(files[2], Rows=SHAPE[1] + 2)
    expect_error(tmp_path, "inconsistent Rows/Columns")


def test_inconsistent_orientation(tmp_path):
    files = write_series(tmp_path)
    edit(files[2], ImageOrientationPatient=[0, 1, 0, 1, 0, 0])
    expect_error(tmp_path, "inconsistent orientation")


def test_load_volume_reports_series_errors(tmp_path):
    files = write_series(tmp_path)
    files[3].unlink()
    with pytest.raises(VolumeReadError, match="missing slice"):
        load_volume(tmp_path)

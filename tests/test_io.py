"""load_volume: round trips across formats and a readable error for each bad input."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch

from volumes.data.io import LoadVolumed, check_label_matches, load_label, load_volume
from volumes.errors import ConfigError, VolumeReadError

# Voxel (3, 4, 5) holds a marker so its world position can be followed through reorientation.
MARK = (3, 4, 5)


def save_nifti(path: Path, array: np.ndarray, affine: np.ndarray | None = None) -> Path:
    nib.save(nib.Nifti1Image(array, np.eye(4) if affine is None else affine), path)
    return path


def marked_volume(shape: tuple[int, int, int] = (8, 9, 10)) -> np.ndarray:
    array = np.random.default_rng(0).uniform(-1000, 500, shape).astype(np.float32)
    array[MARK] = 3000.0
    return array


def lps_affine() -> np.ndarray:
    """Anisotropic spacing (0.7, 0.9, 3.0) with x and y pointing left and posterior."""
    affine = np.diag([-0.7, -0.9, 3.0, 1.0])
    affine[:3, 3] = [12.0, -30.0, 40.0]
    return affine


def permuted_affine() -> np.ndarray:
    """Voxel axes stored as (S, L, A): a sagittal-like layout that needs transposing."""
    affine = np.zeros((4, 4))
    affine[2, 0], affine[0, 1], affine[1, 2] = 3.0, -0.7, 0.9
    affine[:, 3] = [5.0, 6.0, -7.0, 1.0]
    return affine


def world_of_max(volume) -> np.ndarray:
    index = np.unravel_index(int(volume[0].argmax()), volume.shape[1:])
    return (volume.affine.numpy() @ np.array([*index, 1.0]))[:3]


# ----------------------------------------------------------------- round trips


@pytest.mark.parametrize("byte_order", ["<", ">"])
def test_gzipped_nifti_read_through_isal_equals_nibabel_with_scaling(tmp_path, monkeypatch, byte_order):
    import volumes.data.io as io

    pytest.importorskip("isal")
    stored = np.random.default_rng(3).integers(-1000, 2000, (7, 6, 5)).astype(byte_order + "i2")
    image = nib.Nifti1Image(stored, lps_affine())
    image.header.set_slope_inter(0.5, -3.0)  # scaled integers, as many CT exports store them
    path = tmp_path / "scaled.nii.gz"
    nib.save(image, path)
    expected = nib.load(path).get_fdata(dtype=np.float64)
    assert io.igzip is not None
    fast = load_volume(path, orientation=None)
    monkeypatch.setattr(io, "igzip", None)  # nibabel's own zlib path
    slow = load_volume(path, orientation=None)
    np.testing.assert_allclose(fast[0].numpy(), expected, rtol=0, atol=1e-4)
    np.testing.assert_array_equal(fast.numpy(), slow.numpy())
    np.testing.assert_array_equal(fast.affine.numpy(), slow.affine.numpy())


def test_dtype_none_keeps_compact_stored_types_and_floats_the_rest(tmp_path):
    ct = np.random.default_rng(5).integers(-1024, 2000, (6, 7, 8)).astype(np.int16)
    path = save_nifti(tmp_path / "ct.nii.gz", ct, lps_affine())
    as_stored = load_volume(path, dtype=None)
    assert as_stored.dtype == torch.int16  # half the memory of float32
    np.testing.assert_array_equal(as_stored.numpy(), load_volume(path).numpy())  # same values, same RAS order
    # resampling makes new values: float32 then, except nearest-neighbour
    assert load_volume(path, dtype=None, spacing=1.0).dtype == torch.float32
    assert load_volume(path, dtype=None, spacing=1.0, mode="nearest").dtype == torch.int16
    wide = save_nifti(tmp_path / "wide.nii.gz", ct.astype(np.float64))
    assert load_volume(wide, dtype=None).dtype == torch.float32
    assert LoadVolumed("image", dtype=None)({"image": path})["image"].dtype == torch.int16


@pytest.mark.parametrize("order", ["C", "F"])
def test_save_nifti_writes_standard_gzip_that_nibabel_reads_back(tmp_path, order):
    from volumes.data.io import save_nifti

    labels = np.asarray(np.random.default_rng(4).integers(0, 7, (9, 8, 7)), dtype=np.uint8, order=order)
    image = nib.Nifti1Image(labels, lps_affine())
    path = save_nifti(image, tmp_path / "labels.nii.gz")
    with gzip.open(path, "rb") as stream:  # plain zlib can read what ISA-L wrote
        assert len(stream.read()) == 352 + labels.size
    back = nib.load(path)
    np.testing.assert_array_equal(np.asanyarray(back.dataobj), labels)
    np.testing.assert_allclose(back.affine, lps_affine())
    assert back.get_data_dtype() == np.uint8
    assert save_nifti(image, tmp_path / "plain.nii").stat().st_size == 352 + labels.size


@pytest.mark.parametrize("make_affine", [lps_affine, permuted_affine], ids=["LPS", "SLA"])
def test_nifti_is_oriented_to_ras_keeping_world_positions(tmp_path, make_affine):
    affine = make_affine()
    array = marked_volume()
    volume = load_volume(save_nifti(tmp_path / "v.nii.gz", array, affine))

    assert volume.shape[0] == 1 and volume.ndim == 4
    assert volume.meta["filename_or_obj"] == str(tmp_path / "v.nii.gz")
    matrix = volume.affine.numpy()[:3, :3]
    assert np.allclose(matrix, np.diag(np.diag(matrix))) and np.all(np.diag(matrix) > 0), "not RAS"
    assert sorted(np.diag(matrix).round(4)) == [0.7, 0.9, 3.0]
    assert volume.max().item() == 3000.0
    np.testing.assert_allclose(world_of_max(volume), (affine @ np.array([*MARK, 1.0]))[:3], atol=1e-4)
    assert np.allclose(volume.meta["original_affine"], affine)
    assert sorted(volume.numpy().ravel()) == pytest.approx(sorted(array.ravel()))


def test_orientation_none_keeps_stored_order(tmp_path):
    array = marked_volume()
    volume = load_volume(save_nifti(tmp_path / "v.nii", array, lps_affine()), orientation=None)
    np.testing.assert_array_equal(volume[0].numpy(), array)
    np.testing.assert_allclose(volume.affine.numpy(), lps_affine())


@pytest.mark.parametrize("suffix", [".nrrd", ".mha", ".mhd"])
def test_itk_formats_load_like_the_nifti(tmp_path, suffix):
    nifti = save_nifti(tmp_path / "v.nii.gz", marked_volume(), lps_affine())
    other = tmp_path / f"v{suffix}"
    # ITK's own NIfTI reader converts to LPS: an independent check of our LPS->RAS step.
    sitk.WriteImage(sitk.ReadImage(str(nifti)), str(other))
    expected, got = load_volume(nifti), load_volume(other)
    assert got.shape == expected.shape
    np.testing.assert_array_equal(got.numpy(), expected.numpy())
    np.testing.assert_allclose(got.affine.numpy(), expected.affine.numpy(), atol=1e-4)


def test_four_d_with_one_volume_is_squeezed(tmp_path):
    volume = load_volume(save_nifti(tmp_path / "v.nii.gz", np.zeros((5, 6, 7, 1), np.int16)))
    assert tuple(volume.shape) == (1, 5, 6, 7)


def test_dtype_and_isotropic_resampling(tmp_path):
    path = save_nifti(tmp_path / "v.nii.gz", marked_volume(), lps_affine())
    volume = load_volume(path, spacing=1.5, dtype=np.float16)
    assert volume.dtype.is_floating_point and volume.element_size() == 2
    np.testing.assert_allclose(np.diag(volume.affine.numpy())[:3], [1.5, 1.5, 1.5])


def test_bad_arguments_raise_config_error(tmp_path):
    path = save_nifti(tmp_path / "v.nii.gz", marked_volume())
    with pytest.raises(ConfigError, match="orientation"):
        load_volume(path, orientation="RAR")
    with pytest.raises(ConfigError, match="spacing"):
        load_volume(path, spacing=(1.0, -1.0, 1.0))


# ----------------------------------------------------------------- bad inputs


def expect_error(path: Path, phrase: str, **kwargs) -> VolumeReadError:
    with pytest.raises(VolumeReadError) as caught:
        load_volume(path, **kwargs)
    message = str(caught.value)
    assert message.startswith(str(path)), message
    assert phrase in message, message
    return caught.value


def patch_nifti_dims(path: Path, shape: tuple[int, ...]) -> None:
    """Overwrite the dim[] field (byte 40) of an uncompressed NIfTI-1 header."""
    raw = bytearray(path.read_bytes())
    raw[40:56] = struct.pack("<8h", len(shape), *shape, *[1] * (7 - len(shape)))
    path.write_bytes(bytes(raw))


def test_missing_file(tmp_path):
    expect_error(tmp_path / "absent.nii.gz", "does not exist")


def test_garbage_bytes(tmp_path):
    path = tmp_path / "garbage.nii.gz"
    path.write_bytes(np.random.default_rng(1).bytes(4000))
    expect_error(path, "cannot be read as NIfTI")


def test_garbage_nrrd(tmp_path):
    path = tmp_path / "garbage.nrrd"
    path.write_bytes(b"not an nrrd header\n" + np.random.default_rng(1).bytes(400))
    expect_error(path, "cannot be read")


def test_unknown_extension(tmp_path):
    path = tmp_path / "scan.xyz"
    path.write_bytes(b"1234")
    expect_error(path, "unknown file type")


def test_truncated_gzip(tmp_path):
    path = save_nifti(tmp_path / "v.nii.gz", np.random.default_rng(2).random((30, 30, 30), dtype=np.float32))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    expect_error(path, "truncated")


def test_two_d(tmp_path):
    expect_error(save_nifti(tmp_path / "flat.nii.gz", np.zeros((10, 12), np.float32)), "is 2D")


def test_four_d(tmp_path):
    expect_error(save_nifti(tmp_path / "time.nii.gz", np.zeros((5, 5, 5, 3), np.float32)), "4D with 3 volumes")


def test_single_slice(tmp_path):
    expect_error(save_nifti(tmp_path / "slab.nii.gz", np.zeros((5, 5, 1), np.float32)), "single slice")


def test_zero_size_dimension(tmp_path):
    expect_error(save_nifti(tmp_path / "empty.nii.gz", np.zeros((4, 0, 4), np.float32)), "zero-size dimension")


def test_header_larger_than_data_uncompressed(tmp_path):
    path = save_nifti(tmp_path / "short.nii", np.zeros((4, 4, 4), np.int16))
    patch_nifti_dims(path, (40, 40, 40))
    expect_error(path, "header size does not match the data")


def test_header_larger_than_data_compressed(tmp_path):
    plain = save_nifti(tmp_path / "short.nii", np.zeros((4, 4, 4), np.int16))
    patch_nifti_dims(plain, (40, 40, 40))
    path = tmp_path / "short.nii.gz"
    path.write_bytes(gzip.compress(plain.read_bytes()))
    expect_error(path, "truncated")


def test_absurd_size_is_refused_before_allocation(tmp_path):
    path = save_nifti(tmp_path / "huge.nii", np.zeros((2, 2, 2), np.uint8))
    patch_nifti_dims(path, (3000, 3000, 3000))
    expect_error(path, "more than the limit")


def test_nan_voxels(tmp_path):
    array = np.zeros((6, 6, 6), np.float32)
    array[0, 0, :3] = np.nan
    expect_error(save_nifti(tmp_path / "nan.nii.gz", array), "contains 3 NaN voxels")


def test_inf_voxels(tmp_path):
    array = np.zeros((6, 6, 6), np.float32)
    array[1, 1, 1], array[2, 2, 2] = np.inf, -np.inf
    expect_error(save_nifti(tmp_path / "inf.nii.gz", array), "contains 2 Inf voxels")


def test_truncated_metaimage(tmp_path):
    path = tmp_path / "v.mha"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((10, 10, 10), np.int16)), str(path))
    path.write_bytes(path.read_bytes()[:-500])
    expect_error(path, "header size does not match the data")


def test_metaimage_without_its_raw_file(tmp_path):
    path = tmp_path / "v.mhd"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((10, 10, 10), np.int16)), str(path))
    (tmp_path / "v.raw").unlink()
    expect_error(path, "does not exist")


# ----------------------------------------------------------------- labels and dictionary transform


def test_load_label_checks_the_grid(tmp_path):
    image_path = save_nifti(tmp_path / "img.nii.gz", marked_volume(), lps_affine())
    label_path = save_nifti(tmp_path / "lab.nii.gz", (marked_volume() > 0).astype(np.uint8), lps_affine())
    image = load_volume(image_path)
    assert load_label(label_path, image).shape == image.shape

    small = save_nifti(tmp_path / "small.nii.gz", np.zeros((8, 9, 7), np.uint8), lps_affine())
    with pytest.raises(VolumeReadError, match=r"label shape \(8, 9, 7\) does not match image shape \(8, 9, 10\)"):
        load_label(small, image)

    shifted_affine = lps_affine()
    shifted_affine[0, 3] += 5.0
    shifted = save_nifti(tmp_path / "shifted.nii.gz", np.zeros((8, 9, 10), np.uint8), shifted_affine)
    with pytest.raises(VolumeReadError, match="label affine does not match"):
        check_label_matches(image, load_volume(shifted), shifted)


def test_load_volumed_dictionary_transform(tmp_path):
    image_path = save_nifti(tmp_path / "img.nii.gz", marked_volume(), lps_affine())
    label = np.zeros((8, 9, 10), np.uint8)
    label[2:5, 2:5, 2:5] = 3
    label_path = save_nifti(tmp_path / "lab.nii.gz", label, lps_affine())
    transform = LoadVolumed(keys=["image", "label"], spacing=(1.0, 1.0, 3.0), mode=("bilinear", "nearest"))
    out = transform({"image": str(image_path), "label": str(label_path), "case_id": "c1"})
    assert out["case_id"] == "c1"
    assert out["image"].shape == out["label"].shape
    assert set(np.unique(out["label"].numpy())) <= {0.0, 3.0}, "labels must not be interpolated"

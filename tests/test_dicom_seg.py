"""volumes.inference.dicom_seg: label maps written as DICOM SEG that reference their source series.

Expected frames come from outside the writer's geometry code: from the known slice layout
of ``write_dicom_series`` (slice k holds ``volume[:, :, k].T``), or from the pixels of a
source series whose image *is* the label map, or from the real series' own pixels.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("highdicom")
import highdicom as hd  # noqa: E402
import pydicom  # noqa: E402

from volumes.data.dicom import check_dicom_series, write_dicom_series  # noqa: E402
from volumes.data.io import load_label, load_volume  # noqa: E402
from volumes.data.phantoms import LABEL_NAMES, PhantomConfig, generate_phantom, write_case  # noqa: E402
from volumes.inference.dicom_seg import write_dicom_seg  # noqa: E402

SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"

# The synthetic series have one-component patient names, which highdicom warns about.
pytestmark = pytest.mark.filterwarnings("ignore:The string .* is unlikely to represent the intended person name")


# ----------------------------------------------------------------- helpers


def _frames(path: Path) -> list[dict]:
    """Per frame of a SEG file: segment number, referenced source SOP UID, position, pixels."""
    ds = pydicom.dcmread(path)
    pixels = ds.pixel_array.reshape(int(ds.NumberOfFrames), int(ds.Rows), int(ds.Columns))
    shared = ds.SharedFunctionalGroupsSequence[0]
    frames = []
    for item, frame in zip(ds.PerFrameFunctionalGroupsSequence, pixels):
        source = item.DerivationImageSequence[0].SourceImageSequence
        assert len(source) == 1
        # With a single segment, highdicom moves the segment identification to the shared groups.
        segment = item if "SegmentIdentificationSequence" in item else shared
        frames.append({
            "segment": int(segment.SegmentIdentificationSequence[0].ReferencedSegmentNumber),
            "source_uid": str(source[0].ReferencedSOPInstanceUID),
            "position": [float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient],
            "pixels": frame,
        })
    return frames


def _check_seg(seg_path: Path, series_folder: Path, expected: dict[str, np.ndarray], labels: list[str]) -> None:
    """The SEG at ``seg_path`` holds exactly ``expected`` (source SOP UID -> [rows, cols] labels)."""
    sources = {_instance_uid(ds): ds for ds in
               (pydicom.dcmread(f, stop_before_pixels=True) for f in check_dicom_series(series_folder))}
    assert set(expected) == set(sources)
    seg = hd.seg.segread(seg_path)
    assert seg.SOPClassUID == SEG_STORAGE
    assert seg.SegmentationType == "BINARY"
    assert [seg.get_segment_description(n).segment_label for n in seg.segment_numbers] == labels[1:]
    assert list(seg.segment_numbers) == list(range(1, len(labels)))

    # The referenced series: the source series' UID and every one of its instances.
    (referenced,) = seg.ReferencedSeriesSequence
    first = next(iter(sources.values()))
    if first.SeriesInstanceUID:  # anonymised series with blank UIDs get stand-ins
        assert referenced.SeriesInstanceUID == first.SeriesInstanceUID
        assert seg.StudyInstanceUID == first.StudyInstanceUID
    else:
        assert referenced.SeriesInstanceUID and seg.StudyInstanceUID
    assert {str(item.ReferencedSOPInstanceUID) for item in referenced.ReferencedInstanceSequence} == set(sources)
    assert seg.FrameOfReferenceUID == first.FrameOfReferenceUID
    assert seg.SeriesInstanceUID != first.SeriesInstanceUID

    # One frame per (image, segment) present; pixels identical to the expected labels.
    present = {(uid, s) for uid, frame in expected.items() for s in range(1, len(labels)) if np.any(frame == s)}
    frames = _frames(seg_path)
    assert int(seg.NumberOfFrames) == len(frames) == len(present)
    assert {(f["source_uid"], f["segment"]) for f in frames} == present
    for frame in frames:
        source = sources[frame["source_uid"]]
        np.testing.assert_allclose(frame["position"], [float(v) for v in source.ImagePositionPatient], atol=1e-3)
        expected_mask = (expected[frame["source_uid"]] == frame["segment"]).astype(np.uint8)
        assert frame["pixels"].shape == expected_mask.shape
        np.testing.assert_array_equal(frame["pixels"], expected_mask)


def _instance_uid(ds: pydicom.Dataset) -> str:
    """SOPInstanceUID, from the file meta when an anonymiser blanked it in the data set."""
    return str(ds.SOPInstanceUID or ds.file_meta.MediaStorageSOPInstanceUID)


def _blob_labels(shape: tuple[int, int, int], seed: int) -> np.ndarray:
    """Boxes of labels 1..3 at random places; some slices of every axis stay empty."""
    rng = np.random.default_rng(seed)
    label = np.zeros(shape, dtype=np.uint8)
    for value in (1, 2, 3, 1):
        low = [int(rng.integers(1, s // 2)) for s in shape]
        high = [lo + int(rng.integers(2, s // 2)) for lo, s in zip(low, shape)]
        label[low[0]:high[0], low[1]:high[1], low[2]:high[2]] = value
    return label


@pytest.fixture(scope="module")
def phantom_case(tmp_path_factory: pytest.TempPathFactory):
    """A small phantom written as a DICOM series plus its label NIfTI on the same grid."""
    config = PhantomConfig.segmentation_demo(matrix=48, inplane_spacing_mm=(8.0, 8.0), slice_spacing_mm=(10.0, 10.0),
                                             extent_mm=(150.0, 160.0))
    phantom = generate_phantom(3, config)
    out = tmp_path_factory.mktemp("phantom")
    write_case(phantom, out, "case0", fmt="dicom")
    return phantom, out / "dicom" / "case0", out / "labels" / "case0.nii.gz"


# ----------------------------------------------------------------- round trips


def test_phantom_round_trip(phantom_case, tmp_path: Path) -> None:
    phantom, series, label_file = phantom_case
    volume = load_volume(series)
    label = load_label(label_file, like=volume)
    np.testing.assert_array_equal(label[0].numpy(), phantom.label)
    assert set(np.unique(phantom.label)) == set(range(len(LABEL_NAMES)))

    out = write_dicom_seg(label[0], volume.affine, series, tmp_path / "seg.dcm", labels=LABEL_NAMES,
                          series_description="phantom organs", algorithm_version="9.9")
    assert out == tmp_path / "seg.dcm"

    # write_dicom_series: file k+1 holds label[:, :, k] with rows along y.
    files = sorted(series.glob("slice_*.dcm"))
    assert len(files) == phantom.shape[2]
    expected = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID): phantom.label[:, :, k].T
                for k, f in enumerate(files)}
    _check_seg(out, series, expected, list(LABEL_NAMES))

    seg = hd.seg.segread(out)
    assert seg.SeriesDescription == "phantom organs"
    assert int(seg.SeriesNumber) == 300
    assert seg.Manufacturer == "volumes"
    liver = seg.get_segment_description(1)
    assert liver.segmented_property_type.value == "10200004"
    assert liver.segmented_property_category.value == "123037004"
    assert seg.get_segment_description(3).segmented_property_type.value == "18639004"
    assert seg.get_segment_description(6).segmented_property_type.meaning == "Vertebral column"
    algorithm = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == ("volumes", "9.9")
    assert algorithm.AlgorithmFamilyCodeSequence[0].CodeMeaning == "Artificial Intelligence"
    assert seg.SegmentSequence[0].SegmentAlgorithmType == "AUTOMATIC"

    # highdicom's own reading agrees: the liver mask of the slice with most liver.
    k = int(np.argmax((phantom.label == 1).sum(axis=(0, 1))))
    uid = str(pydicom.dcmread(files[k], stop_before_pixels=True).SOPInstanceUID)
    mask = seg.get_pixels_by_source_instance([uid], segment_numbers=[1])[0, :, :, 0]
    np.testing.assert_array_equal(mask, (phantom.label[:, :, k].T == 1).astype(mask.dtype))

    # the SEG volumes infer writes, and the phantom series it refers to, conform to the standard
    from dicom_conformance import dciodvfy_errors

    for path in (out, files[0]):
        assert dciodvfy_errors(path) == [], path


AFFINES = {
    # Axial, but x and y run toward the patient's left and back (an LPS-ordered grid).
    "lps_axial": np.array([[-0.8, 0, 0, 30.0], [0, -1.2, 0, 40.0], [0, 0, 2.5, -50.0], [0, 0, 0, 1]]),
    # Coronal slices: the volume's y axis is superior, its slice axis z runs anterior.
    "coronal": np.array([[0.8, 0, 0, -20.0], [0, 0, 2.5, 10.0], [0, 1.2, 0, -60.0], [0, 0, 0, 1]]),
    # Sagittal slices with flipped rows: x axis anterior, y axis inferior, slices along -x.
    "sagittal_flipped": np.array([[0, 0, -2.5, 15.0], [0.8, 0, 0, -5.0], [0, -1.2, 0, 70.0], [0, 0, 0, 1]]),
}


@pytest.mark.parametrize("name", sorted(AFFINES))
def test_non_ras_series_round_trips(name: str, tmp_path: Path) -> None:
    """A series whose pixels are the labels: every SEG frame must equal its source image."""
    stored = _blob_labels((20, 16, 12), seed=len(name))
    series = tmp_path / "series"
    write_dicom_series(stored, AFFINES[name], series)

    volume = load_volume(series)  # reoriented to RAS: a flipped/permuted copy of `stored`
    label_map = volume[0]  # float32 MetaTensor with whole values
    assert not np.allclose(volume.affine.numpy(), AFFINES[name])
    if name != "lps_axial":
        assert tuple(label_map.shape) != stored.shape
    assert np.bincount(label_map.numpy().astype(np.int64).ravel()).tolist() == np.bincount(stored.ravel()).tolist()

    labels = ["background", "liver", "tumour", "bone"]
    out = write_dicom_seg(label_map, volume.affine, series, tmp_path / "seg.dcm", labels=labels)
    expected = {}
    for f in check_dicom_series(series):
        ds = pydicom.dcmread(f)
        expected[str(ds.SOPInstanceUID)] = ds.pixel_array.astype(np.int64)
    _check_seg(out, series, expected, labels)
    seg = hd.seg.segread(out)
    tumour = seg.get_segment_description(2)
    assert (tumour.segmented_property_category.value, tumour.segmented_property_type.value) == ("85756007", "85756007")

    # The grid as stored (no reorientation) describes the same series: same frames.
    again = write_dicom_seg(stored, AFFINES[name], series, tmp_path / "seg_stored.dcm", labels=labels)
    _check_seg(again, series, expected, labels)


def test_real_series_threshold_mask(shared_data: Path, tmp_path: Path) -> None:
    series = shared_data / "totalsegmentator_example" / "example_ct_dicom"
    if not series.is_dir():
        pytest.skip(f"{series} not found")
    volume = load_volume(series)
    mask = (volume[0].numpy() > 300).astype(np.uint8)
    assert mask.shape == (512, 512, 20)
    assert 0 < mask.sum() < mask.size

    # The example is anonymised with blank Study/Series/SOP Instance UIDs in the data sets.
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in check_dicom_series(series)]
    blank_ids = not headers[0].SeriesInstanceUID
    if blank_ids:
        with pytest.warns(UserWarning, match="blank (Study|Series)InstanceUID"):
            out = write_dicom_seg(mask, volume.affine, series, tmp_path / "bone.dcm", labels=["background", "bone"])
    else:
        out = write_dicom_seg(mask, volume.affine, series, tmp_path / "bone.dcm", labels=["background", "bone"])
    expected = {}
    for f in check_dicom_series(series):
        ds = pydicom.dcmread(f)
        hu = pydicom.pixels.apply_modality_lut(ds.pixel_array, ds)
        expected[_instance_uid(ds)] = (hu > 300).astype(np.int64)
    assert len(expected) == 20
    if blank_ids:  # the stand-in UIDs are the same for every SEG of this series
        with pytest.warns(UserWarning, match="blank (Study|Series)InstanceUID"):
            again = write_dicom_seg(mask, volume.affine, series, tmp_path / "again.dcm", labels=["background", "bone"])
        first, second = pydicom.dcmread(out), pydicom.dcmread(again)
        assert first.StudyInstanceUID == second.StudyInstanceUID
        assert (first.ReferencedSeriesSequence[0].SeriesInstanceUID
                == second.ReferencedSeriesSequence[0].SeriesInstanceUID)
    _check_seg(out, series, expected, ["background", "bone"])
    seg = hd.seg.segread(out)
    assert int(seg.NumberOfFrames) == int(np.count_nonzero(mask.any(axis=(0, 1))))
    bone = seg.get_segment_description(1)
    assert bone.segment_label == "bone"
    assert bone.segmented_property_type.value == "85756007"  # unknown name: generic Tissue
    assert int(np.asarray(seg.pixel_array).sum()) == int(mask.sum())


# ----------------------------------------------------------------- errors


def test_grid_mismatch_names_the_folder(phantom_case, tmp_path: Path) -> None:
    phantom, series, _ = phantom_case
    out = tmp_path / "seg.dcm"
    half_voxel = phantom.affine.copy()
    half_voxel[:3, 3] += 0.5 * phantom.affine[:3, 0]
    with pytest.raises(ValueError, match="label map grid does not match the DICOM series") as info:
        write_dicom_seg(phantom.label, half_voxel, series, out, labels=LABEL_NAMES)
    assert str(series) in str(info.value)
    assert "between label voxels" in str(info.value)

    one_slice = phantom.affine.copy()
    one_slice[:3, 3] += phantom.affine[:3, 2]
    with pytest.raises(ValueError, match="outside the label map") as info:
        write_dicom_seg(phantom.label, one_slice, series, out, labels=LABEL_NAMES)
    assert str(series) in str(info.value)

    # The right affine but a label map with an extra slice: voxels no image covers.
    padded = np.concatenate([phantom.label, np.zeros_like(phantom.label[:, :, :1])], axis=2)
    with pytest.raises(ValueError, match=r"cover \d+ of the \d+ voxels") as info:
        write_dicom_seg(padded, phantom.affine, series, out, labels=LABEL_NAMES)
    assert str(series) in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_bad_label_maps_and_labels(phantom_case, tmp_path: Path) -> None:
    phantom, series, _ = phantom_case
    out = tmp_path / "seg.dcm"
    with pytest.raises(ValueError, match=r"must be \[X, Y, Z\]; got shape \(48, 48\)") as info:
        write_dicom_seg(phantom.label[:, :, 0], phantom.affine, series, out, labels=LABEL_NAMES)
    assert "seg.dcm" in str(info.value)
    with pytest.raises(ValueError, match=r"pass label_map\[0\]"):
        write_dicom_seg(phantom.label[None], phantom.affine, series, out, labels=LABEL_NAMES)
    with pytest.raises(ValueError, match=r"labels has 3 names but the label map holds values up to 6"):
        write_dicom_seg(phantom.label, phantom.affine, series, out, labels=LABEL_NAMES[:3])
    with pytest.raises(ValueError, match="whole-number"):
        write_dicom_seg(phantom.label + 0.5, phantom.affine, series, out, labels=LABEL_NAMES)
    with pytest.raises(ValueError, match="negative"):
        write_dicom_seg(phantom.label.astype(np.int16) - 1, phantom.affine, series, out, labels=LABEL_NAMES)
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------- atomic write


def test_atomic_write_replaces_and_leaves_no_temporary(phantom_case, tmp_path: Path) -> None:
    phantom, series, _ = phantom_case
    out = tmp_path / "nested" / "seg.dcm"
    out.parent.mkdir()
    out.write_bytes(b"old content")
    only_spleen = np.where(phantom.label == 2, 2, 0).astype(np.uint8)
    write_dicom_seg(only_spleen, phantom.affine, series, out, labels=LABEL_NAMES)
    assert [p.name for p in out.parent.iterdir()] == ["seg.dcm"]
    ds = pydicom.dcmread(out)
    assert ds.SOPClassUID == SEG_STORAGE
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert int(ds.NumberOfFrames) == int(np.count_nonzero((phantom.label == 2).any(axis=(0, 1))))
    assert {int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
            for item in ds.PerFrameFunctionalGroupsSequence} == {2}
    assert len(ds.SegmentSequence) == len(LABEL_NAMES) - 1


def test_all_background_writes_empty_frames(phantom_case, tmp_path: Path) -> None:
    """highdicom cannot omit every frame: an empty label map gives one empty frame per image."""
    phantom, series, _ = phantom_case
    out = write_dicom_seg(np.zeros(phantom.shape, dtype=bool), phantom.affine, series, tmp_path / "empty.dcm",
                          labels=["background", "lesion"])
    ds = pydicom.dcmread(out)
    assert int(ds.NumberOfFrames) == phantom.shape[2]
    assert int(ds.pixel_array.sum()) == 0

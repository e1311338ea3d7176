"""Write a label map as a DICOM Segmentation (SEG) object that references its source series.

A segmentation predicted on a volume loaded with :func:`volumes.data.io.load_volume`
lives on that volume's RAS grid (voxel index -> world mm, nibabel convention), which
is usually a flipped and/or permuted copy of the scanner's slice grid. PACS viewers
instead expect a SEG whose frames line up with the source DICOM images, so
:func:`write_dicom_seg` resamples nothing: it looks up, for every pixel of every
source image, the label voxel at the same world position.

For a source image with ImagePositionPatient ``P``, ImageOrientationPatient
(row cosine ``r``, column cosine ``c``) and PixelSpacing ``(dr, dc)``, pixel
(row ``i``, column ``j``) lies at the LPS point ``P + j*dc*r + i*dr*c``. Negating x
and y gives RAS; ``inv(affine)`` gives a voxel index, which must be an integer
(within 0.1 voxel) inside the label map, and every label voxel must be hit by exactly
one source pixel. Otherwise the label map was not made on this series' grid and a
``ValueError`` says so.

The result is a highdicom BINARY ``Segmentation``: one segment per label value
``k >= 1`` (segment number ``k``, segment label ``labels[k]``), SNOMED CT codes for
the organs of :data:`volumes.data.phantoms.ORGANS` and the generic "Tissue" code for
any other name, and only the frames where a segment is present. The file is
written atomically.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from volumes import __version__
from volumes._optional import require
from volumes.arrays import as_numpy
from volumes.atomic import atomic_path
from volumes.data.dicom import check_dicom_series

# highdicom logs every copied DICOM module at INFO; a batch of SEGs would drown the log.
logging.getLogger("highdicom").setLevel(logging.WARNING)

# Largest distance, in voxels, between a source pixel's position and the nearest
# label voxel centre: DS strings carry ~1e-4 mm, far below this.
GRID_TOLERANCE = 0.1

MANUFACTURER = "volumes"
MANUFACTURER_MODEL_NAME = "volumes segmentation"
# A software-only device has no serial number; the attribute is required, so a fixed one.
DEVICE_SERIAL_NUMBER = "0"

# (code value, code meaning) in SNOMED CT.
_ANATOMICAL_STRUCTURE = ("123037004", "Anatomical Structure")
_TISSUE = ("85756007", "Tissue")
_ORGAN_CODES: dict[str, tuple[str, str]] = {
    "liver": ("10200004", "Liver"),
    "spleen": ("78961009", "Spleen"),
    "kidney_left": ("18639004", "Left kidney"),
    "kidney_right": ("9846003", "Right kidney"),
    "aorta": ("15825003", "Aorta"),
    "vertebrae": ("421060004", "Vertebral column"),
}
"""Label name -> segmented property type; their category is "Anatomical Structure"."""


def write_dicom_seg(
    label_map: Any,
    affine: Any,
    series_folder: str | Path,
    path: str | Path,
    *,
    labels: Sequence[str],
    series_uid: str | None = None,
    series_description: str = "volumes segmentation",
    algorithm_name: str = "volumes",
    algorithm_version: str | None = None,
    series_number: int = 300,
) -> Path:
    """Write ``label_map`` as a DICOM SEG that references the images of ``series_folder``.

    Frames where a segment is absent are left out; a label map that is all
    background gets one empty frame per image (highdicom cannot write none).
    Anonymised series with blank UIDs: a blank SOPClassUID/SOPInstanceUID is read
    from the file meta; a blank StudyInstanceUID/SeriesInstanceUID is replaced by a
    stand-in derived from the images' UIDs, with a ``UserWarning``.

    Args:
        label_map: ``[X, Y, Z]`` integer labels (numpy or torch; floats with whole
            values, as :func:`volumes.data.io.load_label` returns, are accepted) on
            the grid of ``affine``. 0 is background.
        affine: ``[4, 4]`` voxel index -> RAS world (mm). Any grid that is an axis
            permutation/flip of the series' slice grid works, e.g. the ``.affine`` of
            ``load_volume(series_folder)``.
        series_folder: the source DICOM series folder.
        path: the SEG file to write (parent folders are created).
        labels: segment names by label value; ``labels[0]`` is the background
            and ``labels[k]`` names segment number ``k``. Every value in
            ``label_map`` needs a name.
        series_uid: the SeriesInstanceUID to use when the folder holds several series.
        series_description, series_number: header values of the new SEG series.
        algorithm_name, algorithm_version: the AlgorithmIdentificationSequence
            (version defaults to ``volumes.__version__``).

    Returns:
        ``path``, as a :class:`~pathlib.Path`.

    Raises:
        ValueError: ``label_map`` is not 3D or holds negative or non-integer
            values; ``labels`` has no name for the largest label value; the label
            map's grid is not the series' grid (message names the folder).
        VolumeReadError: the folder is not a single loadable series
            (from :func:`volumes.data.dicom.check_dicom_series`).
    """
    highdicom = require("highdicom", "writing DICOM SEG")
    pydicom = require("pydicom", "writing DICOM SEG")
    series_folder, path = Path(series_folder), Path(path)
    labels = list(labels)
    label_map = _label_array(label_map, path)
    affine = as_numpy(affine).astype(np.float64)
    if affine.shape != (4, 4):
        raise ValueError(f"{path}: affine must be 4x4; got shape {affine.shape}")
    max_label = int(label_map.max(initial=0))
    if len(labels) < max(max_label + 1, 2):
        raise ValueError(
            f"{path}: labels has {len(labels)} names but the label map holds values up to {max_label}; "
            f"need labels[0] (background) through labels[{max(max_label, 1)}]"
        )

    sources = _source_headers(pydicom, series_folder, series_uid)
    frames = _frames_on_source_grid(label_map, affine, sources, series_folder)

    algorithm = highdicom.AlgorithmIdentificationSequence(
        name=algorithm_name,
        family=pydicom.sr.codedict.codes.cid7162.ArtificialIntelligence,
        version=algorithm_version or __version__,
    )
    segments = []
    for number, name in enumerate(labels[1:], start=1):
        category, property_type = _segment_codes(highdicom, name)
        segments.append(
            highdicom.seg.SegmentDescription(
                segment_number=number,
                segment_label=name,
                segmented_property_category=category,
                segmented_property_type=property_type,
                algorithm_type=highdicom.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                algorithm_identification=algorithm,
            )
        )
    seg = highdicom.seg.Segmentation(
        source_images=sources,
        pixel_array=frames,
        segmentation_type=highdicom.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=segments,
        series_instance_uid=highdicom.UID(),
        series_number=series_number,
        sop_instance_uid=highdicom.UID(),
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=MANUFACTURER_MODEL_NAME,
        software_versions=f"volumes {__version__}",
        device_serial_number=DEVICE_SERIAL_NUMBER,
        series_description=series_description,
    )
    with atomic_path(path, suffix=".dcm") as tmp:
        seg.save_as(tmp)
    return path


def _label_array(label_map: Any, path: Path) -> np.ndarray:
    """``label_map`` as a 3D unsigned-integer array; ValueError for other shapes or values."""
    array = as_numpy(label_map)
    if array.ndim != 3:
        hint = " (for a [1, X, Y, Z] tensor pass label_map[0])" if array.ndim == 4 and array.shape[0] == 1 else ""
        raise ValueError(f"{path}: label_map must be [X, Y, Z]; got shape {tuple(array.shape)}{hint}")
    if array.dtype == np.bool_:
        return array.astype(np.uint8)
    if not np.issubdtype(array.dtype, np.integer):
        floating = np.issubdtype(array.dtype, np.floating)
        if not (floating and np.all(np.isfinite(array)) and np.all(array == np.round(array))):
            raise ValueError(f"{path}: label_map must hold whole-number labels; got dtype {array.dtype} "
                             "with other values")
    low, high = (array.min(), array.max()) if array.size else (0, 0)
    if low < 0:
        raise ValueError(f"{path}: label_map holds negative labels (minimum {low})")
    if high > np.iinfo(np.uint16).max:
        raise ValueError(f"{path}: label_map holds label {high}; DICOM SEG segment numbers stop at 65535")
    return array.astype(np.uint8 if high <= np.iinfo(np.uint8).max else np.uint16)


def _source_headers(pydicom: Any, series_folder: Path, series_uid: str | None) -> list[Any]:
    """Headers of the series' images in slice order, with the UIDs a SEG must reference.

    Anonymisers sometimes blank the UIDs in the data set. A blank SOPClassUID or
    SOPInstanceUID is taken from the file meta (which must hold the same value); a
    blank StudyInstanceUID or SeriesInstanceUID cannot be recovered, so one derived
    from the images' SOPInstanceUIDs stands in (the same for every SEG of the series)
    and a warning says that viewers cannot link the SEG to its study or series by UID.
    """
    files = check_dicom_series(series_folder, series_uid=series_uid)
    sources = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    for path, ds in zip(files, sources):
        for keyword, meta_keyword in (("SOPClassUID", "MediaStorageSOPClassUID"),
                                      ("SOPInstanceUID", "MediaStorageSOPInstanceUID")):
            if not str(getattr(ds, keyword, "") or ""):
                value = str(getattr(ds.file_meta, meta_keyword, "") or "")
                if not value:
                    raise ValueError(f"{path}: {keyword} is blank in the data set and the file meta; "
                                     "a SEG cannot reference the image")
                setattr(ds, keyword, value)
    instance_uids = [str(ds.SOPInstanceUID) for ds in sources]
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID"):
        if not str(getattr(sources[0], keyword, "") or ""):
            stand_in = pydicom.uid.generate_uid(entropy_srcs=[keyword, *instance_uids])
            warnings.warn(
                f"{series_folder}: the series has a blank {keyword} (anonymised?); the DICOM SEG refers to "
                f"the stand-in {stand_in}, so viewers can match it to the images only by SOPInstanceUID",
                stacklevel=3,
            )
            for ds in sources:
                setattr(ds, keyword, stand_in)
    return sources


def _frames_on_source_grid(
    label_map: np.ndarray, affine: np.ndarray, sources: Sequence[Any], series_folder: Path
) -> np.ndarray:
    """``[n_images, rows, columns]`` labels, frame ``k`` on the pixel grid of ``sources[k]``.

    Each pixel takes the label voxel at its world position; raises ValueError unless
    every pixel falls on a voxel centre inside the label map and every voxel is used once.
    """
    mismatch = f"label map grid does not match the DICOM series {series_folder}"
    world_to_voxel = np.linalg.inv(affine)
    lps_to_ras = np.diag([-1.0, -1.0, 1.0])
    covered = np.zeros(label_map.shape, dtype=bool)
    frames = []
    for ds in sources:
        rows, columns = int(ds.Rows), int(ds.Columns)
        orientation = np.array([float(v) for v in ds.ImageOrientationPatient])
        row_spacing, column_spacing = (float(v) for v in ds.PixelSpacing)
        origin = lps_to_ras @ np.array([float(v) for v in ds.ImagePositionPatient])
        # Moving one column steps along the row cosine, one row along the column cosine.
        column_step = lps_to_ras @ orientation[:3] * column_spacing
        row_step = lps_to_ras @ orientation[3:] * row_spacing
        # The map is affine, so transform the origin and both steps once, then broadcast.
        voxel_origin = world_to_voxel[:3, :3] @ origin + world_to_voxel[:3, 3]
        voxel_per_column = world_to_voxel[:3, :3] @ column_step
        voxel_per_row = world_to_voxel[:3, :3] @ row_step
        index = (
            voxel_origin
            + np.arange(rows)[:, None, None] * voxel_per_row
            + np.arange(columns)[None, :, None] * voxel_per_column
        )  # [rows, columns, 3] continuous voxel indices
        rounded = np.rint(index)
        error = float(np.abs(index - rounded).max())
        if error > GRID_TOLERANCE:
            raise ValueError(
                f"{mismatch}: image {ds.SOPInstanceUID} falls between label voxels "
                f"(off by up to {error:.3g} voxel; allowed {GRID_TOLERANCE})"
            )
        ijk = rounded.astype(np.int64)
        if np.any(ijk < 0) or np.any(ijk >= np.array(label_map.shape)):
            raise ValueError(
                f"{mismatch}: image {ds.SOPInstanceUID} reaches voxel indices "
                f"{ijk.reshape(-1, 3).min(axis=0).tolist()}..{ijk.reshape(-1, 3).max(axis=0).tolist()}, "
                f"outside the label map of shape {list(label_map.shape)}"
            )
        i, j, k = ijk[..., 0], ijk[..., 1], ijk[..., 2]
        if covered[i, j, k].any():
            raise ValueError(f"{mismatch}: image {ds.SOPInstanceUID} overlaps another image of the series")
        covered[i, j, k] = True
        frames.append(label_map[i, j, k])
    if not covered.all():
        raise ValueError(
            f"{mismatch}: the {len(sources)} images of {sources[0].Rows}x{sources[0].Columns} pixels cover "
            f"{int(covered.sum())} of the {label_map.size} voxels of the label map (shape {list(label_map.shape)})"
        )
    return np.stack(frames)


def _segment_codes(highdicom: Any, name: str) -> tuple[Any, Any]:
    """Segmented property (category, type) codes for a label name; "Tissue" for unknown names."""
    if name in _ORGAN_CODES:
        category, property_type = _ANATOMICAL_STRUCTURE, _ORGAN_CODES[name]
    else:
        category = property_type = _TISSUE
    concept = highdicom.sr.CodedConcept
    return (
        concept(value=category[0], scheme_designator="SCT", meaning=category[1]),
        concept(value=property_type[0], scheme_designator="SCT", meaning=property_type[1]),
    )

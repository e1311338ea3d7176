"""DICOM series: write a volume as a CT series, check and split series folders.

Only headers are read here (``stop_before_pixels``); pixel data is decoded by
SimpleITK/GDCM in :func:`volumes.data.io.load_volume`, which handles the
compressed transfer syntaxes (JPEG 2000, JPEG-LS, RLE) that scanners export.

Coordinates: volumes use nibabel's RAS+ world convention; DICOM patient
coordinates are LPS, so x and y change sign between the two.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from volumes._optional import require
from volumes.errors import ConfigError, VolumeReadError

RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])

# Relative deviation of one slice gap from the median gap that still counts as
# uniform; scanners write positions rounded to ~1e-3 mm, far below this.
SPACING_TOLERANCE = 0.01
# Two slices closer than this fraction of the median gap are at the same position.
_SAME_POSITION = 1e-3
# Direction cosines of two slices that differ by less than this are the same.
_ORIENTATION_TOLERANCE = 1e-3

_SOP_CLASS_FOR_MODALITY = {
    "CT": "1.2.840.10008.5.1.4.1.1.2",  # CT Image Storage
    "MR": "1.2.840.10008.5.1.4.1.1.4",  # MR Image Storage
}

# Tags needed to split and check a series; reading only these keeps a scan of
# a PACS export with thousands of files fast.
_HEADER_TAGS = [
    "SeriesInstanceUID",
    "SeriesNumber",
    "SeriesDescription",
    "Modality",
    "InstanceNumber",
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "PixelSpacing",
    "Rows",
    "Columns",
    "NumberOfFrames",
]


@dataclass(frozen=True)
class SeriesInfo:
    """One series found in a folder: its UID, files (sorted by name) and labels."""

    uid: str
    files: list[Path] = field(hash=False)
    number: int | None = None
    description: str = ""
    modality: str = ""


# ----------------------------------------------------------------- writing


def write_dicom_series(
    image: np.ndarray,
    affine: np.ndarray,
    folder: str | Path,
    *,
    series_description: str = "volumes phantom",
    patient_id: str = "PHANTOM",
    study_uid: str | None = None,
    series_uid: str | None = None,
    modality: str = "CT",
    series_number: int = 1,
    file_prefix: str = "slice_",
    body_part: str = "ABDOMEN",
) -> list[Path]:
    """Write a volume as a single-frame DICOM series, one file per slice.

    Args:
        image: ``[X, Y, Z]`` intensities (HU for CT); rounded to int16 and
            clipped to the int16 range.
        affine: ``[4, 4]`` voxel-to-world matrix in nibabel's RAS+ convention,
            with the voxel index order of ``image``. Its x and y columns must be
            orthogonal and z parallel to their cross product (DICOM slices cannot
            be sheared).
        folder: created if missing. Files are named ``{file_prefix}{k:04d}.dcm``
            (k = 1..Z) and written atomically (temporary file, then rename).
        series_description, patient_id, study_uid, series_uid, modality,
        series_number: header values; UIDs are generated when ``None``.
        body_part: BodyPartExamined (the phantoms are abdominal CT). An unpaired body part
            makes General Series' Laterality not apply, so the files pass ``dciodvfy``.

    Returns:
        The written files in slice order (k = 0..Z-1).
    """
    pydicom = require("pydicom", "writing DICOM series")
    image = np.asarray(image)
    affine = np.asarray(affine, dtype=np.float64)
    if image.ndim != 3:
        raise ValueError(f"image must be [X, Y, Z]; got shape {image.shape}")
    if affine.shape != (4, 4):
        raise ValueError(f"affine must be 4x4; got shape {affine.shape}")
    if modality not in _SOP_CLASS_FOR_MODALITY:
        raise ConfigError("modality", modality, sorted(_SOP_CLASS_FOR_MODALITY))
    if not np.all(np.isfinite(image)):
        raise ValueError("image contains NaN or Inf voxels; DICOM pixel data must be finite")

    row_cosine, column_cosine, spacing = _slice_geometry(affine)
    pixels = np.clip(np.rint(image), -32768, 32767).astype("<i2")
    normal = np.cross(row_cosine, column_cosine)

    uid = pydicom.uid.generate_uid
    study_uid = study_uid or uid()
    series_uid = series_uid or uid()
    frame_uid = uid()
    now = datetime.datetime.now()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)

    written = []
    for k in range(image.shape[2]):
        position = RAS_TO_LPS @ (affine @ np.array([0.0, 0.0, k, 1.0]))[:3]
        ds = _slice_dataset(
            pydicom,
            # DICOM rows run along the volume's y axis and columns along x.
            pixels[:, :, k].T,
            sop_class=_SOP_CLASS_FOR_MODALITY[modality],
            modality=modality,
            instance=k + 1,
            position=position,
            orientation=np.concatenate([row_cosine, column_cosine]),
            slice_location=float(position @ normal),
            spacing=spacing,
            uids=(study_uid, series_uid, frame_uid),
            patient_id=patient_id,
            series_description=series_description,
            series_number=series_number,
            body_part=body_part,
            now=now,
        )
        path = folder / f"{file_prefix}{k + 1:04d}.dcm"
        _write_atomic(pydicom, ds, path)
        written.append(path)
    return written


def _slice_geometry(affine: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """LPS row/column direction cosines and (x, y, z) spacing of an RAS affine."""
    from monai.data.utils import affine_to_spacing

    matrix = affine[:3, :3]
    spacing = affine_to_spacing(np.asarray(affine, dtype=np.float64), r=3, suppress_zeros=False)
    if np.any(spacing <= 0):
        raise ValueError(f"affine has a zero-length axis: spacing {spacing.tolist()}")
    directions = matrix / spacing
    if abs(directions[:, 0] @ directions[:, 1]) > 1e-4:
        raise ValueError("affine x and y axes are not orthogonal; DICOM pixels must be rectangular")
    in_plane_normal = np.cross(directions[:, 0], directions[:, 1])
    if abs(abs(in_plane_normal @ directions[:, 2]) - 1.0) > 1e-4:
        raise ValueError("affine z axis is not perpendicular to the slices; DICOM cannot store a sheared volume")
    return RAS_TO_LPS @ directions[:, 0], RAS_TO_LPS @ directions[:, 1], spacing


def _slice_dataset(pydicom: Any, pixels: np.ndarray, *, sop_class: str, modality: str, instance: int,
                   position: np.ndarray, orientation: np.ndarray, slice_location: float, spacing: np.ndarray,
                   uids: tuple[str, str, str], patient_id: str, series_description: str,
                   series_number: int, body_part: str, now: datetime.datetime) -> Any:
    """A single-frame image dataset with the modules a CT/MR reader needs."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.valuerep import format_number_as_ds

    def ds_values(values: Sequence[float]) -> list[str]:
        # DS strings are limited to 16 characters; this keeps the most precision.
        return [format_number_as_ds(float(v)) for v in values]

    study_uid, series_uid, frame_uid = uids
    sop_instance_uid = pydicom.uid.generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_instance_uid
    meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    meta.ImplementationClassUID = pydicom.uid.PYDICOM_IMPLEMENTATION_UID

    ds = FileDataset("", {}, file_meta=meta, preamble=b"\0" * 128)
    if int(pydicom.__version__.split(".")[0]) < 3:
        ds.is_little_endian, ds.is_implicit_VR = True, False
    date, time = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_instance_uid
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = date
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = time
    ds.AccessionNumber = ""
    ds.Modality = modality
    ds.BodyPartExamined = body_part
    ds.Manufacturer = "volumes"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = ""
    ds.SeriesDescription = series_description
    ds.PatientName = f"{patient_id}^"  # family-name component only (a bare word is ambiguous in DICOM PN)
    ds.PatientID = patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    ds.PatientPosition = "HFS"
    ds.SliceThickness = format_number_as_ds(float(spacing[2]))
    ds.SpacingBetweenSlices = format_number_as_ds(float(spacing[2]))
    if modality == "CT":
        ds.KVP = ""
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = "1"
    ds.SeriesNumber = series_number
    ds.AcquisitionNumber = 1
    ds.InstanceNumber = instance
    ds.ImagePositionPatient = ds_values(position)
    ds.ImageOrientationPatient = ds_values(orientation)
    ds.FrameOfReferenceUID = frame_uid
    ds.PositionReferenceIndicator = ""
    ds.SliceLocation = format_number_as_ds(slice_location)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    # PixelSpacing is (between rows, between columns) = (y, x) spacing.
    ds.PixelSpacing = ds_values([spacing[1], spacing[0]])
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.RescaleIntercept = "0"
    ds.RescaleSlope = "1"
    if modality == "CT":
        ds.RescaleType = "HU"
    ds.WindowCenter = "40"
    ds.WindowWidth = "400"
    ds.PixelData = np.ascontiguousarray(pixels, dtype="<i2").tobytes()
    return ds


def _write_atomic(pydicom: Any, ds: Any, path: Path) -> None:
    """Write to a temporary file in the same folder, then rename over ``path``."""
    from volumes.atomic import atomic_path

    with atomic_path(path) as tmp:
        try:
            pydicom.dcmwrite(tmp, ds, enforce_file_format=True)
        except TypeError:  # pydicom < 3
            ds.save_as(tmp, write_like_original=False)


# ----------------------------------------------------------------- reading headers


def is_dicom_file(path: str | Path) -> bool:
    """True when the file starts with the DICOM Part 10 preamble and ``DICM`` magic.

    Files without the preamble (rare, pre-2000 exports) are not recognised.
    """
    try:
        with open(path, "rb") as handle:
            head = handle.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def dicom_files(folder: str | Path) -> list[Path]:
    """DICOM files directly inside ``folder`` (not in subfolders), sorted by name."""
    folder = Path(folder)
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".") and is_dicom_file(p))


def _read_header(path: Path) -> Any:
    pydicom = require("pydicom", "reading DICOM series")
    try:
        return pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_HEADER_TAGS)
    except Exception as exc:  # pydicom raises many types for damaged files
        raise VolumeReadError(path, f"is a damaged DICOM file ({exc})") from exc


def _is_image_slice(ds: Any) -> bool:
    # Multi-frame objects (enhanced CT/MR, SEG) keep positions per frame, not here.
    return (
        "ImagePositionPatient" in ds
        and "ImageOrientationPatient" in ds
        and "Rows" in ds
        and int(getattr(ds, "NumberOfFrames", 1) or 1) == 1
    )


def _slice_headers(folder: Path) -> list[tuple[Path, Any]]:
    """Headers of the single-frame image slices in ``folder``; errors when there are none."""
    if not folder.exists():
        raise VolumeReadError(folder, "does not exist")
    if not folder.is_dir():
        raise VolumeReadError(folder, "is not a folder; a DICOM series is read from the folder that holds its files")
    files = dicom_files(folder)
    if not files:
        raise VolumeReadError(folder, "holds no DICOM files (looked for files with the DICM preamble)")
    headers = [(path, _read_header(path)) for path in files]
    slices = [(path, ds) for path, ds in headers if _is_image_slice(ds)]
    if not slices:
        raise VolumeReadError(
            folder,
            f"holds {len(files)} DICOM files but no single-frame image slices with ImagePositionPatient "
            "(multi-frame/enhanced DICOM and non-image objects are not supported)",
        )
    return slices


def _series_uid(ds: Any) -> str:
    # Anonymisers sometimes blank the UID; all such slices then form one series "".
    return str(getattr(ds, "SeriesInstanceUID", "") or "")


def read_series_uid(path: str | Path) -> str:
    """SeriesInstanceUID of one DICOM file ("" when blank or absent)."""
    return _series_uid(_read_header(Path(path)))


def read_modality(path: str | Path) -> str:
    """Modality tag (0008,0060) of one DICOM file, upper case ("" when blank or absent)."""
    return str(getattr(_read_header(Path(path)), "Modality", "") or "").strip().upper()


def series_info(folder: str | Path) -> list[SeriesInfo]:
    """Every image series directly inside ``folder``, sorted by (SeriesNumber, UID).

    Reads headers only. Raises VolumeReadError when the folder holds no image slices.
    """
    groups: dict[str, list[tuple[Path, Any]]] = {}
    for path, ds in _slice_headers(Path(folder)):
        groups.setdefault(_series_uid(ds), []).append((path, ds))
    infos = []
    for uid, members in groups.items():
        first = members[0][1]
        number = getattr(first, "SeriesNumber", None)
        infos.append(
            SeriesInfo(
                uid=uid,
                files=sorted(path for path, _ in members),
                number=int(number) if number not in (None, "") else None,
                description=str(getattr(first, "SeriesDescription", "") or ""),
                modality=str(getattr(first, "Modality", "") or ""),
            )
        )
    return sorted(infos, key=lambda info: (info.number if info.number is not None else -1, info.uid))


def split_series(folder: str | Path) -> dict[str, list[Path]]:
    """Map SeriesInstanceUID -> its slice files (sorted by name) for the series in ``folder``."""
    return {info.uid: info.files for info in series_info(folder)}


# ----------------------------------------------------------------- checking


def check_dicom_series(
    folder: str | Path,
    *,
    series_uid: str | None = None,
    spacing_tolerance: float = SPACING_TOLERANCE,
) -> list[Path]:
    """Check that ``folder`` holds one loadable 3D series and return its files in slice order.

    Reads headers only. Slices are sorted by their position along the slice
    normal (row cosine x column cosine), ascending.

    Args:
        folder: the series folder (files directly inside it).
        series_uid: pick this SeriesInstanceUID when the folder holds several.
        spacing_tolerance: allowed deviation of a slice gap from the median gap,
            as a fraction of the median.

    Raises:
        VolumeReadError naming the folder when: it holds no DICOM files or no
        image slices; several series and no ``series_uid``; the requested series
        is absent; slices differ in Rows/Columns, orientation or pixel spacing;
        there is a single slice; two slices share a position; a slice is missing
        (a gap of about twice the median spacing); spacing is otherwise non-uniform.
    """
    folder = Path(folder)
    slices = _slice_headers(folder)
    slices = _pick_series(folder, slices, series_uid)
    order = check_series_geometry(folder, slices, spacing_tolerance=spacing_tolerance)
    return [slices[i][0] for i in order]


def check_series_geometry(folder: str | Path, slices: Sequence[tuple[Path, Any]], *,
                          spacing_tolerance: float = SPACING_TOLERANCE, min_slices: int = 2) -> np.ndarray:
    """The slice order of one series' headers ``[(path, dataset), ...]`` that make one regular 3D grid.

    The one geometry check of a series, for loading (:func:`check_dicom_series`) and for the
    PACS node's pre-flight (:func:`volumes.pacs.rules.preflight`, which reports the problem).

    Raises:
        VolumeReadError naming ``folder``: fewer than ``min_slices`` slices; Rows/Columns,
        orientation or pixel spacing differ; two slices share a position; a slice is missing;
        the spacing is otherwise non-uniform (beyond ``spacing_tolerance`` of the median gap).
    """
    folder = Path(folder)
    if len(slices) < max(2, min_slices):
        if len(slices) == 1:
            raise VolumeReadError(folder, "holds a single slice, which is not a 3D volume (need at least 2 slices)")
        raise VolumeReadError(folder, f"too few slices: {len(slices)} (at least {max(2, min_slices)} needed)")
    _check_same_frame(folder, slices)
    positions = _positions_along_normal(slices)
    order = np.argsort(positions, kind="stable")
    _check_spacing(folder, positions[order], spacing_tolerance)
    return order


def _pick_series(folder: Path, slices: list[tuple[Path, Any]], series_uid: str | None) -> list[tuple[Path, Any]]:
    uids = sorted({_series_uid(ds) for _, ds in slices})
    if series_uid is not None:
        chosen = [(path, ds) for path, ds in slices if _series_uid(ds) == series_uid]
        if not chosen:
            raise VolumeReadError(folder, f"has no series with SeriesInstanceUID {series_uid!r} (found: {', '.join(map(repr, uids))})")
        return chosen
    if len(uids) > 1:
        raise VolumeReadError(
            folder,
            f"holds {len(uids)} DICOM series (SeriesInstanceUIDs {', '.join(map(repr, uids))}); "
            "discover_cases splits such a folder into one case per series, or pass series_uid= to load one",
        )
    return slices


def _check_same_frame(folder: Path, slices: list[tuple[Path, Any]]) -> None:
    """All slices share Rows/Columns, orientation and pixel spacing."""
    sizes = {(int(ds.Rows), int(ds.Columns)) for _, ds in slices}
    if len(sizes) > 1:
        raise VolumeReadError(folder, f"slices have inconsistent Rows/Columns: {sorted(sizes)}")
    orientations = np.array([[float(v) for v in ds.ImageOrientationPatient] for _, ds in slices])
    if np.abs(orientations - orientations[0]).max() > _ORIENTATION_TOLERANCE:
        raise VolumeReadError(folder, "slices have inconsistent orientation (ImageOrientationPatient differs between slices)")
    spacings = np.array([[float(v) for v in getattr(ds, "PixelSpacing", [1.0, 1.0])] for _, ds in slices])
    if np.abs(spacings - spacings[0]).max() > 1e-4 * max(1.0, float(spacings[0].max())):
        raise VolumeReadError(folder, "slices have inconsistent PixelSpacing")


def _positions_along_normal(slices: list[tuple[Path, Any]]) -> np.ndarray:
    """Each slice's ImagePositionPatient projected on the slice normal, in mm."""
    orientation = np.array([float(v) for v in slices[0][1].ImageOrientationPatient])
    normal = np.cross(orientation[:3], orientation[3:])
    positions = np.array([[float(v) for v in ds.ImagePositionPatient] for _, ds in slices])
    return positions @ normal


def _check_spacing(folder: Path, positions: np.ndarray, tolerance: float) -> None:
    """Sorted slice positions are evenly spaced: no duplicates, gaps or irregular steps."""
    gaps = np.diff(positions)
    extent = max(float(positions[-1] - positions[0]), 1e-6)
    same = np.flatnonzero(gaps <= _SAME_POSITION * extent / len(gaps))
    if same.size:
        where = positions[same[0]]
        raise VolumeReadError(
            folder,
            f"{same.size + 1} slices share the position {where:.2f} mm (duplicate files, or several volumes "
            "such as phases or echoes in one series)",
        )
    median = float(np.median(gaps))
    allowed = tolerance * median
    for i, gap in enumerate(gaps):
        if abs(gap - median) <= allowed:
            continue
        steps = round(gap / median)
        if steps >= 2 and abs(gap - steps * median) <= max(allowed, 0.1 * median):
            missing = "a missing slice" if steps == 2 else f"{steps - 1} missing slices"
            raise VolumeReadError(
                folder,
                f"{missing} between positions {positions[i]:.2f} and {positions[i + 1]:.2f} mm "
                f"(gap {gap:.3g} mm, median spacing {median:.3g} mm)",
            )
        raise VolumeReadError(
            folder,
            f"non-uniform slice spacing: gaps range from {gaps.min():.4g} to {gaps.max():.4g} mm "
            f"(median {median:.4g} mm, tolerance {100 * tolerance:g}%); first irregular gap between "
            f"positions {positions[i]:.2f} and {positions[i + 1]:.2f} mm",
        )

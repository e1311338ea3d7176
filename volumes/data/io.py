"""Load 3D volumes (NIfTI, NRRD, MetaImage, DICOM series) as checked, oriented MetaTensors.

Every reader first reads the header, checks it (dimensions, size against the
bytes on disk, an upper bound on the voxel count) and only then allocates the
voxel array, so a corrupt or hostile header gives a readable
:class:`~volumes.errors.VolumeReadError` instead of a memory error.

Readers: NIfTI through MONAI's ``NibabelReader`` (gzipped voxels decompressed by
python-isal's ``igzip`` when installed: about twice as fast as zlib); NRRD, MetaImage
and DICOM series through SimpleITK (GDCM decodes compressed DICOM). World coordinates are
RAS+ (nibabel's convention, MONAI's ``space="RAS"``) whatever the file stores.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Hashable, Mapping, Sequence

import nibabel as nib
import numpy as np
import SimpleITK as sitk
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor, NibabelReader
from monai.transforms import MapTransform, Orientation, Spacing
from monai.utils import ensure_tuple_rep
from nibabel.arrayproxy import ArrayProxy

from volumes.arrays import as_numpy
from volumes.data.dicom import check_dicom_series, read_modality, read_series_uid
from volumes.data.formats import ITK_SUFFIXES, NIFTI_SUFFIXES, VOLUME_SUFFIXES, volume_suffix
from volumes.errors import ConfigError, VolumeReadError

try:  # Intel ISA-L's gzip: the same format, decompressed about twice as fast as zlib
    from isal import igzip
except ImportError:  # pragma: no cover - isal is a dependency; zlib (through nibabel) still works
    igzip = None

__all__ = [
    "MAX_VOXELS",
    "VOLUME_SUFFIXES",
    "LoadVolumed",
    "check_label_matches",
    "load_label",
    "load_volume",
    "save_nifti",
    "source_sha256",
    "volume_suffix",
]

# Larger volumes are rejected before allocation: 2**31 float32 voxels are 8 GiB,
# beyond any real CT/MR volume, so such a header is corrupt or hostile.
MAX_VOXELS = 2**31


_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
_AXIS_CODES = set("LRAPSI")
# Axis-code meaning for Orientation: our tensors are always in RAS+ world space.
_RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))


# ----------------------------------------------------------------- public API


def load_volume(
    path: str | Path,
    *,
    orientation: str | None = "RAS",
    spacing: float | Sequence[float] | None = None,
    dtype: Any = np.float32,
    series_uid: str | None = None,
    mode: str = "bilinear",
) -> MetaTensor:
    """Read a volume file or DICOM series folder as a checked, oriented tensor.

    Args:
        path: a ``.nii``/``.nii.gz``/``.nrrd``/``.nhdr``/``.mha``/``.mhd`` file, or
            a folder holding a DICOM series.
        orientation: axis codes to reorient to (MONAI ``Orientation``), e.g.
            ``"RAS"``; None keeps the stored voxel order.
        spacing: resample to this voxel size in mm (one number = isotropic);
            None keeps the stored grid.
        dtype: numpy dtype of the returned voxels; None keeps the stored one when it
            is compact (uint8, int8, int16, float32: a CT's int16 voxels take half the
            memory of float32) and gives float32 otherwise.
        series_uid: for a DICOM folder holding several series, the
            SeriesInstanceUID to load (``Case.extra["series_uid"]`` from
            discovery). Ignored for files.
        mode: interpolation when ``spacing`` is given (``"nearest"`` for labels).

    Returns:
        MetaTensor ``[1, X, Y, Z]`` with ``.affine`` (RAS+, voxel to mm) and
        ``.meta["filename_or_obj"]``; ``meta["original_affine"]`` and
        ``meta["spatial_shape"]`` describe the grid as stored on disk.

    Raises:
        VolumeReadError: the path is missing, unreadable, not 3D, has a zero-size
        or absurd size, a header that does not match its data, or NaN/Inf voxels.
        ConfigError: bad ``orientation`` or ``spacing``.
    """
    axcodes = _check_orientation(orientation)
    pixdim = _check_spacing(spacing)
    path = Path(path)
    if not path.exists():
        raise VolumeReadError(path, "does not exist")
    if path.is_dir():
        array, affine, meta = _read_dicom_series(path, series_uid)
    else:
        suffix = volume_suffix(path)
        if suffix in NIFTI_SUFFIXES:
            array, affine, meta = _read_nifti(path)
        elif suffix in ITK_SUFFIXES:
            array, affine, meta = _read_itk_file(path)
        else:
            raise VolumeReadError(
                path, f"unknown file type (expected one of {', '.join(VOLUME_SUFFIXES)} or a DICOM series folder)"
            )
    _check_finite(path, array)
    if dtype is None:  # the stored type if compact, unless resampling makes new values
        native = array.dtype.newbyteorder("=")
        dtype = native if native in _COMPACT and (pixdim is None or mode == "nearest") else np.dtype(np.float32)
    # Reorient small integer voxels before the float conversion: the flip then copies
    # int16 (2 bytes per voxel), not float32, and the conversion is the last full copy.
    stored = array.dtype
    early = axcodes is not None and stored in _TORCH_INTEGERS and stored.itemsize < np.dtype(dtype).itemsize
    volume = _to_meta_tensor(path, array, affine, meta, stored if early else dtype)
    del array
    if axcodes is not None:
        volume = Orientation(axcodes=axcodes, labels=_RAS_LABELS)(volume)
    if pixdim is not None:
        volume = Spacing(pixdim=pixdim, mode=mode)(volume)
    return volume.to(dtype=_torch_dtype(dtype)) if volume.dtype != _torch_dtype(dtype) else volume


def load_label(
    path: str | Path,
    like: MetaTensor,
    *,
    orientation: str | None = "RAS",
    spacing: float | Sequence[float] | None = None,
    dtype: Any = np.float32,
) -> MetaTensor:
    """Load a label map and check that it lies on the same grid as ``like``.

    Uses nearest-neighbour interpolation when ``spacing`` is given. Pass the
    same ``orientation``/``spacing`` that ``like`` was loaded with.

    Returns:
        MetaTensor ``[1, X, Y, Z]`` on the grid of ``like``.

    Raises:
        VolumeReadError naming ``path`` when its shape or affine differs from ``like``.
    """
    label = load_volume(path, orientation=orientation, spacing=spacing, dtype=dtype, mode="nearest")
    check_label_matches(like, label, path)
    return label


def check_label_matches(
    image: MetaTensor, label: MetaTensor, label_path: str | Path, *, atol: float = 1e-3
) -> None:
    """Raise VolumeReadError(label_path, ...) unless label and image share a grid.

    Args:
        image, label: ``[C, X, Y, Z]`` MetaTensors (after the same orientation).
        atol: tolerance on affine entries (mm); NIfTI stores affines as float32.
    """
    image_shape, label_shape = tuple(image.shape[1:]), tuple(label.shape[1:])
    if image_shape != label_shape:
        raise VolumeReadError(label_path, f"label shape {label_shape} does not match image shape {image_shape}")
    difference = np.abs(_affine(label) - _affine(image)).max()
    if difference > atol:
        raise VolumeReadError(
            label_path,
            f"label affine does not match image affine (largest difference {difference:.4g}, tolerance {atol:g}); "
            "the label was drawn on another grid",
        )


class LoadVolumed(MapTransform):
    """Dictionary transform: replace each path under ``keys`` by :func:`load_volume`'s tensor.

    Usable from bundle JSON as ``{"_target_": "volumes.data.io.LoadVolumed",
    "keys": ["image", "label"], "mode": ["bilinear", "nearest"]}``. A DICOM folder
    holding several series is loaded with the UID stored under ``series_uid_key``
    (``Case.to_dict()`` puts it there).

    ``label_keys`` (a subset of ``keys``) are read with nearest-neighbour interpolation
    and checked against the first other key with :func:`check_label_matches`.

    Output per key: MetaTensor ``[1, X, Y, Z]``. A value that is already a MetaTensor
    (a volume loaded once and shared by several pipelines) passes through unchanged.
    """

    def __init__(
        self,
        keys: KeysCollection,
        orientation: str | None = "RAS",
        spacing: float | Sequence[float] | None = None,
        dtype: Any = np.float32,
        mode: str | Sequence[str] = "bilinear",
        series_uid_key: str | None = "series_uid",
        label_keys: KeysCollection = (),
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.orientation = _check_orientation(orientation)
        self.spacing = _check_spacing(spacing)
        self.dtype = None if dtype is None else np.dtype(dtype)
        self.mode = ensure_tuple_rep(mode, len(self.keys))
        self.series_uid_key = series_uid_key
        self.label_keys = tuple(label_keys) if isinstance(label_keys, (list, tuple)) else (label_keys,)
        unknown = [k for k in self.label_keys if k not in self.keys]
        if unknown:
            raise ValueError(f"label_keys {unknown} must be among keys {list(self.keys)}")
        if self.label_keys and len(self.keys) == len(self.label_keys):
            raise ValueError("label_keys need an image key to be checked against")

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        series_uid = d.get(self.series_uid_key) if self.series_uid_key else None
        for key, mode in self.key_iterator(d, self.mode):
            if isinstance(d[key], MetaTensor):
                continue
            path = Path(d[key])
            d[key] = load_volume(
                path,
                orientation=self.orientation,
                spacing=self.spacing,
                dtype=self.dtype,
                series_uid=series_uid if path.is_dir() else None,
                mode="nearest" if key in self.label_keys else mode,
            )
        if self.label_keys:
            # a label on another grid fails here, naming its file, not deep inside training
            reference = next(k for k in self.keys if k not in self.label_keys)
            for key in self.label_keys:
                if key in d and reference in d:
                    check_label_matches(d[reference], d[key], data[key])
        return d


# ----------------------------------------------------------------- argument checks


def _check_orientation(orientation: str | None) -> str | None:
    if orientation is None:
        return None
    codes = str(orientation).upper()
    pairs = [{"L", "R"}, {"A", "P"}, {"S", "I"}]
    if len(codes) != 3 or not set(codes) <= _AXIS_CODES or any(len(pair & set(codes)) != 1 for pair in pairs):
        raise ConfigError("orientation", orientation, "three axis codes, one from each of L/R, A/P, S/I, e.g. 'RAS'")
    return codes


def _check_spacing(spacing: float | Sequence[float] | None) -> tuple[float, float, float] | None:
    if spacing is None:
        return None
    values = [float(spacing)] * 3 if np.isscalar(spacing) else [float(v) for v in spacing]  # type: ignore[arg-type]
    if len(values) != 3 or not all(math.isfinite(v) and v > 0 for v in values):
        raise ConfigError("spacing", spacing, "None, a positive number, or three positive numbers (mm)")
    return tuple(values)  # type: ignore[return-value]


def _torch_dtype(dtype: Any) -> torch.dtype:
    return torch.from_numpy(np.zeros(0, dtype=np.dtype(dtype))).dtype


def _affine(tensor: MetaTensor) -> np.ndarray:
    affine = tensor.affine
    return as_numpy(affine).astype(np.float64)


# ----------------------------------------------------------------- header checks


def _check_shape(path: Path, shape: Sequence[int]) -> tuple[int, int, int]:
    """The 3D shape of a header shape ``[X, Y, Z, ...]``; trailing size-1 dimensions are squeezed."""
    shape = tuple(int(s) for s in shape)
    if len(shape) < 3:
        raise VolumeReadError(path, f"is {len(shape)}D (shape {shape}); a 3D volume is needed")
    if any(s < 0 for s in shape):
        raise VolumeReadError(path, f"has a negative dimension in its header (shape {shape})")
    if any(s == 0 for s in shape):
        raise VolumeReadError(path, f"has a zero-size dimension (shape {shape})")
    voxels = math.prod(shape)
    if voxels > MAX_VOXELS:
        raise VolumeReadError(
            path, f"header claims {voxels} voxels (shape {shape}), more than the limit of 2**31; refusing to allocate"
        )
    if any(s > 1 for s in shape[3:]):
        raise VolumeReadError(
            path, f"is {len(shape)}D with {math.prod(shape[3:])} volumes (shape {shape}); split it into 3D volumes"
        )
    spatial = shape[:3]
    if 1 in spatial:
        raise VolumeReadError(
            path, f"has a single slice along axis {spatial.index(1)} (shape {spatial}); a 3D volume is needed"
        )
    return spatial  # type: ignore[return-value]


def _check_bytes(path: Path, data_file: Path, offset: int, shape: Sequence[int], itemsize: int, what: str) -> None:
    """Uncompressed data must hold every voxel the header promises."""
    needed = math.prod(shape) * itemsize
    if not data_file.exists():
        raise VolumeReadError(path, f"its data file {data_file.name} does not exist")
    present = data_file.stat().st_size - offset
    if present < needed:
        raise VolumeReadError(
            path,
            f"header size does not match the data: header says shape {tuple(shape)} of {what} "
            f"({needed} bytes) but the file holds only {max(present, 0)} bytes of voxel data",
        )


def _check_finite(path: Path, array: np.ndarray) -> None:
    if not np.issubdtype(array.dtype, np.floating):
        return
    nans = int(np.isnan(array).sum())
    infs = int(np.isinf(array).sum())
    if nans or infs:
        found = " and ".join(text for count, text in ((nans, f"{nans} NaN"), (infs, f"{infs} Inf")) if count)
        raise VolumeReadError(path, f"contains {found} voxels (of {array.size})")


# ----------------------------------------------------------------- NIfTI


class _NiftiReader(NibabelReader):
    """MONAI's ``NibabelReader``, reading ``.nii.gz`` voxels through ``isal.igzip`` when installed."""

    def _get_array_data(self, img, filename):
        proxy = img.dataobj
        if igzip is None or not str(filename).lower().endswith(".gz") or not isinstance(proxy, ArrayProxy):
            return super()._get_array_data(img, filename)
        with igzip.open(filename, "rb") as stream:
            # nibabel's own proxy on the isal stream: the same offset, order and scaling
            fast = ArrayProxy(stream, (proxy.shape, proxy.dtype, proxy.offset, proxy.slope, proxy.inter),
                              mmap=False, order=proxy.order)
            return np.asanyarray(fast)


def _read_nifti(path: Path) -> tuple[np.ndarray, np.ndarray, dict]:
    """``[X, Y, Z]`` array, RAS affine and header meta of a NIfTI file."""
    reader = _NiftiReader()
    try:
        image = reader.read(str(path))  # lazy: reads the header only
    except Exception as exc:  # nibabel raises ImageFileError, OSError, EOFError, zlib.error...
        raise VolumeReadError(path, f"cannot be read as NIfTI; the file is corrupt or not NIfTI ({_first_line(exc)})") from exc
    spatial = _check_shape(path, image.shape)
    if path.name.lower().endswith(".nii"):
        proxy = image.dataobj
        offset = int(getattr(proxy, "offset", 352))
        _check_bytes(path, path, offset, image.shape, image.get_data_dtype().itemsize, str(image.get_data_dtype()))
    try:
        array, meta = reader.get_data(image)
    except Exception as exc:
        raise VolumeReadError(
            path,
            f"voxel data is truncated or corrupt: the header says shape {tuple(image.shape)} but the data "
            f"could not be read ({_first_line(exc)})",
        ) from exc
    meta["format"] = "nifti"
    return np.asarray(array).reshape(spatial), np.asarray(meta["affine"], dtype=np.float64), meta


def save_nifti(image: nib.Nifti1Image, path: str | Path) -> Path:
    """``nibabel.save`` for one NIfTI file; ``.nii.gz`` is compressed by ``isal.igzip`` when installed.

    ISA-L at level 1 wrote a 512 x 512 x 200 label map faster than zlib at nibabel's
    default level 1, and smaller. Not atomic by itself: write to a temporary name
    (:func:`volumes.atomic.atomic_path`) and rename.
    """
    path = Path(path)
    if igzip is None or not path.name.lower().endswith(".gz"):
        nib.save(image, path)
        return path
    with igzip.open(path, "wb", compresslevel=1) as stream:
        image.to_file_map({"image": nib.FileHolder(filename=str(path), fileobj=stream)})
    return path


# ----------------------------------------------------------------- NRRD / MetaImage


def _read_itk_file(path: Path) -> tuple[np.ndarray, np.ndarray, dict]:
    """``[X, Y, Z]`` array, RAS affine and meta of an NRRD or MetaImage file via SimpleITK."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise VolumeReadError(path, f"cannot be read; the file is corrupt or not {volume_suffix(path)} ({_itk_message(exc)})") from exc
    if reader.GetNumberOfComponents() != 1:
        raise VolumeReadError(path, f"has {reader.GetNumberOfComponents()} components per voxel; a scalar volume is needed")
    shape = _check_shape(path, reader.GetSize())
    source = _raw_data_location(path)
    if source is not None:
        itemsize = _itk_itemsize(reader.GetPixelID())
        _check_bytes(path, source[0], source[1], reader.GetSize(), itemsize, sitk.GetPixelIDValueAsString(reader.GetPixelID()))
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        raise VolumeReadError(path, f"voxel data is truncated or corrupt ({_itk_message(exc)})") from exc
    array, affine = _sitk_to_ras(image, shape)
    return array, affine, {"format": volume_suffix(path).lstrip(".")}


def _raw_data_location(path: Path) -> tuple[Path, int] | None:
    """(file, byte offset) of uncompressed voxel data; None when compressed or not simple to locate."""
    with open(path, "rb") as handle:
        head = handle.read(1 << 16)
    suffix = volume_suffix(path)
    if suffix in (".mha", ".mhd"):
        return _metaimage_data_location(path, head)
    return _nrrd_data_location(path, head)


def _metaimage_data_location(path: Path, head: bytes) -> tuple[Path, int] | None:
    fields: dict[str, str] = {}
    offset = 0
    for line in head.splitlines(keepends=True):
        offset += len(line)
        key, _, value = line.decode("latin-1").partition("=")
        fields[key.strip()] = value.strip()
        if key.strip() == "ElementDataFile":
            break
    else:
        return None
    if fields.get("CompressedData", "False").lower() == "true" or "HeaderSize" in fields:
        return None
    data_file = fields["ElementDataFile"]
    if data_file == "LOCAL":
        return path, offset
    if data_file.startswith("LIST") or "%" in data_file or " " in data_file:
        return None
    return path.parent / data_file, 0


def _nrrd_data_location(path: Path, head: bytes) -> tuple[Path, int] | None:
    match = re.search(rb"\r?\n\r?\n", head)
    if not head.startswith(b"NRRD") or (match is None and volume_suffix(path) == ".nrrd"):
        return None
    text = head[: match.start() if match else len(head)].decode("latin-1")
    fields = {}
    for line in text.splitlines()[1:]:
        if line.startswith("#") or ":" not in line:
            continue
        key, _, value = line.partition(":")
        fields[key.strip().lower()] = value.lstrip("=").strip()
    if fields.get("encoding", "") != "raw" or "byte skip" in fields or "line skip" in fields:
        return None
    data_file = fields.get("data file", fields.get("datafile"))
    if data_file is None:
        return (path, match.end()) if match else None
    if data_file.startswith("LIST") or " " in data_file or "%" in data_file:
        return None
    return path.parent / data_file, 0


def _itk_itemsize(pixel_id: int) -> int:
    return sitk.GetArrayViewFromImage(sitk.Image([1, 1], pixel_id)).dtype.itemsize


def _sitk_to_ras(image: sitk.Image, shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """``[X, Y, Z]`` array and RAS affine of a SimpleITK image (which stores LPS geometry)."""
    dimension = image.GetDimension()
    # SimpleITK arrays are [..., Z, Y, X]; reverse to put x first like nibabel.
    array = sitk.GetArrayFromImage(image).transpose(tuple(range(dimension))[::-1]).reshape(shape)
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(dimension, dimension)[:3, :3]
    lps = np.eye(4)
    lps[:3, :3] = direction * np.asarray(image.GetSpacing()[:3], dtype=np.float64)
    lps[:3, 3] = image.GetOrigin()[:3]
    return np.ascontiguousarray(array), _LPS_TO_RAS @ lps


# ----------------------------------------------------------------- DICOM


def _read_dicom_series(folder: Path, series_uid: str | None) -> tuple[np.ndarray, np.ndarray, dict]:
    """``[X, Y, Z]`` array (rescaled, e.g. HU) and RAS affine of a checked DICOM series."""
    files = check_dicom_series(folder, series_uid=series_uid)
    reader = sitk.ImageSeriesReader()
    # The order given is kept: ITK takes the slice axis direction from first to last file.
    reader.SetFileNames([str(f) for f in files])
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        raise VolumeReadError(folder, f"DICOM pixel data cannot be decoded ({_itk_message(exc)})") from exc
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise VolumeReadError(folder, "is a colour (multi-component) DICOM series; a scalar volume is needed")
    array, affine = _sitk_to_ras(image, _check_shape(folder, image.GetSize()))
    # Only scalars: meta dicts are collated across a batch by the DataLoader.
    meta = {"format": "dicom", "series_uid": series_uid if series_uid is not None else read_series_uid(files[0]),
            "modality": read_modality(files[0])}
    return array, affine, meta


# ----------------------------------------------------------------- assembling


def _to_meta_tensor(path: Path, array: np.ndarray, affine: np.ndarray, meta: dict, dtype: Any) -> MetaTensor:
    """Channel-first MetaTensor ``[1, X, Y, Z]`` with MONAI's loader metadata keys."""
    meta = dict(meta)
    meta.update(
        {
            "filename_or_obj": str(path),
            "affine": torch.as_tensor(affine, dtype=torch.float64),
            "original_affine": np.array(affine, dtype=np.float64),
            "spatial_shape": np.array(array.shape, dtype=np.int64),
            "space": "RAS",
            "original_channel_dim": float("nan"),  # MONAI's marker for "no channel dimension"
        }
    )
    # Keep the stored voxel order (NIfTI's is Fortran: x fastest) instead of a transposing
    # copy to C order, which cost about half the load of a gzipped CT. Torch handles the
    # strides; a slice z stays one contiguous block of memory.
    values = np.asarray(array, dtype=np.dtype(dtype))
    if not (values.flags.c_contiguous or values.flags.f_contiguous) or min(values.strides, default=0) < 0:
        values = np.ascontiguousarray(values)
    if not values.flags.writeable:
        values = values.copy(order="K")
    return MetaTensor(torch.from_numpy(values)[None], meta=meta)


def source_sha256(path: str | Path, series_uid: str | None = None) -> str:
    """SHA-256 of a volume's input bytes: the file, or every file of its DICOM series (by name).

    For a DICOM folder, ``series_uid`` picks one series (as :func:`load_volume` does);
    without it every file of every series in the folder is hashed.
    """
    from volumes.hashing import NAMED_NUL, sha256_files

    path = Path(path)
    if path.is_dir():
        from volumes.data.dicom import series_info

        infos = series_info(path)
        files = next((info.files for info in infos if info.uid == series_uid), None) if series_uid else None
        if files is None:
            files = [f for info in infos for f in info.files]
    else:
        files = [path]
    return sha256_files(files, names=NAMED_NUL, sort_by_name=True)


# integer dtypes torch flips and converts natively (uint16 / uint32 are not among them)
_TORCH_INTEGERS = tuple(np.dtype(t) for t in ("uint8", "int8", "int16", "int32"))
# stored dtypes that load_volume(dtype=None) keeps
_COMPACT = tuple(np.dtype(t) for t in ("uint8", "int8", "int16", "float32"))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


def _itk_message(exc: BaseException) -> str:
    """The description part of a multi-line ITK/SimpleITK error (no source locations)."""
    text = str(exc)
    match = re.search(r"ERROR:\s*(?:\w+\(0x[0-9a-fA-F]+\):\s*)?(.*)", text, re.S)
    # ITK appends errno ("No such file or directory") even when the file exists.
    lines = [line.strip() for line in (match.group(1) if match else text).splitlines()]
    kept = [line for line in lines if line and "No such file or directory" not in line]
    return " ".join(kept) or type(exc).__name__

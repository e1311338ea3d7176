"""A phantom case of any size, painted and written a few slices at a time (the benchmarks' CT).

:class:`PhantomStream` draws case ``seed`` exactly as :func:`generate_phantom` does (same
anatomy, tissues and scan range) on a ``size x size x slices`` grid and yields it in
chunks of slices, so a 512 x 512 x 768 CT never exists in memory as a whole. The file
is int16 NIfTI with a fixed header spacing (:data:`SPACING_MM`), LPS-stored as ITK
writes an axial DICOM series; the anatomy is squeezed or stretched to fill it, so every
size shows the same body. See ``docs/PHANTOMS.md``.
"""

from __future__ import annotations

import contextlib
import copy
import gzip
import time
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

import numpy as np
from scipy import ndimage

from volumes.atomic import atomic_path
from volumes.data.phantoms.anatomy import _draw_case
from volumes.data.phantoms.config import PhantomConfig
from volumes.data.phantoms.rendering import (
    _body_grid,
    _correlated_noise,
    _draw_texture,
    _image_int16,
    _paint,
    _psf_voxels,
)
from volumes.errors import ConfigError

__all__ = ["CHUNK_SLICES", "GENERATOR_VERSION", "SPACING_MM", "PhantomStream", "cached_ct", "ct_affine",
           "ct_chunks", "write_ct"]

SPACING_MM = (0.8, 0.8, 1.5)
"""Voxel size written in the header (mm), whatever the anatomy's own spacing."""
GENERATOR_VERSION = 2  # part of cached file names (cached_ct): bump when the image of a seed changes
CHUNK_SLICES = 16  # slices painted at once: bounds the float32 temporaries (the noise draws follow it)
_MIB = 2**20


def ct_affine(size: int) -> np.ndarray:
    """RAS affine of LPS-stored ``size x size`` voxels of :data:`SPACING_MM`, centred in-plane."""
    affine = np.diag([-SPACING_MM[0], -SPACING_MM[1], SPACING_MM[2], 1.0])
    affine[:2, 3] = (size - 1) / 2 * SPACING_MM[0]
    return affine


class PhantomStream:
    """Case ``seed`` of ``config`` on a ``size x size x slices`` grid, painted ``chunk`` slices at a time.

    The in-plane field of view and the scan range are the ones :func:`generate_phantom`
    draws for the case, divided into ``size`` pixels and ``slices`` slices
    (:attr:`body_spacing`, in mm, is what the anatomy is painted at). Blur is exact across
    chunk borders (each chunk is painted with a margin of the blur's reach); the noise is
    drawn chunk by chunk, so it depends on ``chunk``. No liver lesion: placing one needs
    the whole liver in memory.
    """

    def __init__(self, size: int, slices: int, seed: int = 0, config: PhantomConfig | None = None,
                 chunk: int = CHUNK_SLICES):
        self.config = config or PhantomConfig.segmentation_demo()
        if self.config.task == "lesion":
            raise ConfigError("task", "lesion", "splenomegaly or hepatomegaly (a lesion needs the whole liver)")
        if size < 1 or slices < 2 or chunk < 1:
            raise ConfigError("size, slices, chunk", (size, slices, chunk), "size >= 1, slices >= 2, chunk >= 1")
        self.size, self.slices, self.chunk = int(size), int(slices), int(chunk)
        case = _draw_case(seed, self.config, None)
        geo = case.geometry
        sxy = geo["matrix"] * geo["sxy"] / self.size  # the case's field of view over `size` pixels
        sz = (geo["nz"] - 1) * geo["sz"] / (self.slices - 1)  # and its scan range over `slices` slices
        self.body_spacing = (sxy, sxy, sz)
        _, self._grid, _ = _body_grid(geo, self.size, self.slices, sxy, sz)
        self._anatomy, self._hu = case.anatomy, case.hu
        # the same draws in the same order as generate_phantom: textures, noise level, then noise
        self._texture = _draw_texture(case.texture_rng, self._grid)
        self.noise_hu = float(case.texture_rng.uniform(*self.config.noise_hu))
        self._noise_rng = case.texture_rng  # copied by every chunks() call, so each gives the same volume
        self._psf = _psf_voxels(self.body_spacing)
        self.halo = int(4.0 * self._psf[2] + 0.5)  # scipy's reach of a Gaussian along z (truncate=4)
        self.affine = ct_affine(self.size)
        self.positive = case.positive

    def chunks(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """``(image, label)`` per chunk along z: int16 HU and uint8 organ labels, ``[size, size, k]`` LPS-stored."""
        rng = copy.deepcopy(self._noise_rng)
        for z0 in range(0, self.slices, self.chunk):
            z1 = min(self.slices, z0 + self.chunk)
            lo, hi = max(0, z0 - self.halo), min(self.slices, z1 + self.halo)
            image, label = _paint(self._grid.slab(lo, hi), self._anatomy, self._hu, self._texture)
            # mode "nearest" at the volume's ends, the margin elsewhere: as if blurred whole
            image = ndimage.gaussian_filter(image, self._psf, mode="nearest")[:, :, z0 - lo:z1 - lo]
            image += self.noise_hu * _correlated_noise(rng, image.shape, self.body_spacing, self.config)
            # painted RAS (x to the patient's right, y anterior); stored LPS: both in-plane axes reversed
            yield _image_int16(image[::-1, ::-1]), np.ascontiguousarray(label[::-1, ::-1, z0 - lo:z1 - lo])


def ct_chunks(size: int, slices: int, seed: int = 0, chunk: int = CHUNK_SLICES) -> Iterator[np.ndarray]:
    """The int16 HU chunks ``[size, size, k]`` of :class:`PhantomStream` (LPS-stored, z inferior to superior)."""
    for image, _ in PhantomStream(size, slices, seed, chunk=chunk).chunks():
        yield image


def _nifti_header(dtype: type, shape: tuple[int, int, int], affine: np.ndarray):
    import nibabel as nib

    header = nib.Nifti1Header()
    header.set_data_dtype(dtype)
    header.set_data_shape(shape)
    header.set_zooms(SPACING_MM)
    header.set_qform(affine, code=1)
    header.set_sform(affine, code=1)
    header.set_xyzt_units("mm", "sec")
    header.set_data_offset(352)  # single-file NIfTI-1: 348-byte header + 4-byte extension flag
    return header


def _open_nifti(stack: contextlib.ExitStack, path: Path, header) -> BinaryIO:
    """A gzip stream, header written, into a temporary file beside ``path`` that ``stack`` renames into place."""
    tmp = stack.enter_context(atomic_path(path, suffix=".nii.gz"))
    raw = stack.enter_context(open(tmp, "wb"))
    stream = stack.enter_context(gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=1, mtime=0))
    header.write_to(stream)
    return stream


def write_ct(path: str | Path, size: int, slices: int, seed: int = 0, *, label_path: str | Path | None = None,
             config: PhantomConfig | None = None, chunk: int = CHUNK_SLICES) -> None:
    """Stream case ``seed`` into ``path`` (int16 ``.nii.gz``) chunk by chunk, labels into ``label_path`` if given.

    Both files appear atomically, when the last chunk is written.
    """
    stream = PhantomStream(size, slices, seed, config, chunk)
    shape = (stream.size, stream.size, stream.slices)
    with contextlib.ExitStack() as stack:
        image_out = _open_nifti(stack, Path(path), _nifti_header(np.int16, shape, stream.affine))
        label_out = None
        if label_path is not None:
            label_out = _open_nifti(stack, Path(label_path), _nifti_header(np.uint8, shape, stream.affine))
        for image, label in stream.chunks():
            image_out.write(image.tobytes(order="F"))  # NIfTI voxel order: x fastest, then y, then z
            if label_out is not None:
                label_out.write(label.tobytes(order="F"))


def cached_ct(folder: str | Path, size: int, slices: int, seed: int = 0, *,
              say: Callable[[str], object] | None = None) -> Path:
    """The CT of ``seed`` at this size under ``folder``, written on first use (``say`` reports the writing).

    The name holds :data:`GENERATOR_VERSION`, so a changed generator writes a new file.
    """
    tag = "" if seed == 0 else f"_seed{seed}"
    path = Path(folder) / f"ct_{size}x{size}x{slices}{tag}_v{GENERATOR_VERSION}.nii.gz"
    if not path.is_file():
        start = time.perf_counter()
        write_ct(path, size, slices, seed)
        if say is not None:
            say(f"wrote {path} ({path.stat().st_size / _MIB:.1f} MiB) in {time.perf_counter() - start:.1f} s")
    return path

"""In-plane resize of slice stacks: Gaussian anti-aliasing and linear interpolation as matrices, in chunks."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from monai.data import MetaTensor
from monai.transforms.inverse import TraceableTransform
from monai.utils import TraceKeys

from volumes.errors import ConfigError

_NEAREST_MODES = ("nearest", "nearest-exact")


def _undo_resize(img: torch.Tensor, resize_info: Mapping) -> torch.Tensor:
    """Resize back to the recorded size without tracing.

    Not ``Resize.inverse_transform``: that always anti-aliases when it shrinks,
    even for nearest-neighbour (MONAI 1.4-1.6), which blurs label maps into
    non-integer values. Nearest modes become "nearest-exact" (voxel centres
    aligned, as the affine assumes; torch's "nearest" shifts by up to half a voxel).
    Slices stay slices: only the in-plane size changes (:func:`resize_in_plane`).
    """
    mode = resize_info[TraceKeys.EXTRA_INFO]["mode"]
    nearest = mode in _NEAREST_MODES
    x, y, z = (int(v) for v in resize_info[TraceKeys.ORIG_SIZE])
    if z != img.shape[-1]:
        raise ValueError(f"cannot undo an in-plane resize: {img.shape[-1]} slices, {z} recorded")
    # in chunks of slices like the forward resize; a nearest-mode label map keeps its dtype
    # a label map comes back in NIfTI's memory order, the order it is written in
    out, _ = resize_in_plane(img, (x, y), "nearest-exact" if nearest else mode, antialias=not nearest, fortran=nearest)
    return out


# in-plane equivalents of the 3D interpolation modes (the slice axis is never resampled)
_IN_PLANE_MODES = {"trilinear": "bilinear", "bilinear": "bilinear", "bicubic": "bicubic", "area": "area",
                   "nearest": "nearest-exact", "nearest-exact": "nearest-exact"}
# slices resized per pass: bounds the float32 temporaries whatever the slice count
RESIZE_CHUNK = 32


def _gaussian_in_plane(slices: torch.Tensor, sigmas: Sequence[float], truncated: float = 4.0) -> torch.Tensor:
    """Separable Gaussian blur of ``[n, C, X, Y]`` along X and Y (edges replicated)."""
    n, c, x, y = slices.shape
    flat = slices.reshape(n * c, 1, x, y)
    for axis, sigma in enumerate(sigmas):
        if sigma <= 0:
            continue
        radius = max(1, int(math.ceil(truncated * sigma)))
        taps = torch.arange(-radius, radius + 1, dtype=torch.float32)
        kernel = torch.exp(-0.5 * (taps / sigma) ** 2)
        kernel = (kernel / kernel.sum()).to(slices.dtype)
        # one 2D convolution with a 1D kernel along X (axis 0) or Y (axis 1)
        shape, pad = ((1, 1, -1, 1), (0, 0, radius, radius)) if axis == 0 else ((1, 1, 1, -1), (radius, radius, 0, 0))
        flat = torch.nn.functional.conv2d(torch.nn.functional.pad(flat, pad, mode="replicate"), kernel.view(shape))
    return flat.reshape(n, c, x, y)


def _bilinear_matrix(size_in: int, size_out: int, sigma: float, truncated: float = 4.0) -> torch.Tensor:
    """``[size_out, size_in]`` weights of a Gaussian blur (edges replicated) followed by
    linear interpolation with ``align_corners=False``, as one matrix: resizing a slice is
    then two matrix products (fast GEMMs) instead of a convolution and a resampling."""
    scale = size_in / size_out
    source = ((torch.arange(size_out, dtype=torch.float64) + 0.5) * scale - 0.5).clamp(min=0.0)
    low = source.floor().long().clamp(max=size_in - 1)
    high = (low + 1).clamp(max=size_in - 1)
    frac = source - low
    interp = torch.zeros(size_out, size_in, dtype=torch.float64)
    rows = torch.arange(size_out)
    interp.index_put_((rows, low), 1.0 - frac, accumulate=True)
    interp.index_put_((rows, high), frac, accumulate=True)
    if sigma <= 0:
        return interp.float()
    radius = max(1, int(math.ceil(truncated * sigma)))
    taps = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (taps / sigma) ** 2)
    kernel /= kernel.sum()
    blur = torch.zeros(size_in, size_in, dtype=torch.float64)
    centres = torch.arange(size_in)
    for tap, weight in zip(taps.long(), kernel):
        blur.index_put_((centres, (centres + tap).clamp(0, size_in - 1)), weight.expand(size_in), accumulate=True)
    return (interp @ blur).float()


def resize_in_plane(img: torch.Tensor, size: Sequence[int], mode: str = "trilinear", *, antialias: bool = True,
                    chunk: int = RESIZE_CHUNK, fortran: bool = False) -> tuple[torch.Tensor, dict | None]:
    """``[C, X, Y, Z]`` -> ``[C, h, w, Z]``: every slice resized in its plane, ``chunk`` slices at a time.

    torch's ``interpolate`` on 2D slices, after MONAI's anti-aliasing when shrinking (a
    Gaussian of sigma ``(scale - 1) / 2``, edges replicated), written into one
    preallocated output, so memory beyond input and output stays at one
    chunk: MONAI's ``Resize`` smooths and interpolates the whole 3D volume at once, which
    on a 512 x 512 x 768 CT in three channels needs tens of GB. The affine follows (voxel
    centres aligned, ``align_corners=False``). Returns the image and a trace entry in the
    layout of MONAI's ``Resize`` (original size, mode) for :func:`_undo_resize`.
    With ``fortran`` the output's memory is in NIfTI's order (x fastest, one slice after
    another), so a label map is written to disk without a transposing copy.
    """
    if mode not in _IN_PLANE_MODES:
        raise ConfigError("resize mode", mode, sorted(_IN_PLANE_MODES))
    plain = img.as_tensor() if isinstance(img, MetaTensor) else img
    c, x, y, z = plain.shape
    h, w = (int(v) for v in size)
    two_d = _IN_PLANE_MODES[mode]
    nearest = two_d == "nearest-exact"
    # MONAI's anti-aliasing: a Gaussian of sigma (scale - 1) / 2 along each shrinking axis
    sigmas = [(before / after - 1.0) / 2.0 if antialias and not nearest and before > after else 0.0
              for before, after in ((x, h), (y, w))]
    dtype = plain.dtype if nearest else torch.float32
    out = torch.empty((c, z, w, h), dtype=dtype).permute(0, 3, 2, 1) if fortran else torch.empty((c, h, w, z), dtype=dtype)
    if two_d == "bilinear":
        # blur + linear interpolation as matrices: out = Wx @ slice @ Wy^T, batched over slices
        wx, wy = (_bilinear_matrix(before, after, sigma) for (before, after), sigma in zip(((x, h), (y, w)), sigmas))
        # volumes read from NIfTI keep its Fortran order (x fastest): interpolate along the
        # fastest axis first, so the large GEMM reads memory in place instead of a transposed copy
        x_fastest = plain.stride(1) < plain.stride(2)
        for start in range(0, z, chunk):
            part = plain[..., start:start + chunk].permute(3, 0, 1, 2).float()  # [n, C, X, Y]
            n = part.shape[0]
            if x_fastest:  # out^T = Wy @ slice^T @ Wx^T
                along_x = (part.transpose(2, 3).reshape(-1, x) @ wx.T).reshape(n * c, y, h)
                resized = (wy @ along_x).reshape(n, c, w, h).transpose(2, 3)
            else:
                along_y = (part.reshape(-1, y) @ wy.T).reshape(n * c, x, w)  # one large 2D GEMM first
                resized = (wx @ along_y).reshape(n, c, h, w)
            out[..., start:start + chunk] = resized.permute(1, 2, 3, 0)
        chunk_loop = range(0)
    else:
        chunk_loop = range(0, z, chunk)
    for start in chunk_loop:
        part = plain[..., start:start + chunk].permute(3, 0, 1, 2).float()  # [n, C, X, Y]
        part = _gaussian_in_plane(part, sigmas)
        kwargs = {} if nearest or two_d == "area" else {"align_corners": False}
        resized = torch.nn.functional.interpolate(part, size=(h, w), mode=two_d, **kwargs)
        out[..., start:start + chunk] = resized.permute(1, 2, 3, 0).to(out.dtype)
    if not isinstance(img, MetaTensor):
        return out, None
    scale = torch.eye(4, dtype=torch.float64)
    for axis, (before, after) in enumerate(((x, h), (y, w))):
        factor = before / after
        scale[axis, axis] = factor
        scale[axis, 3] = (factor - 1.0) / 2.0  # voxel centres stay aligned
    meta = TraceableTransform.track_transform_meta(img, affine=scale, transform_info=None)
    info = {TraceKeys.ORIG_SIZE: (x, y, z), TraceKeys.EXTRA_INFO: {"mode": mode, "align_corners": TraceKeys.NONE}}
    return MetaTensor(out).copy_meta_from(meta), info


def _permute_spatial(img: torch.Tensor, permutation: Sequence[int]) -> torch.Tensor:
    """``[C, *spatial]`` -> spatial axes reordered as ``permutation``; the affine follows.

    MONAI's ``Transpose`` leaves the affine alone, hence this helper.
    """
    out = img.permute(0, *(a + 1 for a in permutation))
    if tuple(permutation) != tuple(range(len(permutation))):
        out = out.contiguous()  # the identity (axial slices) keeps the input's memory order: no copy
    if not isinstance(img, MetaTensor):
        return out
    # output index i is input index permutation[i]: world = A_in @ P @ index_out
    axes_map = torch.zeros(4, 4, dtype=torch.float64)
    for out_axis, in_axis in enumerate(permutation):
        axes_map[in_axis, out_axis] = 1.0
    axes_map[3, 3] = 1.0
    meta = TraceableTransform.track_transform_meta(img, affine=axes_map, transform_info=None)
    return out.copy_meta_from(meta) if isinstance(out, MetaTensor) else MetaTensor(out).copy_meta_from(meta)



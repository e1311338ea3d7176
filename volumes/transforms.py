"""Intensity presets and slice preparation: from a loaded volume to encoder input.

A loaded volume is a MONAI ``MetaTensor`` ``[C, X, Y, Z]`` (usually ``C == 1``),
oriented RAS, in Hounsfield units for CT. The networks take ``[B, 3, H, W, D]``:
the last axis is the slicing axis, ``H`` and ``W`` are multiples of the encoder
patch size (14 for DINOv2, 16 for DINOv3) and the 3 channels are
ImageNet-normalised. This module gets there in two dictionary transforms,
usable as ``_target_: volumes.transforms.X`` in bundle configs:

1. :class:`IntensityPresetd` -- CT window(s) or MR normalisation to ``[0, 1]``.
2. :class:`PrepareSlicesd` -- slicing axis last, in-plane resize / pad to the
   patch grid, 3 channels, ImageNet normalisation. Its geometry is recorded in
   the MetaTensor's ``applied_operations`` so ``monai.transforms.Invertd`` takes
   a prediction on the prepared grid back to the loaded grid.

:func:`preprocessing` chains them (plus optional ``Spacingd``) with the
combination checked up front.

CT window table (level/centre, width) in HU. Values follow the common
radiology presets (e.g. Radiopaedia "Windowing (CT)"); institutions vary a little:

==============  =======  =======  ==================
name            level    width    range [lo, hi]
==============  =======  =======  ==================
soft_tissue       40      400     [-160, 240]
abdomen           50      400     [-150, 250]
liver             30      150     [-45, 105]
mediastinum       50      350     [-125, 225]
lung            -600     1500     [-1350, 150]
bone             400     1800     [-500, 1300]
brain             40       80     [0, 80]
subdural          75      215     [-32.5, 182.5]
==============  =======  =======  ==================
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.data.meta_obj import get_track_meta
from monai.transforms import (
    Compose,
    EnsureTyped,
    InvertibleTransform,
    MapTransform,
    Pad,
    Spacingd,
)
from monai.transforms.inverse import TraceableTransform
from monai.utils import TraceKeys, convert_to_dst_type, convert_to_tensor

from volumes.arrays import as_numpy
from volumes.errors import ConfigError

__all__ = [
    "CT_WINDOWS",
    "THREE_WINDOWS",
    "INTENSITY_PRESETS",
    "SLICE_AXES",
    "CHANNEL_MODES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "window_ct",
    "mr_normalize",
    "preset_channels",
    "IntensityPresetd",
    "to_three_channels",
    "imagenet_normalize",
    "slice_geometry",
    "PrepareSlicesd",
    "preprocessing",
]

# ---------------------------------------------------------------------------
# Intensity presets
# ---------------------------------------------------------------------------

#: (level, width) in HU for each named CT window; see the module docstring.
CT_WINDOWS: dict[str, tuple[float, float]] = {
    "soft_tissue": (40.0, 400.0),
    "abdomen": (50.0, 400.0),
    "liver": (30.0, 150.0),
    "mediastinum": (50.0, 350.0),
    "lung": (-600.0, 1500.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
    "subdural": (75.0, 215.0),
}

#: Windows stacked as channels 0, 1, 2 by the "ct_three_windows" preset.
THREE_WINDOWS: tuple[str, str, str] = ("soft_tissue", "lung", "bone")

#: Every preset :class:`IntensityPresetd` accepts.
INTENSITY_PRESETS: tuple[str, ...] = (*CT_WINDOWS, "ct_three_windows", "mr")

# z-scores in [-MR_Z_RANGE, MR_Z_RANGE] map linearly onto [0, 1]
MR_Z_RANGE = 3.0


def window_ct(x: np.ndarray | torch.Tensor, level: float, width: float) -> np.ndarray | torch.Tensor:
    """Clip HU values to ``[level - width/2, level + width/2]`` and scale to ``[0, 1]``.

    Args:
        x: any shape, numpy array or torch tensor (MetaTensor metadata is kept).
        level: window centre in HU.
        width: window width in HU, > 0.

    Returns:
        float32 array/tensor of the same shape and kind as ``x``.
    """
    if width <= 0:
        raise ValueError(f"window width must be > 0, got {width}")
    low = level - width / 2.0
    if isinstance(x, torch.Tensor):
        # one new tensor, then in place: no extra volume-sized temporaries
        return x.float().sub(low).div_(width).clamp_(0.0, 1.0)
    return np.clip((np.asarray(x, dtype=np.float32) - np.float32(low)) / np.float32(width), 0.0, 1.0)


def mr_normalize(
    x: np.ndarray | torch.Tensor, lower_pct: float = 0.5, upper_pct: float = 99.5
) -> np.ndarray | torch.Tensor:
    """Normalise one MR channel to roughly ``[0, 1]``.

    Steps: percentiles over the foreground (non-zero voxels, because MR
    background is 0 after skull stripping / masking and would swamp the
    statistics), clip to them, z-score with the foreground mean and std, then
    map z in ``[-3, 3]`` linearly onto ``[0, 1]`` (clipped) so MR and CT reach
    the encoder in the same range. Foreground mean ends at about 0.5, std at
    about 1/6. Background voxels stay 0 (black, like air on CT).

    Args:
        x: one channel of any shape (e.g. ``[X, Y, Z]``), numpy or torch.
        lower_pct, upper_pct: clipping percentiles in ``[0, 100]``.

    Returns:
        float32 array/tensor of the same shape and kind as ``x``. All zeros if
        ``x`` has no foreground.
    """
    if not 0.0 <= lower_pct < upper_pct <= 100.0:
        raise ValueError(f"need 0 <= lower_pct < upper_pct <= 100, got {lower_pct}, {upper_pct}")
    # numpy for the statistics: torch.quantile refuses inputs above 2**24 voxels
    values = as_numpy(x)
    values = values.astype(np.float32, copy=False)
    foreground = values != 0
    out = np.zeros_like(values, dtype=np.float32)
    if foreground.any():
        fg = values[foreground]
        low, high = np.percentile(fg, [lower_pct, upper_pct])
        fg = np.clip(fg, low, high)
        z = (fg - fg.mean()) / max(float(fg.std()), 1e-8)
        out[foreground] = np.clip((z + MR_Z_RANGE) / (2 * MR_Z_RANGE), 0.0, 1.0)
    if isinstance(x, torch.Tensor):
        return convert_to_dst_type(out, x, dtype=torch.float32)[0]
    return out


def preset_channels(preset: str) -> int:
    """Channels per input channel that ``preset`` produces (3 for "ct_three_windows", else 1)."""
    _check_choice("preset", preset, INTENSITY_PRESETS)
    return 3 if preset == "ct_three_windows" else 1


class IntensityPresetd(MapTransform):
    """Map raw intensities of ``keys`` to ``[0, 1]`` with a named preset.

    - a CT window name (see :data:`CT_WINDOWS`): ``[C, ...]`` HU -> ``[C, ...]``.
    - ``"ct_three_windows"``: ``[1, ...]`` HU -> ``[3, ...]``, one channel per
      window of :data:`THREE_WINDOWS` (soft tissue, lung, bone), in that order.
    - ``"mr"``: ``[C, ...]`` -> ``[C, ...]``, :func:`mr_normalize` per channel.

    Not invertible (intensity only); MetaTensor metadata and the
    ``applied_operations`` stack pass through unchanged.
    """

    def __init__(self, keys: KeysCollection, preset: str = "soft_tissue", allow_missing_keys: bool = False) -> None:
        _check_choice("preset", preset, INTENSITY_PRESETS)
        super().__init__(keys, allow_missing_keys)
        self.preset = preset

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.apply(d[key])
        return d

    def apply(self, img: Any) -> torch.Tensor:
        """``[C, X, Y, Z]`` raw -> ``[C or 3, X, Y, Z]`` float32 in ``[0, 1]``."""
        img = convert_to_tensor(img, track_meta=get_track_meta())
        if self.preset in CT_WINDOWS:
            return window_ct(img, *CT_WINDOWS[self.preset])
        if self.preset == "ct_three_windows":
            if img.shape[0] != 1:
                raise ValueError(f"preset 'ct_three_windows' needs a 1-channel CT volume, got shape {tuple(img.shape)}")
            plain = (img.as_tensor() if isinstance(img, MetaTensor) else img).float()
            stacked = torch.empty((len(THREE_WINDOWS), *plain.shape[1:]), dtype=torch.float32)
            for channel, name in enumerate(THREE_WINDOWS):  # filled in place: no list of copies to concatenate
                level, width = CT_WINDOWS[name]
                torch.sub(plain[0], level - width / 2.0, out=stacked[channel])
                stacked[channel].div_(width).clamp_(0.0, 1.0)
            return _with_meta_of(stacked, img)
        plain = img.as_tensor() if isinstance(img, MetaTensor) else img
        channels = [mr_normalize(channel) for channel in plain]
        return _with_meta_of(torch.stack(channels, dim=0), img)


# ---------------------------------------------------------------------------
# Slice preparation
# ---------------------------------------------------------------------------

#: Spatial axis (of ``[X, Y, Z]``, RAS) normal to each slice orientation.
SLICE_AXES: dict[str, int] = {"sagittal": 0, "coronal": 1, "axial": 2}

#: How a volume becomes the 3 channels the 2D encoder expects.
CHANNEL_MODES: tuple[str, ...] = ("repeat", "2.5d", "windows")

_NEAREST_MODES = ("nearest", "nearest-exact")

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


def to_three_channels(x: torch.Tensor, mode: str) -> torch.Tensor:
    """Make the 3 encoder channels of a channel-first volume ``[C, H, W, D]``.

    - ``"repeat"``: ``C == 1``; the channel repeated 3 times.
    - ``"2.5d"``: ``C == 1``; channels are slices ``k-1, k, k+1`` along the last
      axis, the first and last slice replicated at the ends, so each 2D slice
      sees its neighbours.
    - ``"windows"``: ``C == 3`` already (the "ct_three_windows" preset); unchanged.

    Returns ``[3, H, W, D]``; MetaTensor metadata is kept.
    """
    _check_choice("channel_mode", mode, CHANNEL_MODES)
    channels = x.shape[0]
    if mode == "windows":
        if channels != 3:
            raise ValueError(
                f"channel_mode 'windows' needs 3 channels (preset 'ct_three_windows'), got shape {tuple(x.shape)}"
            )
        return x
    if channels != 1:
        raise ValueError(f"channel_mode {mode!r} needs a 1-channel volume [1, H, W, D], got shape {tuple(x.shape)}")
    plain = x.as_tensor() if isinstance(x, MetaTensor) else x
    if mode == "repeat":
        out = plain.expand(3, *plain.shape[1:]).clone()
    else:
        depth = plain.shape[-1]
        index = torch.arange(depth, device=plain.device)
        previous = plain.index_select(-1, (index - 1).clamp(min=0))
        following = plain.index_select(-1, (index + 1).clamp(max=depth - 1))
        out = torch.cat([previous, plain, following], dim=0)
    return _with_meta_of(out, x) if isinstance(x, MetaTensor) else out


def imagenet_normalize(x: torch.Tensor, channel_dim: int = 0, *, inplace: bool = False) -> torch.Tensor:
    """``(x - mean) / std`` per channel with the ImageNet statistics.

    Args:
        x: values in ``[0, 1]`` with 3 channels at ``channel_dim`` (0 for
            ``[3, H, W, D]``, 1 for ``[B, 3, H, W, D]`` or ``[N, 3, H, W]``).
        inplace: overwrite ``x`` (a float tensor nobody else holds) instead of making
            two temporaries of its size.
    """
    if x.shape[channel_dim] != 3:
        raise ValueError(f"ImageNet normalisation needs 3 channels at dim {channel_dim}, got shape {tuple(x.shape)}")
    shape = [1] * x.ndim
    shape[channel_dim] = 3
    mean = torch.tensor(IMAGENET_MEAN, dtype=x.dtype, device=x.device).reshape(shape)
    std = torch.tensor(IMAGENET_STD, dtype=x.dtype, device=x.device).reshape(shape)
    if inplace:
        return x.sub_(mean).div_(std)
    return (x - mean) / std


def _shares_memory(a: torch.Tensor, b: Any) -> bool:
    """Whether ``a`` may be a view of ``b`` (a tensor or numpy array): then ``a`` must not be written."""
    if isinstance(b, torch.Tensor):
        return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
    if isinstance(b, np.ndarray) and a.device.type == "cpu":
        plain = a.as_tensor() if isinstance(a, MetaTensor) else a
        return bool(np.may_share_memory(plain.detach().numpy(), b))
    return False


def slice_geometry(
    in_plane_shape: Sequence[int], patch_size: int, size: int | None = None
) -> tuple[tuple[int, int], tuple[int, int], tuple[tuple[int, int], tuple[int, int]]]:
    """In-plane geometry of :class:`PrepareSlicesd` for one slice shape ``(H, W)``.

    With ``size`` the slice is resized, aspect ratio kept, so its longer side is
    ``size``; with ``size=None`` it keeps its scale. Both sides are then padded
    symmetrically (the extra voxel at the end) to the next multiple of ``patch_size``.

    Returns:
        ``(resized_shape, padded_shape, pad)`` with ``pad = ((before_H, after_H), (before_W, after_W))``.

    Example: ``slice_geometry((100, 80), 14)`` -> ``((100, 80), (112, 84), ((6, 6), (2, 2)))``.
    """
    if len(in_plane_shape) != 2 or min(in_plane_shape) < 1:
        raise ValueError(f"in_plane_shape must be two positive sizes (H, W), got {tuple(in_plane_shape)}")
    _check_positive("patch_size", patch_size)
    height, width = (int(s) for s in in_plane_shape)
    if size is None:
        resized = (height, width)
    else:
        _check_positive("size", size)
        scale = size / max(height, width)
        resized = (max(1, round(height * scale)), max(1, round(width * scale)))
    padded = tuple(-(-s // patch_size) * patch_size for s in resized)
    pad = tuple(((p - s) // 2, (p - s) - (p - s) // 2) for s, p in zip(resized, padded))
    return resized, padded, pad  # type: ignore[return-value]


class PrepareSlicesd(MapTransform, InvertibleTransform):
    """Turn ``[C, X, Y, Z]`` volumes into encoder-ready ``[3, H, W, D]`` slice stacks.

    Per key: (1) move the slicing axis last (the other two keep their order:
    sagittal -> ``[C, Y, Z, X]``, coronal -> ``[C, X, Z, Y]``, axial unchanged)
    with the affine updated; (2) if ``size`` is set, resize in-plane so the
    longer side is ``size``, aspect ratio kept; (3) pad both in-plane sides
    symmetrically to multiples of ``patch_size`` with the image's minimum (0 for
    windowed input); see :func:`slice_geometry`. Image keys then get
    (4) :func:`to_three_channels` with ``channel_mode`` and (5)
    :func:`imagenet_normalize`. ``label_keys`` get (1)-(3) only, with
    nearest-neighbour resizing and zero padding.

    Steps (1)-(3) are recorded as one entry in ``applied_operations``, so
    ``Invertd(keys="pred", orig_keys="image", transform=<this or a Compose
    containing it>, nearest_interp=True)`` maps a prediction ``[K, H, W, D]``
    back to ``[K, X, Y, Z]`` with the loaded affine. Not lazy-capable.

    Args:
        keys: image keys (values in ``[0, 1]`` from :class:`IntensityPresetd`, or raw with ``preset``).
        axis: "sagittal", "coronal" or "axial" (see :data:`SLICE_AXES`; assumes RAS).
        channel_mode: "repeat", "2.5d" or "windows" (see :func:`to_three_channels`).
        patch_size: encoder patch size (14 DINOv2, 16 DINOv3).
        size: target longer in-plane side, or None to keep the scale and only pad.
        label_keys: keys resampled on the same grid without intensity changes.
        image_mode: interpolation for image keys when resizing.
        preset: an intensity preset (:class:`IntensityPresetd`) applied to image keys
            after (1)-(3), on the resized slices instead of the full-resolution volume.
            For CT windows, which act voxel by voxel, this gives the same result up to
            interpolation at window edges, and the three-window preset never makes a
            three-channel copy of a 512 x 512 x N volume. None: the input is already
            in ``[0, 1]``.
        anti_aliasing: Gaussian pre-filter when shrinking image keys.
        allow_missing_keys: skip keys that are absent.
    """

    def __init__(
        self,
        keys: KeysCollection,
        axis: str = "axial",
        channel_mode: str = "repeat",
        patch_size: int = 14,
        size: int | None = None,
        label_keys: KeysCollection = (),
        image_mode: str = "trilinear",
        anti_aliasing: bool = True,
        preset: str | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        _check_choice("axis", axis, tuple(SLICE_AXES))
        _check_choice("channel_mode", channel_mode, CHANNEL_MODES)
        _check_positive("patch_size", patch_size)
        if size is not None:
            _check_positive("size", size)
        image_keys = tuple(keys) if isinstance(keys, (list, tuple)) else (keys,)
        self.label_keys = tuple(label_keys) if isinstance(label_keys, (list, tuple)) else (label_keys,)
        super().__init__((*image_keys, *self.label_keys), allow_missing_keys)
        self.axis = axis
        self.channel_mode = channel_mode
        self.patch_size = int(patch_size)
        self.size = None if size is None else int(size)
        self.image_mode = image_mode
        self.anti_aliasing = anti_aliasing
        self.intensity = None if preset is None else IntensityPresetd(image_keys, preset=preset)
        # one shared Pad instance so its own inverse() recognises the entries it recorded
        self._pad = Pad()

    @property
    def permutation(self) -> tuple[int, int, int]:
        """Spatial axes of the input in output order (the slicing axis last)."""
        slicing = SLICE_AXES[self.axis]
        return (*(a for a in range(3) if a != slicing), slicing)  # type: ignore[return-value]

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            is_label = key in self.label_keys
            img = self._geometry(d[key], is_label)
            if not is_label and not torch.is_floating_point(img):
                # a volume loaded as stored (int16 CT): float from here, on the resized slices
                img = img.float()
            if not is_label:
                if self.intensity is not None:
                    img = self.intensity.apply(img)
                img = to_three_channels(img, self.channel_mode)
                # in place on our own new tensor (never on the caller's volume, which a
                # view could share): a 768-slice CT at 112 px saves two 110 MiB temporaries
                img = imagenet_normalize(img, inplace=not _shares_memory(img, d[key]))
            d[key] = img
        return d

    def _geometry(self, img: Any, is_label: bool) -> torch.Tensor:
        """Steps (1)-(3) on ``[C, X, Y, Z]``; records one invertible entry."""
        img = convert_to_tensor(img, track_meta=get_track_meta())
        if img.ndim != 4:
            raise ValueError(f"PrepareSlicesd needs channel-first 3D volumes [C, X, Y, Z], got shape {tuple(img.shape)}")
        orig_size = tuple(int(s) for s in img.shape[1:])
        out = _permute_spatial(img, self.permutation)
        resized, _, pad = slice_geometry(out.shape[1:3], self.patch_size, self.size)
        resize_info = None
        if resized != tuple(out.shape[1:3]):
            mode = "nearest-exact" if is_label else self.image_mode
            out, resize_info = resize_in_plane(out, resized, mode, antialias=self.anti_aliasing and not is_label)
        # pad value = image minimum, so the border looks like the darkest tissue (0 after windowing)
        value = 0.0 if is_label or out.numel() == 0 else float(out.min())
        out = self._pad(out, to_pad=((0, 0), *pad, (0, 0)), value=value)
        pad_info = self._pop_inner(out)
        if isinstance(out, MetaTensor) and get_track_meta():
            # one entry for all steps (like MONAI's ResizeWithPadOrCrop), so a Compose sees one transform
            extra = {"permutation": list(self.permutation), "resize": resize_info, "pad": pad_info}
            self.push_transform(out, orig_size=orig_size, extra_info=extra)
        return out

    @staticmethod
    def _pop_inner(img: torch.Tensor) -> dict | None:
        if isinstance(img, MetaTensor) and get_track_meta() and img.applied_operations:
            return img.applied_operations.pop()
        return None

    def inverse(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Undo steps (1)-(3) for every present key: ``[K, H, W, D]`` -> ``[K, X, Y, Z]``."""
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            transform = self.pop_transform(img)
            extra = transform[TraceKeys.EXTRA_INFO]
            if extra["pad"] is not None:
                img.applied_operations.append(extra["pad"])
                img = self._pad.inverse(img)
            if extra["resize"] is not None:
                img = _undo_resize(img, extra["resize"])
            d[key] = _permute_spatial(img, tuple(int(a) for a in np.argsort(extra["permutation"])))
        return d


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


# ---------------------------------------------------------------------------
# Convenience factory
# ---------------------------------------------------------------------------


def preprocessing(
    keys: KeysCollection = ("image",),
    label_keys: KeysCollection = (),
    *,
    preset: str = "soft_tissue",
    axis: str = "axial",
    channel_mode: str = "repeat",
    patch_size: int = 14,
    size: int | None = None,
    spacing: Sequence[float] | float | None = None,
) -> Compose:
    """Loaded volumes -> encoder input: ``[Spacingd] -> PrepareSlicesd (with the CT window) -> EnsureTyped``.

    CT presets are applied inside :class:`PrepareSlicesd`, after the in-plane resize, so
    memory stays near the volume's own size; the MR preset runs first, as
    ``[Spacingd] -> IntensityPresetd -> PrepareSlicesd -> EnsureTyped``.

    Assumes the dict already holds loaded, RAS-oriented MetaTensors
    ``[C, X, Y, Z]``. The result is invertible with ``Invertd`` (Spacingd and
    PrepareSlicesd are undone; intensities are not).

    Raises:
        ConfigError: an unknown preset/axis/channel_mode, or a channel_mode that
            does not fit the preset ("windows" needs "ct_three_windows";
            "repeat"/"2.5d" need a 1-channel preset).
    """
    _check_choice("preset", preset, INTENSITY_PRESETS)
    _check_choice("channel_mode", channel_mode, CHANNEL_MODES)
    fitting = ["windows"] if preset_channels(preset) == 3 else ["repeat", "2.5d"]
    if channel_mode not in fitting:
        raise ConfigError("channel_mode", channel_mode, f"{fitting} with preset={preset!r}")
    image_keys = tuple(keys) if isinstance(keys, (list, tuple)) else (keys,)
    labels = tuple(label_keys) if isinstance(label_keys, (list, tuple)) else (label_keys,)
    steps: list = []
    if spacing is not None:
        modes = ("bilinear",) * len(image_keys) + ("nearest",) * len(labels)
        steps.append(Spacingd((*image_keys, *labels), pixdim=spacing, mode=modes))
    if preset in CT_WINDOWS or preset == "ct_three_windows":
        # CT windows act voxel by voxel: window the resized slices, not the full volume
        steps.append(PrepareSlicesd(image_keys, axis=axis, channel_mode=channel_mode, patch_size=patch_size,
                                    size=size, label_keys=labels, preset=preset))
    else:
        # MR normalisation uses the volume's percentiles: before the padding adds voxels
        steps += [
            IntensityPresetd(image_keys, preset=preset),
            PrepareSlicesd(image_keys, axis=axis, channel_mode=channel_mode, patch_size=patch_size, size=size,
                           label_keys=labels),
        ]
    steps.append(EnsureTyped((*image_keys, *labels), dtype=None))
    return Compose(steps)


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


def _check_choice(key: str, value: object, allowed: Sequence[object]) -> None:
    if value not in allowed:
        raise ConfigError(key, value, list(allowed))


def _check_positive(key: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ConfigError(key, value, "positive integers")


def _with_meta_of(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``values`` as the same kind as ``like``, carrying its metadata and applied operations."""
    if isinstance(like, MetaTensor):
        return MetaTensor(values).copy_meta_from(like)
    return values

"""Slice preparation: slicing axis last, the patch grid, 3 channels, ImageNet normalisation (:class:`PrepareSlicesd`)."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.data.meta_obj import get_track_meta
from monai.transforms import (
    InvertibleTransform,
    MapTransform,
    Pad,
)
from monai.utils import TraceKeys, convert_to_tensor

from volumes.transforms._checks import _check_choice, _check_positive, _with_meta_of
from volumes.transforms.intensity import IntensityPresetd
from volumes.transforms.resize import _permute_spatial, _undo_resize, resize_in_plane


#: Spatial axis (of ``[X, Y, Z]``, RAS) normal to each slice orientation.
SLICE_AXES: dict[str, int] = {"sagittal": 0, "coronal": 1, "axial": 2}

#: How a volume becomes the 3 channels the 2D encoder expects.
CHANNEL_MODES: tuple[str, ...] = ("repeat", "2.5d", "windows")


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

    def geometry(self, img: Any) -> torch.Tensor:
        """Steps (1)-(3) alone on an image ``[C, X, Y, Z]``: the slice grid, intensities unchanged.

        For callers that render the slices themselves (:mod:`volumes.pretrain.data` varies the
        CT windows per view).
        """
        return self._geometry(img, False)

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



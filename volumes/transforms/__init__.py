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

The CT window table is in :mod:`volumes.transforms.intensity`.
"""

from __future__ import annotations

from collections.abc import Sequence

from monai.config import KeysCollection
from monai.transforms import Compose, EnsureTyped, Spacingd

from volumes.errors import ConfigError
from volumes.transforms._checks import _check_choice
from volumes.transforms.intensity import (
    CT_WINDOWS,
    INTENSITY_PRESETS,
    MR_Z_RANGE,
    THREE_WINDOWS,
    WINDOW_SETS,
    IntensityPresetd,
    mr_normalize,
    preset_channels,
    window_ct,
)
from volumes.transforms.resize import resize_in_plane
from volumes.transforms.slices import (
    CHANNEL_MODES,
    IMAGENET_MEAN,
    IMAGENET_STD,
    SLICE_AXES,
    PrepareSlicesd,
    imagenet_normalize,
    slice_geometry,
    to_three_channels,
)


__all__ = [
    "CT_WINDOWS",
    "THREE_WINDOWS",
    "WINDOW_SETS",
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
    "resize_in_plane",
    "MR_Z_RANGE",
]


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
    modality: str | None = None,
) -> Compose:
    """Loaded volumes -> encoder input: ``[Spacingd] -> PrepareSlicesd (with the CT window) -> EnsureTyped``.

    CT presets are applied inside :class:`PrepareSlicesd`, after the in-plane resize, so
    memory stays near the volume's own size; the MR preset runs first, as
    ``[Spacingd] -> IntensityPresetd -> PrepareSlicesd -> EnsureTyped``.

    ``preset="auto"`` prepares each volume by its own modality
    (:class:`volumes.transforms.modality.ByModalityd`: CT three windows for CT, MR
    normalisation repeated to three channels for MR; ``channel_mode`` is then chosen
    per modality and must be left at ``"auto"`` or ``"repeat"``). ``modality`` is the
    default for volumes that carry none (NIfTI without a datalist ``modality`` field).
    A value of ``spacing`` that is 0 or negative keeps that axis's own spacing (e.g.
    ``[1.5, 1.5, 0]`` resamples in-plane only).

    Assumes the dict already holds loaded, RAS-oriented MetaTensors
    ``[C, X, Y, Z]``. The result is invertible with ``Invertd`` (Spacingd and
    PrepareSlicesd are undone; intensities are not).

    Raises:
        ConfigError: an unknown preset/axis/channel_mode, or a channel_mode that
            does not fit the preset ("windows" needs "ct_three_windows";
            "repeat"/"2.5d" need a 1-channel preset).
    """
    image_keys = tuple(keys) if isinstance(keys, (list, tuple)) else (keys,)
    labels = tuple(label_keys) if isinstance(label_keys, (list, tuple)) else (label_keys,)
    steps: list = []
    if spacing is not None:
        modes = ("bilinear",) * len(image_keys) + ("nearest",) * len(labels)
        steps.append(Spacingd((*image_keys, *labels), pixdim=spacing, mode=modes))
    common = dict(axis=axis, patch_size=patch_size, size=size)
    if preset == "auto":
        from volumes.transforms.modality import MODALITY_PREPARATION, ByModalityd

        _check_choice("channel_mode", channel_mode, ["auto", "repeat"])
        pipelines = {name: Compose(_prepare_steps(image_keys, labels, preset=kind, channel_mode=mode, **common))
                     for name, (kind, mode) in MODALITY_PREPARATION.items()}
        steps.append(ByModalityd((*image_keys, *labels), pipelines, image_key=image_keys[0], default=modality))
    else:
        steps += _prepare_steps(image_keys, labels, preset=preset, channel_mode=channel_mode, **common)
    steps.append(EnsureTyped((*image_keys, *labels), dtype=None))
    return Compose(steps)


def _prepare_steps(image_keys: tuple, labels: tuple, *, preset: str, axis: str, channel_mode: str,
                   patch_size: int, size: int | None) -> list:
    """The intensity and slice steps of one preset (see :func:`preprocessing`)."""
    _check_choice("preset", preset, INTENSITY_PRESETS)
    _check_choice("channel_mode", channel_mode, CHANNEL_MODES)
    fitting = ["windows"] if preset_channels(preset) == 3 else ["repeat", "2.5d"]
    if channel_mode not in fitting:
        raise ConfigError("channel_mode", channel_mode, f"{fitting} with preset={preset!r}")
    if preset in CT_WINDOWS or preset in WINDOW_SETS:
        # CT windows act voxel by voxel: window the resized slices, not the full volume
        return [PrepareSlicesd(image_keys, axis=axis, channel_mode=channel_mode, patch_size=patch_size,
                               size=size, label_keys=labels, preset=preset)]
    # MR normalisation uses the volume's percentiles: before the padding adds voxels
    return [
        IntensityPresetd(image_keys, preset=preset),
        PrepareSlicesd(image_keys, axis=axis, channel_mode=channel_mode, patch_size=patch_size, size=size,
                       label_keys=labels),
    ]

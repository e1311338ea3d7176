"""Intensity presets: CT windows and MR normalisation to ``[0, 1]`` (:class:`IntensityPresetd`).

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

from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.data.meta_obj import get_track_meta
from monai.transforms import (
    MapTransform,
)
from monai.utils import convert_to_dst_type, convert_to_tensor

from volumes.arrays import as_numpy

from volumes.transforms._checks import _check_choice, _with_meta_of

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

#: Presets that stack three CT windows as channels, and their windows in channel order.
#: "ct_abdomen_windows" swaps the lung window for the narrow liver window, for abdominal
#: tasks where parenchyma contrast matters (the demo's hepatomegaly classifier and organ
#: segmenter share it, so one encoder pass serves both).
WINDOW_SETS: dict[str, tuple[str, str, str]] = {
    "ct_three_windows": THREE_WINDOWS,
    "ct_abdomen_windows": ("liver", "soft_tissue", "bone"),
}

#: Every preset :class:`IntensityPresetd` accepts.
INTENSITY_PRESETS: tuple[str, ...] = (*CT_WINDOWS, *WINDOW_SETS, "mr")

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
    """Channels per input channel that ``preset`` produces (3 for a window set such as "ct_three_windows", else 1)."""
    _check_choice("preset", preset, INTENSITY_PRESETS)
    return 3 if preset in WINDOW_SETS else 1


class IntensityPresetd(MapTransform):
    """Map raw intensities of ``keys`` to ``[0, 1]`` with a named preset.

    - a CT window name (see :data:`CT_WINDOWS`): ``[C, ...]`` HU -> ``[C, ...]``.
    - ``"ct_three_windows"``: ``[1, ...]`` HU -> ``[3, ...]``, one channel per
      window of :data:`THREE_WINDOWS` (soft tissue, lung, bone), in that order; the other
      :data:`WINDOW_SETS` likewise (``"ct_abdomen_windows"``: liver, soft tissue, bone).
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
        if self.preset in WINDOW_SETS:
            if img.shape[0] != 1:
                raise ValueError(f"preset {self.preset!r} needs a 1-channel CT volume, got shape {tuple(img.shape)}")
            plain = (img.as_tensor() if isinstance(img, MetaTensor) else img).float()
            windows = WINDOW_SETS[self.preset]
            stacked = torch.empty((len(windows), *plain.shape[1:]), dtype=torch.float32)
            for channel, name in enumerate(windows):  # filled in place: no list of copies to concatenate
                level, width = CT_WINDOWS[name]
                torch.sub(plain[0], level - width / 2.0, out=stacked[channel])
                stacked[channel].div_(width).clamp_(0.0, 1.0)
            return _with_meta_of(stacked, img)
        plain = img.as_tensor() if isinstance(img, MetaTensor) else img
        channels = [mr_normalize(channel) for channel in plain]
        return _with_meta_of(torch.stack(channels, dim=0), img)



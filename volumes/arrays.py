"""Array conversions shared by every module (light: numpy only, torch by duck typing)."""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["as_numpy"]


def as_numpy(value: Any) -> np.ndarray:
    """A numpy array of a numpy array, a sequence, or a (CPU/GPU, Meta) torch tensor.

    No copy for a numpy array or a CPU tensor (the result shares its memory): copy before
    writing to it. Tensors are recognised by ``.detach``, so ``torch`` is not imported.
    """
    if hasattr(value, "detach"):
        return value.detach().cpu().numpy()
    return np.asarray(value)


def spacing_mm(affine: Any) -> list[float]:
    """Voxel spacing ``[sx, sy, sz]`` in mm of a 4x4 affine (MONAI's ``affine_to_spacing``)."""
    from monai.data.utils import affine_to_spacing

    return [float(s) for s in affine_to_spacing(np.asarray(as_numpy(affine), dtype=np.float64), r=3)]

"""Argument checks and metadata helpers shared by the transform modules."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from monai.data import MetaTensor

from volumes.errors import ConfigError




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

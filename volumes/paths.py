"""Where the bundles and the optional real data are looked up, in one place.

Bundles, in order: ``$VOLUMES_BUNDLES``; ``bundles/`` of the checkout this package runs
from (a clone or an editable install); ``<prefix>/share/volumes/bundles`` (where a wheel
installs them). Real data: ``$VOLUMES_SHARED_DATA``, else ``../shared/data`` beside the
checkout (present for developers and CI, absent for a fresh user).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from volumes.errors import VolumesError

__all__ = ["CHECKOUT", "bundle_dir", "bundles_dir", "shared_data_dir"]

CHECKOUT = Path(__file__).resolve().parents[1]
"""The folder above the package: the repository root when running from a clone."""


def _bundle_candidates() -> list[Path]:
    candidates = [Path(p) for p in [os.environ.get("VOLUMES_BUNDLES")] if p]
    return candidates + [CHECKOUT / "bundles", Path(sys.prefix) / "share" / "volumes" / "bundles"]


def bundles_dir() -> Path:
    """The folder holding the shipped bundles (see the module docstring for the order)."""
    for candidate in _bundle_candidates():
        if (candidate / "dinov2_unet_segmentation" / "configs").is_dir():
            return candidate
    looked = ", ".join(str(c) for c in _bundle_candidates())
    raise VolumesError(f"the volumes bundles were not found (looked in {looked}); set VOLUMES_BUNDLES to the "
                       "bundles/ folder of a volumes checkout")


def bundle_dir(name: str) -> Path:
    """One shipped bundle, e.g. ``bundle_dir("dinov2_unet_segmentation")``."""
    path = bundles_dir() / name
    if not (path / "configs").is_dir():
        raise VolumesError(f"{path}: no such bundle")
    return path


def shared_data_dir() -> Path:
    """``../shared/data`` beside the checkout (or ``$VOLUMES_SHARED_DATA``); may not exist."""
    return Path(os.environ.get("VOLUMES_SHARED_DATA") or CHECKOUT.parent / "shared" / "data")

"""Reading volumes, checking DICOM series and discovering cases.

Names are re-exported lazily so ``import volumes.data`` stays light (MONAI,
SimpleITK and pydicom load on first use).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "load_volume": "volumes.data.io",
    "load_label": "volumes.data.io",
    "check_label_matches": "volumes.data.io",
    "LoadVolumed": "volumes.data.io",
    "write_dicom_series": "volumes.data.dicom",
    "check_dicom_series": "volumes.data.dicom",
    "split_series": "volumes.data.dicom",
    "Case": "volumes.data.discovery",
    "discover_cases": "volumes.data.discovery",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'volumes.data' has no attribute {name!r}")

"""Import heavy optional packages where they are used, with a clear message."""

from __future__ import annotations

import importlib
from types import ModuleType

# module name -> the pip extra of volumes that installs it
_EXTRA_FOR = {
    "itk": "core (pip install itk)",
    "torch_geometric": "core (pip install torch_geometric)",
    "peft": "peft",
    "lightly": "pretrain",
    "maxflow": "interactive",
    "highdicom": "dicom",
    "pydicom": "dicom",
    "transformers": "dev",
    "matplotlib": "dev",
    "sklearn": "dev",
}


def require(module: str, purpose: str = "") -> ModuleType:
    """Import ``module`` or raise an ImportError that says how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        extra = _EXTRA_FOR.get(module.split(".")[0], "")
        how = f"pip install 'volumes[{extra}]'" if extra and not extra.startswith("core") else f"pip install {module.split('.')[0]}"
        need = f" for {purpose}" if purpose else ""
        raise ImportError(f"volumes needs the optional package '{module}'{need}; install it with: {how}") from exc

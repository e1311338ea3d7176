"""Copies of the bundles with settings written in, and training one: the steps the demo and the results scripts share."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from volumes.paths import bundle_dir


def copy_bundle(name: str, target: Path, settings: dict[str, Any]) -> Path:
    """Copy a bundle (configs, docs) to ``target`` and write ``settings`` into all its configs.

    :func:`volumes.bundle.write_derived_bundle` on the installed bundle, after removing
    the configs of an earlier copy.
    """
    from volumes.bundle import write_derived_bundle

    if (target / "configs").is_dir():
        shutil.rmtree(target / "configs")
    return write_derived_bundle(bundle_dir(name), target, settings)


def train_bundle(bundle: Path) -> None:
    """``python -m monai.bundle run --config_file configs/train.json`` on the bundle copy."""
    from monai.bundle import run

    configs = bundle / "configs"
    run(config_file=str(configs / "train.json"), meta_file=str(configs / "metadata.json"),
        logging_file=str(configs / "logging.conf"), bundle_root=str(bundle))

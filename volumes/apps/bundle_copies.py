"""Copies of the bundles with settings written in, and training one: the steps the demo and the results scripts share."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from volumes.paths import bundle_dir


def _set(config: dict, key: str, value: Any) -> None:
    """``config[key] = value`` with MONAI's ``a#b`` paths."""
    *parents, last = key.split("#")
    for part in parents:
        config = config[part]
    config[last] = value


def copy_bundle(name: str, target: Path, settings: dict[str, Any]) -> Path:
    """Copy a bundle (configs, docs) to ``target`` and write ``settings`` into all its configs."""
    if (target / "configs").is_dir():
        shutil.rmtree(target / "configs")
    shutil.copytree(bundle_dir(name), target, dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("models", "data", "eval", "cache", "runs"))
    for config_file in (target / "configs").glob("*.json"):
        config = json.loads(config_file.read_text())
        for key, value in settings.items():
            if key.split("#")[0] in config:
                _set(config, key, value)
        config_file.write_text(json.dumps(config, indent=4) + "\n")
    return target


def train_bundle(bundle: Path) -> None:
    """``python -m monai.bundle run --config_file configs/train.json`` on the bundle copy."""
    from monai.bundle import run

    configs = bundle / "configs"
    run(config_file=str(configs / "train.json"), meta_file=str(configs / "metadata.json"),
        logging_file=str(configs / "logging.conf"), bundle_root=str(bundle))

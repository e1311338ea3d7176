"""A MONAI bundle as a model for batch inference: its predictor, identity and weights hash."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from volumes.errors import VolumesError, volumes_error_in
from volumes.hashing import sha256_files

__all__ = ["BundleModel", "load_bundle"]


@dataclass
class BundleModel:
    """One bundle, ready to predict.

    Attributes:
        bundle_id: short name, used in output file names (``bundle_id`` in inference.json).
        version: the bundle's version (``metadata.json``).
        predictor: :class:`~volumes.inference.predictors.SegmentationPredictor` or
            :class:`~volumes.inference.predictors.ClassificationPredictor`.
        weights: the checkpoint the network was loaded from.
        settings: the configuration values that change the outputs (encoder, preprocessing...);
            part of :attr:`model_key`, so ``--resume`` redoes cases when they change.
    """

    bundle_id: str
    version: str
    predictor: Any
    weights: str | Path
    settings: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not Path(self.weights).is_file():
            raise FileNotFoundError(f"{self.weights}: checkpoint of bundle {self.bundle_id} not found")

    @property
    def task(self) -> str:
        return self.predictor.task

    @cached_property
    def weights_sha256(self) -> str:
        return sha256_files(self.weights)

    @cached_property
    def fitted_sha256(self) -> str | None:
        """Hash of what training fitted beside the weights and the predictor reads (the classifier's
        temperature, the segmenter's quality-control reference); None when there is none."""
        files = list(getattr(self.predictor, "fitted_files", []) or [])
        return sha256_files(files) if files else None

    @cached_property
    def model_key(self) -> str:
        """Identity of everything that decides this bundle's outputs (version, weights, fitted files, settings)."""
        identity = {"bundle": self.bundle_id, "version": self.version, "weights": self.weights_sha256,
                    "settings": self.settings}
        if self.fitted_sha256 is not None:
            identity["fitted"] = self.fitted_sha256
        content = json.dumps(
            identity,
            sort_keys=True, default=str,
        )
        return hashlib.sha256(content.encode()).hexdigest()


def load_bundle(root: str | Path, *, device: Any = "cpu", weights: str | Path | None = None,
                overrides: dict[str, Any] | None = None) -> BundleModel:
    """Parse ``root/configs/inference.json`` (with ``metadata.json``) and build its ``model``.

    The same config section the bundle's own ``python -m monai.bundle run`` uses, so both
    paths share one implementation. ``weights`` replaces ``ckpt_path``; ``overrides``
    sets other config keys.

    Raises:
        VolumesError: ``root`` is not a bundle with an inference config.
    """
    from monai.bundle import ConfigParser

    root = Path(root)
    config = root / "configs" / "inference.json"
    meta = root / "configs" / "metadata.json"
    for path in (config, meta):
        if not path.is_file():
            raise VolumesError(f"{root}: not a MONAI bundle with an inference config ({path.relative_to(root)} is missing)")
    parser = ConfigParser()
    parser.read_meta(str(meta))
    parser.read_config(str(config))
    if "model" not in parser.get():
        raise VolumesError(f"{config}: has no 'model' entry (volumes.inference.BundleModel)")
    parser["bundle_root"] = str(root)
    parser["device"] = device
    if weights is not None:
        parser["ckpt_path"] = str(weights)
    for key, value in (overrides or {}).items():
        parser[key] = value
    try:
        return parser.get_parsed_content("model")
    except Exception as exc:  # monai.bundle wraps errors in RuntimeError: surface ours (path and problem)
        cause = volumes_error_in(exc)
        if cause is None:
            raise
        raise cause from exc

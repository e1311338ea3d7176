"""The two MONAI bundles as the app uses them: configs, the current checkpoint, predictors.

Each served model has a folder ``<model_dir>/<model>/`` holding

* ``model.pt``: the current checkpoint (``{"model": state_dict}``, as the bundles save
  it). Created on first start from ``--conf <model>_weights``, else the bundle's own
  ``models/model.pt`` (with ``use_pretrained``), else a freshly initialised network;
  replaced atomically by every finished training run, which starts from it.
* ``model.settings.json``: the settings the checkpoint was trained with (network,
  slice preparation, labels; :mod:`volumes.bundle`), published with it, so inference
  refuses app settings that do not fit the weights with the differing keys named;
  ``model.calibration.json`` (the classifier's temperature) and ``model.qc.json`` with
  ``model.qc_index.npy`` (the segmenter's quality-control reference) travel the same way.
* ``train_stats.json``: what the last training run did (shown in ``/info``).
* ``runs/<run id>/``: each training run's datalist, checkpoints and TensorBoard logs.
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lib.config import MODEL_NAMES, AppConfig

__all__ = ["ModelBundle", "atomic_write_json"]

logger = logging.getLogger(__name__)


def atomic_write_json(path: Path, content: Any) -> None:
    """Write JSON through a temporary file in the same folder and a rename."""
    from volumes.atomic import atomic_write_bytes

    text = json.dumps(content, indent=1, default=str)
    atomic_write_bytes(path, lambda handle: handle.write(text.encode()))


@dataclass
class ModelBundle:
    """One served model: its bundle, settings and current checkpoint.

    Args:
        name: ``segmentation`` or ``classification``.
        config: the app's settings.
    """

    name: str
    config: AppConfig
    _predictors: dict[str, tuple[float, Any]] = field(default_factory=dict, init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.name not in MODEL_NAMES:
            raise ValueError(f"unknown model {self.name!r}; expected one of {list(MODEL_NAMES)}")

    # ------------------------------------------------------------------ paths and configs
    @property
    def root(self) -> Path:
        """The bundle folder (``bundles/dinov2_...``)."""
        return self.config.bundle_root(self.name)

    @property
    def directory(self) -> Path:
        return self.config.model_dir / self.name

    @property
    def checkpoint(self) -> Path:
        """The current checkpoint, which inference loads and training fine-tunes."""
        return self.directory / "model.pt"

    @property
    def stats_path(self) -> Path:
        return self.directory / "train_stats.json"

    @property
    def overrides(self) -> dict[str, Any]:
        return self.config.bundle_overrides(self.name)

    @property
    def task(self) -> str:
        return "segmentation" if self.name == "segmentation" else "classification"

    def parser(self, kind: str = "inference"):
        """The bundle's ``configs/<kind>.json`` (with its metadata) and the app's overrides applied."""
        from monai.bundle import ConfigParser

        parser = ConfigParser()
        parser.read_meta(str(self.root / "configs" / "metadata.json"))
        parser.read_config(str(self.root / "configs" / f"{kind}.json"))
        parser["bundle_root"] = str(self.root)
        for key, value in self.overrides.items():
            parser[key] = value
        return parser

    def labels(self) -> list[str]:
        """Label names by value (segmentation, 0 = background) or class names (classification)."""
        parser = self.parser("inference")
        return list(parser["labels"] if self.task == "segmentation" else parser["class_names"])

    def version(self) -> str:
        return str(json.loads((self.root / "configs" / "metadata.json").read_text())["version"])

    # ------------------------------------------------------------------ checkpoint
    def ensure_checkpoint(self) -> Path:
        """Create the current checkpoint when there is none yet; returns its path."""
        if self.checkpoint.is_file():
            return self.checkpoint
        self.directory.mkdir(parents=True, exist_ok=True)
        given = self.config.weights.get(self.name)
        shipped = self.root / "models" / "model.pt"
        if given is not None:
            logger.info("%s: starting from --conf %s_weights %s", self.name, self.name, given)
            self.publish_file(given)
        elif self.config.use_pretrained and shipped.is_file():
            logger.info("%s: starting from the bundle's checkpoint %s", self.name, shipped)
            self.publish_file(shipped)
        else:
            logger.warning("%s: no checkpoint to start from; initialising a new network (seed %d)%s", self.name,
                           self.config.seed, " with encoder weights " + str(self.config.encoder_weights)
                           if self.config.encoder_weights else " with random weights")
            self.publish_state(self.fresh_network().state_dict())
        return self.checkpoint

    def fresh_network(self) -> torch.nn.Module:
        """The bundle's training network, newly initialised (seeded; encoder weights when given)."""
        parser = self.parser("train")
        if self.config.encoder_weights is not None:
            parser["encoder_weights"] = str(self.config.encoder_weights)
        torch.manual_seed(self.config.seed)
        return parser.get_parsed_content("network_def")

    def publish_state(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Make ``state_dict`` the current checkpoint (written next to it, then renamed).

        Its settings are those of this app's training config (the network it was built from).
        """
        from volumes.atomic import atomic_write_bytes
        from volumes.bundle import SaveSettings

        from volumes.calibration import calibration_path
        from volumes.quality import quality_paths

        SaveSettings(self.checkpoint, self.parser("train").get_parsed_content("checkpoint_settings")).write()
        for fitted in (calibration_path(self.checkpoint), *quality_paths(self.checkpoint)):
            fitted.unlink(missing_ok=True)  # not fitted for these weights
        state = {"model": {k: v.detach().cpu() for k, v in state_dict.items()}}
        atomic_write_bytes(self.checkpoint, lambda handle: torch.save(state, handle))

    def publish_file(self, source: Path) -> None:
        """Make a checkpoint file the current checkpoint (copied next to it, then renamed).

        The settings saved beside ``source`` travel with it; a checkpoint without them (trained
        elsewhere) is published without, so a stale settings file never describes it.
        """
        from volumes.atomic import atomic_path
        from volumes.bundle import settings_path
        from volumes.calibration import calibration_path
        from volumes.quality import quality_paths

        # settings; the classifier's temperature; the segmenter's quality-control reference
        companions = (settings_path, calibration_path, lambda p: quality_paths(p)[0], lambda p: quality_paths(p)[1])
        for companion in companions:
            given, published = companion(source), companion(self.checkpoint)
            if given.is_file():
                with atomic_path(published, suffix=".json.tmp") as tmp:
                    shutil.copyfile(given, tmp)
            else:
                published.unlink(missing_ok=True)
        with atomic_path(self.checkpoint, suffix=".pt.tmp") as tmp:
            shutil.copyfile(source, tmp)

    def checkpoint_stamp(self) -> str:
        """Changes whenever a new checkpoint is published (modification time and size)."""
        stat = self.checkpoint.stat()
        return f"{stat.st_mtime_ns}-{stat.st_size}"

    # ------------------------------------------------------------------ inference
    def predictor(self, device: str | torch.device) -> Any:
        """The bundle's predictor on ``device`` with the current checkpoint (reloaded after training).

        Raises:
            RuntimeError: the checkpoint does not fit the network the settings describe.
        """
        from volumes.inference import load_bundle

        key = str(device)
        with self._lock:
            stamp = self.checkpoint_stamp()
            cached = self._predictors.get(key)
            if cached is not None and cached[0] == stamp:
                return cached[1]
            try:
                model = load_bundle(self.root, device=torch.device(device), weights=self.checkpoint,
                                    overrides=self.overrides)
            except RuntimeError as exc:
                raise RuntimeError(
                    f"{self.checkpoint} does not fit the {self.name} network of these settings "
                    f"(encoder_depth, {self.name}_overrides...): {exc}. Use another --conf model_dir or start "
                    f"with the settings it was trained with."
                ) from exc
            logger.info("%s: loaded %s on %s", self.name, self.checkpoint, device)
            self._predictors[key] = (stamp, model.predictor)
            return model.predictor

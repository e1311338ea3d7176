"""MONAI Label train tasks that fine-tune a model by running its bundle's own ``train.json``.

A run:

1. collects the datastore's labelled images (segmentation: images with a ``final``
   label; classification: images whose info has a ``class_label``, see
   :func:`class_index`) and splits them into training and validation items
   (``val_split``; with a single labelled image it serves as both);
2. writes them as a MONAI datalist under ``<model_dir>/<model>/runs/<run id>/``;
3. runs the bundle's ``train.json`` on it (``datalist``, ``epochs``, ``device`` and the
   app's settings overridden), starting from the current checkpoint;
4. publishes the run's best checkpoint by the bundle's validation metric (or its
   final weights if no validation ran) as the new current checkpoint, which the
   infer task picks up on its next request, and writes ``train_stats.json``.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Events
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.exception import MONAILabelError, MONAILabelException
from monailabel.interfaces.tasks.train import TrainTask
from monailabel.tasks.train.handler import prepare_stats
from monailabel.utils.others.generic import device_list, name_to_device

from lib.bundles import ModelBundle, atomic_write_json

__all__ = ["BundleTrainTask", "ClassificationTrain", "SegmentationTrain", "class_index", "split_items"]

logger = logging.getLogger(__name__)

#: The image-info key that holds an image's class for the classification model.
CLASS_LABEL_KEY = "class_label"


def class_index(value: Any, class_names: list[str]) -> int | None:
    """An image's class from its info: a class index (``1``, ``"1"``) or a class name; None if unusable."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, str) and value in class_names:
        return class_names.index(value)
    try:
        index = int(value)
    except (TypeError, ValueError):
        return None
    return index if 0 <= index < len(class_names) else None


def split_items(items: list[dict[str, Any]], val_split: float, seed: int,
                stratify: str | None = None) -> tuple[list[dict], list[dict]]:
    """Shuffled (seeded) training / validation split; one image serves as both when it is alone.

    With ``stratify`` (an item key such as ``class_label``) each group gives its share of
    validation items (at least one, when it has two or more), so a validation set sees
    every class that can spare an image.
    """
    items = sorted(items, key=lambda item: item["case_id"])
    random.Random(seed).shuffle(items)
    if len(items) < 2 or val_split <= 0:
        return items, list(items)
    groups: dict[Any, list[dict]] = {}
    for item in items:
        groups.setdefault(item[stratify] if stratify else None, []).append(item)
    val: list[dict] = []
    for group in groups.values():
        if len(group) >= 2 or not stratify:
            val += group[: min(len(group) - 1, max(1, round(len(group) * val_split)))]
    if not val:
        val = items[:1]
    chosen = {id(item) for item in val}
    return [item for item in items if id(item) not in chosen], val


def _json_safe(value: Any) -> Any:
    """``value`` with NaN / infinite floats (a metric on a one-class validation set) as None: valid JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


class BundleTrainTask(TrainTask):
    """Fine-tunes one model from its current checkpoint with its bundle's training config.

    Args:
        bundle: the served model.
        description: shown by clients.
        epochs: default epochs of a run (request key ``max_epochs``).
        val_split: default validation fraction (request key ``val_split``).
        seed: seed of the split and of the bundle's training.
        device: default device (request key ``device``); None picks CUDA when available.
    """

    def __init__(self, bundle: ModelBundle, description: str, epochs: int, val_split: float, seed: int = 0,
                 device: str | None = None) -> None:
        super().__init__(description)
        self.bundle = bundle
        self.seed = seed
        self._config: dict[str, Any] = {
            "max_epochs": epochs,
            "val_split": val_split,
            "device": [device] if device else device_list(),
            "multi_gpu": False,  # one process: the bundle's single-device train.json
        }

    #: item key to stratify the validation split by (None: a plain random split)
    stratify: str | None = None

    def config(self) -> dict[str, Any]:
        return self._config

    def stats(self) -> dict[str, Any]:
        path = self.bundle.stats_path
        return _json_safe(json.loads(path.read_text())) if path.is_file() else {}

    def items(self, datastore: Datastore) -> list[dict[str, Any]]:
        """The datastore's labelled images as datalist items (``image``, ``case_id``, the label)."""
        raise NotImplementedError

    def bundle_overrides(self, run_dir: Path, datalist: Path, epochs: int, device: torch.device) -> dict[str, Any]:
        """Config values of this run on top of the app's settings."""
        return {
            "bundle_root": str(run_dir),
            "ckpt_dir": str(run_dir / "models"),
            "output_dir": str(run_dir / "eval"),
            "datalist": str(datalist),
            "epochs": epochs,
            "device": device,
            "seed": self.seed,
            # fine-tune: the bundle's network, loaded from the current checkpoint (a plain-string key:
            # a path inside a "$" expression would be parsed for "@" references)
            "app_checkpoint": str(self.bundle.checkpoint),
            "network": "$volumes.bundle.load_network_weights(@network_def, @app_checkpoint).to(@device)",
        }

    def __call__(self, request: dict[str, Any], datastore: Datastore) -> dict[str, Any]:
        req = {**self._config, **request}
        epochs = int(req["max_epochs"])
        if epochs < 1:
            raise MONAILabelException(MONAILabelError.INVALID_INPUT, f"max_epochs must be >= 1, got {epochs}")
        items = self.items(datastore)
        if not items:
            raise MONAILabelException(MONAILabelError.INVALID_INPUT,
                                      f"{self.bundle.name}: no labelled images in the datastore to train on")
        train, val = split_items(items, float(req["val_split"]), self.seed, self.stratify)
        device = torch.device(name_to_device(req.get("device")))
        self.bundle.ensure_checkpoint()

        run_id = datetime.now().strftime("%Y%m%d_%H%M%S_%f")
        run_dir = self.bundle.directory / "runs" / run_id
        datalist = run_dir / "datalist.json"
        atomic_write_json(datalist, {"training": train, "validation": val})
        logger.info("%s: training run %s on %d images (validation %d), %d epoch(s) on %s", self.bundle.name, run_id,
                    len(train), len(val), epochs, device)

        parser = self.bundle.parser("train")
        for key, value in self.bundle_overrides(run_dir, datalist, epochs, device).items():
            parser[key] = value
        start = time.time()
        parser.get_parsed_content("initialize")  # seeds, folders: before the datasets are built
        trainer = parser.get_parsed_content("train#trainer")
        evaluator = parser.get_parsed_content("validate#evaluator")

        def progress(engine: Any) -> None:  # per-epoch stats for clients' progress bars (/info train_stats)
            atomic_write_json(self.bundle.stats_path, _json_safe({
                **prepare_stats(start, trainer, evaluator), "model": self.bundle.name, "run_id": run_id}))

        trainer.add_event_handler(Events.EPOCH_COMPLETED, progress)
        parser.get_parsed_content("run")
        if "finalize" in parser.get():
            parser.get_parsed_content("finalize")

        best = run_dir / "models" / "model.pt"
        if best.is_file():
            self.bundle.publish_file(best)
            published = "best validation checkpoint"
        else:
            self.bundle.publish_state(parser.get_parsed_content("network").state_dict())
            published = "final weights"
        stats = prepare_stats(start, trainer, evaluator)
        stats.update({
            "model": self.bundle.name,
            "run_id": run_id,
            "run_dir": str(run_dir),
            "max_epochs": epochs,
            "device": str(device),
            "train_images": [item["case_id"] for item in train],
            "val_images": [item["case_id"] for item in val],
            "published": published,
            "checkpoint": str(self.bundle.checkpoint),
        })
        stats = _json_safe(stats)
        atomic_write_json(self.bundle.stats_path, stats)
        logger.info("%s: published the %s of run %s as %s", self.bundle.name, published, run_id,
                    self.bundle.checkpoint)
        return stats


class SegmentationTrain(BundleTrainTask):
    """Fine-tunes the segmentation bundle on images with a ``final`` label in the datastore."""

    def items(self, datastore: Datastore) -> list[dict[str, Any]]:
        items = []
        for image_id in sorted(datastore.get_labeled_images()):
            image = datastore.get_image_uri(image_id)
            label = datastore.get_label_uri(image_id, "final")
            if image and label:
                items.append({"image": image, "label": label, "case_id": image_id})
        return items

    def bundle_overrides(self, run_dir: Path, datalist: Path, epochs: int, device: torch.device) -> dict[str, Any]:
        values = super().bundle_overrides(run_dir, datalist, epochs, device)
        if "validation_interval" not in self.bundle.overrides:
            values["validation_interval"] = 1  # validate (and keep the best checkpoint) after every epoch
        return values


class ClassificationTrain(BundleTrainTask):
    """Fine-tunes the classification bundle's aggregator on images whose info holds a ``class_label``.

    An image's class is set in its datastore info, as a class index or name, e.g. on
    upload (``client.upload_image(path, id, {"class_label": "hepatomegaly"})``) or with
    ``PUT /datastore/image/info?image=ID`` (form field ``info='{"class_label": 1}'``).
    Slice embeddings are cached under ``<model_dir>/classification/embedding_cache``.
    The validation split is stratified by class.
    """

    stratify = CLASS_LABEL_KEY

    def items(self, datastore: Datastore) -> list[dict[str, Any]]:
        names = self.bundle.labels()
        items = []
        for image_id in sorted(datastore.list_images()):
            info = datastore.get_image_info(image_id)
            if CLASS_LABEL_KEY not in info:
                continue
            index = class_index(info[CLASS_LABEL_KEY], names)
            if index is None:
                logger.warning("classification: image %s has class_label %r, not one of %s or an index; skipped",
                               image_id, info[CLASS_LABEL_KEY], names)
                continue
            items.append({"image": datastore.get_image_uri(image_id), "class_label": index, "case_id": image_id})
        return items

    def bundle_overrides(self, run_dir: Path, datalist: Path, epochs: int, device: torch.device) -> dict[str, Any]:
        values = super().bundle_overrides(run_dir, datalist, epochs, device)
        values["cache_dir"] = str(self.bundle.directory / "embedding_cache")
        return values

"""Active learning: the unlabelled image the segmentation model is least sure about.

MONAI Label ships ``random`` and ``first``; :class:`Uncertainty` scores every unlabelled
image by the mean normalised entropy of the segmentation network's softmax
(:meth:`lib.infers.SegmentationInfer.uncertainty`) and picks the highest. Scores are
cached in a JSON file keyed by image and checkpoint, so an image is scored once per
checkpoint: a new training run (a new checkpoint) invalidates them.
"""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path
from typing import Any

from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.strategy import Strategy
from monailabel.utils.others.generic import name_to_device

from lib.bundles import atomic_write_json
from lib.infers import SegmentationInfer

__all__ = ["Uncertainty"]

logger = logging.getLogger(__name__)


class Uncertainty(Strategy):
    """Pick the unlabelled image with the highest mean softmax entropy of the segmentation model.

    Args:
        infer: the segmentation infer task (its predictor and checkpoint).
        cache_path: JSON file of cached scores.
        device: default device (request key ``device``).

    The response is ``{"id", "uncertainty", "scores": {id: score}, "cached": n}`` where
    ``cached`` counts the scores served from the cache.
    """

    def __init__(self, infer: SegmentationInfer, cache_path: Path, device: str | None = None) -> None:
        super().__init__("Highest mean softmax entropy of the segmentation model (unlabelled images)")
        self.infer = infer
        self.cache_path = Path(cache_path)
        self.device = device
        self._lock = threading.Lock()

    def _load(self) -> dict[str, Any]:
        try:
            return json.loads(self.cache_path.read_text())
        except (OSError, ValueError):
            return {}

    @staticmethod
    def _image_stamp(path: str) -> str:
        stat = Path(path).stat()
        return f"{stat.st_mtime_ns}-{stat.st_size}"

    def scores(self, image_ids: list[str], datastore: Datastore, device: str) -> tuple[dict[str, float], int]:
        """Uncertainty of each image (cached per image file and checkpoint) and how many came from the cache."""
        with self._lock:
            cache = self._load()
            checkpoint = self.infer.bundle.checkpoint_stamp()
            entries = cache.get(checkpoint, {})
            scores, hits = {}, 0
            for image_id in image_ids:
                path = datastore.get_image_uri(image_id)
                stamp = self._image_stamp(path)
                entry = entries.get(image_id)
                if entry is not None and entry.get("image") == stamp:
                    scores[image_id] = float(entry["score"])
                    hits += 1
                    continue
                scores[image_id] = self.infer.uncertainty(path, device)
                entries[image_id] = {"image": stamp, "score": scores[image_id]}
            atomic_write_json(self.cache_path, {checkpoint: entries})  # scores of older checkpoints are stale
        return scores, hits

    def __call__(self, request: dict[str, Any], datastore: Datastore) -> dict[str, Any] | None:
        images = sorted(datastore.get_unlabeled_images(request.get("label_tag"), request.get("labels")))
        if not images:
            return None
        self.infer.bundle.ensure_checkpoint()
        device = name_to_device(request.get("device") or self.device)
        scores, hits = self.scores(images, datastore, device)
        best = max(images, key=lambda image_id: (scores[image_id], image_id))
        logger.info("uncertainty: selected %s (%.4f) among %d unlabelled images (%d cached)", best, scores[best],
                    len(images), hits)
        return {"id": best, "uncertainty": scores[best], "scores": scores, "cached": hits}

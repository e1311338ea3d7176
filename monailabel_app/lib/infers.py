"""MONAI Label infer tasks that run the bundles' own predictors.

The pipeline is MONAI Label's :class:`BasicInferTask` (pre-transforms, inferer,
post-transforms, writer, with its latencies and request handling); each stage calls
the ``volumes`` pieces the bundles' ``inference.json`` and ``python -m volumes infer``
use:

* pre-transforms: :class:`~lib.transforms.StashKeysd` (MONAI Label's ``image_path``
  out of MONAI's way), :class:`volumes.data.io.LoadVolumed` (RAS), the predictor's
  ``prepare`` (the bundle's preprocessing);
* inferer: the predictor's ``predict`` (network, sliding slabs, inversion to the
  loaded grid for segmentation; probabilities and slice importance for classification);
* writer: :func:`volumes.segmentation.write_label_map` in the input file's own shape and
  affine, or a JSON result.
"""

from __future__ import annotations

import logging
import math
import tempfile
from typing import Any, Callable, Sequence

import numpy as np
import torch
from monailabel.interfaces.tasks.infer_v2 import InferType
from monailabel.tasks.infer.basic_infer import BasicInferTask

from volumes.arrays import spacing_mm

from lib.bundles import ModelBundle
from lib.transforms import BundlePrepared, RecordGeometryd, RestoreKeysd, StashKeysd

__all__ = ["BundleInferTask", "ClassificationInfer", "SegmentationInfer"]

logger = logging.getLogger(__name__)


class BundleInferTask(BasicInferTask):
    """Shared part of both infer tasks: loading, the bundle's preprocessing, its predictor.

    Args:
        bundle: the served model (bundle, settings, current checkpoint).
        type: MONAI Label's infer type.
        labels: what ``/info`` lists for the model.
        description: shown by clients.
        device: default device of requests (a request's ``device`` wins).
    """

    def __init__(self, bundle: ModelBundle, type: InferType, labels: Any, description: str,
                 device: str | None = None) -> None:
        super().__init__(path=str(bundle.checkpoint), network=None, type=type, labels=labels, dimension=3,
                         description=description)
        if device is not None:
            self._config["device"] = device
        self.bundle = bundle

    def is_valid(self) -> bool:
        return self.bundle.checkpoint.is_file()

    def predictor(self, device: str | torch.device) -> Any:
        """The bundle's predictor with the current checkpoint (reloaded after each training)."""
        return self.bundle.predictor(device)

    def load_and_prepare(self, device: str | torch.device) -> list[Callable]:
        """Image path -> the bundle's network input, keeping the original geometry."""
        from volumes.data.io import LoadVolumed

        return [StashKeysd("image"), LoadVolumed("image"), RecordGeometryd("image"),
                BundlePrepared(lambda: self.predictor(device))]

    def pre_transforms(self, data: dict | None = None) -> Sequence[Callable]:
        return self.load_and_prepare((data or {}).get("device", "cpu"))

    def inverse_transforms(self, data: dict | None = None) -> None:
        return None  # the predictor returns its outputs on the loaded grid already

    def post_transforms(self, data: dict | None = None) -> Sequence[Callable]:
        return [RestoreKeysd()]

    def run_inferer(self, data: dict[str, Any], convert_to_batch: bool = True, device: str = "cpu") -> dict[str, Any]:
        data[self.output_label_key] = self.predictor(device).predict(data)
        return data


class SegmentationInfer(BundleInferTask):
    """The segmentation bundle: a label map in the input's own shape and affine.

    The result JSON has ``label_names`` (``{name: value}``), ``organ_volumes_ml`` and, when the
    checkpoint has a quality-control reference, ``quality`` (pass / review per case and organ).
    """

    def __init__(self, bundle: ModelBundle, device: str | None = None) -> None:
        names = bundle.labels()
        labels = {name: value for value, name in enumerate(names) if value > 0}
        super().__init__(bundle, InferType.SEGMENTATION, labels,
                         f"Abdominal organ segmentation of CT volumes ({bundle.root.name} {bundle.version()})",
                         device=device)
        self.label_names = names

    def writer(self, data: dict[str, Any], extension: str | None = None, dtype: Any = None) -> tuple[str, dict]:
        from volumes.segmentation import organ_volumes_ml, write_label_map

        label_map = data[self.output_label_key]["label_map"]
        path = tempfile.NamedTemporaryFile(suffix=".nii.gz", delete=False).name
        write_label_map(label_map, label_map.affine, path, original_affine=data["original_affine"])
        spacing = np.asarray(spacing_mm(label_map.affine))
        volumes = organ_volumes_ml(np.asarray(label_map[0]), spacing.tolist(), self.label_names)
        result: dict[str, Any] = {"organ_volumes_ml": {k: round(v, 3) for k, v in volumes.items()}}
        quality = data[self.output_label_key].get("quality")
        if quality is not None:  # the checkpoint's quality-control reference (docs/QC.md): flag, score, reasons
            result["quality"] = quality
        return path, result

    def uncertainty(self, image_path: str, device: str | torch.device = "cpu") -> float:
        """Mean normalised entropy of the softmax over the network's input grid, in ``[0, 1]``.

        0 when every voxel is predicted with certainty, 1 when every class is equally
        likely everywhere; computed from the segmentation network's own logits.
        """
        data: dict[str, Any] = {"image": image_path}
        for transform in self.load_and_prepare(device):
            data = transform(data)
        predictor = self.predictor(device)
        with torch.inference_mode():
            logits = predictor.inferer(data["image"].unsqueeze(0).to(predictor.device), predictor.network)[0]
        log_probs = torch.log_softmax(logits.float(), dim=0)
        entropy = -(log_probs.exp() * log_probs).sum(dim=0) / math.log(logits.shape[0])
        return float(entropy.mean().clamp(0.0, 1.0))


class ClassificationInfer(BundleInferTask):
    """The classification bundle: class probabilities and slice importance as JSON (no label file).

    The result JSON has ``probabilities`` (``{class: p}``, summing to 1), ``predicted``,
    ``predicted_index``, ``importance`` (one value per slice of the network input) and
    ``top_slices``.
    """

    def __init__(self, bundle: ModelBundle, device: str | None = None) -> None:
        names = bundle.labels()
        super().__init__(bundle, InferType.CLASSIFICATION, {name: index for index, name in enumerate(names)},
                         f"Volume classification from DINOv2 slice embeddings ({bundle.root.name} {bundle.version()})",
                         device=device)
        self.class_names = names

    def writer(self, data: dict[str, Any], extension: str | None = None, dtype: Any = None) -> tuple[None, dict]:
        result = data[self.output_label_key]
        return None, {
            "probabilities": result["probabilities"],
            "predicted": result["predicted"],
            "predicted_index": result["predicted_index"],
            "importance": [round(float(v), 6) for v in result["importance"]],
            "top_slices": result["top_slices"],
            "class_names": self.class_names,
        }

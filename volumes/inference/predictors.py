"""What one bundle does to one loaded case: prepare it for its network, run the network.

A predictor has two steps, so the batch runner can overlap them across cases:

* ``prepare(item)`` runs on a background thread: the bundle's preprocessing of an item
  whose ``image`` is already loaded (a RAS-oriented MetaTensor from
  :class:`volumes.data.io.LoadVolumed`, which passes loaded tensors through).
* ``predict(data)`` runs the network and returns plain results: a label map in the
  loaded volume's grid for segmentation, probabilities and slice importance for
  classification.

Writing files is the runner's job (:mod:`volumes.inference.runner`), so the bundle's own
``inference.json`` and ``python -m volumes infer`` produce the same outputs.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

__all__ = ["ClassificationPredictor", "SegmentationPredictor"]


def _batch(image: torch.Tensor, device: torch.device) -> torch.Tensor:
    return image.unsqueeze(0).to(device, non_blocking=True)


class SegmentationPredictor:
    """A :class:`~volumes.networks.SliceSegmenter` over a whole volume, slab by slab.

    Its speed / accuracy / memory knobs are keys of the bundle's ``inference.json``, so
    ``python -m monai.bundle run ... --inference_overlap 0.5`` and
    ``volumes infer --set inference_overlap=0.5`` reach them alike:

    * ``inference_slab`` (16): slices per 3D-refinement window. Larger sees more context
      along z and holds more logits at once; the encoder and 2D decoder run once per slice
      whatever the slab (:class:`~volumes.segmentation.SlabInferer`).
    * ``inference_overlap`` (0.25): fraction of a slab shared with the next. More overlap
      averages more windows at slab borders (smoother along z) and runs the 3D refinement
      more often; it does not re-encode slices.
    * ``inference_sw_batch`` (1): slabs per refinement call. Higher is faster on a GPU,
      costs memory, changes nothing in the result.
    * ``encoder_chunk_size`` (32): slices per encoder pass. Bounds the encoder's activation
      memory; results are the same (up to float rounding).
    * ``encoder_autocast`` (``auto``): ``bf16`` on CUDA for ``auto``, ``fp32`` elsewhere;
      ``bf16`` is about 2x faster on recent GPUs and changes logits by ~1e-2.
    * ``device`` (CUDA when present): ``volumes infer --device``; under torchrun each
      process takes its own GPU.

    Two knobs of ``volumes infer`` act on the networks from outside the bundle:

    * ``--backend`` (``torch``): ``onnxruntime`` runs the encoder and the 2D decoder as ONNX
      graphs on the CPU (features within 1e-4; :mod:`volumes.inference.onnx_backend`),
      ``onnxruntime-int8`` with int8 encoder weights (changes labels; see docs/PERFORMANCE.md).
    * ``--no-share-encoder``: by default bundles with the same encoder weights and slice
      preparation encode a case once for all their heads
      (:mod:`volumes.inference.shared_encoder`); same results, more memory per case.

    The classification bundle shares ``encoder_chunk_size``, ``encoder_autocast`` and
    ``device``. Keys that change the outputs are part of the bundle's model key, so
    ``--resume`` redoes cases when they change.

    Args:
        network: the trained segmenter.
        transform: the bundle's preprocessing (``volumes.segmentation.segmentation_transforms``
            without labels).
        inferer: sliding windows along the slices (``volumes.segmentation.slab_inferer``).
        postprocessing: logits -> label map in the loaded volume's grid
            (``volumes.segmentation.segmentation_postprocessing(..., metrics=False)``).
        labels: names by label value (0 is background).
        device: where the network runs.
        quality: the checkpoint whose quality-control reference (``model.qc.json`` and
            ``model.qc_index.npy``, fitted at the end of training by
            :class:`volumes.quality.FitQualityControl`) scores each case; its result is
            ``quality`` (score, pass / review flag and reasons per case and organ). None or
            no file: no QC.
    """

    task = "segmentation"

    def __init__(self, network: torch.nn.Module, transform: Callable[[dict], dict], inferer: Callable,
                 postprocessing: Callable[[dict], dict], labels: Sequence[str], device: str | torch.device = "cpu",
                 quality: str | Any = None):
        from volumes.quality import load_quality_reference, quality_paths

        self.device = torch.device(device)
        self.network = network.to(self.device).eval()
        self.transform = transform
        self.inferer = inferer
        self.postprocessing = postprocessing
        self.labels = list(labels)
        self.quality = load_quality_reference(quality, self.labels)
        self.fitted_files = [p for p in quality_paths(quality) if p.is_file()] if self.quality is not None else []

    def prepare(self, item: Mapping[str, Any]) -> dict[str, Any]:
        return self.transform(dict(item))

    def predict(self, data: Mapping[str, Any]) -> dict[str, Any]:
        """Returns ``{"label_map": MetaTensor [1, X, Y, Z] uint8}`` on the loaded volume's grid, and
        ``quality`` (:meth:`volumes.quality.QualityReference.assess`) when the checkpoint has a QC reference."""
        from volumes.arrays import spacing_mm
        from volumes.quality import SegmentationProbe, measure_case, predict_with_probe

        image = data["image"]
        probe = SegmentationProbe() if self.quality is not None else None
        step = {"image": image, "pred": predict_with_probe(self.network, self.inferer, image, self.device, probe)}
        result: dict[str, Any] = {}
        if self.quality is not None:
            measured = measure_case(step["pred"], probe, spacing_mm(image.affine), self.labels)
            result["quality"] = self.quality.assess(measured)
        # no other reference to the logits: the postprocessing frees them once the label map exists
        result["label_map"] = self.postprocessing(step)["pred"]
        return result


class ClassificationPredictor:
    """A :class:`~volumes.networks.SliceClassifier`: class probabilities and slice importance.

    Args:
        network: the trained classifier.
        transform: the bundle's preprocessing (a loader plus ``volumes.transforms.preprocessing``).
        class_names: names of the ``K`` classes, in logit order.
        top_k: how many slices to report, most important first.
        device: where the network runs.
        calibration: the checkpoint whose ``model.calibration.json`` (written by training,
            :class:`volumes.calibration.FitTemperature`) holds the temperature ``T`` and, for
            two classes, Platt's intercept (``bias``); the probabilities are
            ``softmax(logits / T + bias)`` and the uncalibrated ones are kept as
            ``probabilities_uncalibrated``. None or no file: uncalibrated (``T = 1``).
    """

    task = "classification"

    def __init__(self, network: torch.nn.Module, transform: Callable[[dict], dict], class_names: Sequence[str],
                 top_k: int = 5, device: str | torch.device = "cpu", calibration: str | Any = None):
        from volumes.calibration import calibration_path, load_calibration

        self.device = torch.device(device)
        self.network = network.to(self.device).eval()
        self.transform = transform
        self.class_names = list(class_names)
        self.top_k = int(top_k)
        self.calibration = load_calibration(calibration)
        fitted = calibration_path(calibration) if calibration is not None else None
        self.fitted_files = [fitted] if fitted is not None and fitted.is_file() else []

    def prepare(self, item: Mapping[str, Any]) -> dict[str, Any]:
        return self.transform(dict(item))

    def predict(self, data: Mapping[str, Any]) -> dict[str, Any]:
        """Returns probabilities per class, the predicted class, importance per slice and the top slices."""
        with torch.inference_mode():
            logits, importance = self.network.forward_with_importance(_batch(data["image"], self.device))
        raw = torch.softmax(logits.float(), dim=-1)[0].cpu()
        probs = self.calibration.torch_probabilities(logits)[0].cpu()
        importance = importance[0].float().cpu().numpy()
        top = np.argsort(-importance, kind="stable")[: self.top_k]
        predicted = int(probs.argmax())
        return {
            "probabilities": {name: round(float(p), 6) for name, p in zip(self.class_names, probs)},
            "probabilities_uncalibrated": {name: round(float(p), 6) for name, p in zip(self.class_names, raw)},
            "temperature": self.calibration.temperature,
            "logit_bias": list(self.calibration.bias),
            "predicted": self.class_names[predicted],
            "predicted_index": predicted,
            "importance": importance,
            "top_slices": [{"slice": int(i), "importance": round(float(importance[i]), 6)} for i in top],
        }

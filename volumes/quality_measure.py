"""Measuring one case for quality control (:mod:`volumes.quality`) while the segmenter predicts it.

:class:`SegmentationProbe` collects the slices' class tokens and the 2D-vs-refined argmax
counts (:func:`attached`, :func:`predict_with_probe`); :func:`measure_case` turns a case's
logits and its probe into the raw signs (volume, margin, agreement, fragments);
:func:`dice_per_organ` scores a prediction against its label map.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Iterator, Sequence

import numpy as np
import torch

__all__ = ["SegmentationProbe", "attached", "dice_per_organ", "measure_case", "predict_with_probe"]


class SegmentationProbe:
    """Collects what QC needs while a :class:`~volumes.networks.SliceSegmenter` predicts one case.

    The segmenter calls :meth:`add_slices` with each chunk of slices and their class
    tokens, and :meth:`add_slab` with each slab's 2D and refined logits, while the probe is
    :func:`attached`. Constant slices (the padding of a volume thinner than a slab) are
    left out of the embeddings.
    """

    def __init__(self) -> None:
        self._embeddings: list[torch.Tensor] = []
        self.counts: np.ndarray | None = None  # [3, K]: voxels in both argmaxes, in the 2D one, in the refined one

    def add_slices(self, slices: torch.Tensor, cls: torch.Tensor) -> None:
        flat = slices.detach().reshape(len(slices), -1)
        keep = flat.amax(dim=1) > flat.amin(dim=1)
        self._embeddings.append(cls.detach()[keep].float().cpu())

    def add_slab(self, logits_2d: torch.Tensor, logits: torch.Tensor) -> None:
        k = int(logits.shape[1])
        a, b = logits_2d.detach().argmax(1).flatten(), logits.detach().argmax(1).flatten()
        counts = torch.stack([torch.bincount(a[a == b], minlength=k), torch.bincount(a, minlength=k),
                              torch.bincount(b, minlength=k)]).cpu().numpy().astype(np.float64)
        self.counts = counts if self.counts is None else self.counts + counts

    @property
    def embeddings(self) -> np.ndarray:
        if not self._embeddings:
            return np.zeros((0, 0), np.float32)
        return torch.cat(self._embeddings).numpy()


@contextlib.contextmanager
def attached(probe: SegmentationProbe | None, network: torch.nn.Module) -> Iterator[None]:
    """Let ``network`` (a SliceSegmenter) report to ``probe`` inside the block (nothing for None)."""
    if probe is None or not hasattr(network, "qc_probe"):
        yield
        return
    network.qc_probe = probe
    try:
        yield
    finally:
        network.qc_probe = None


def predict_with_probe(network: torch.nn.Module, inferer: Any, image: torch.Tensor, device: Any,
                       probe: SegmentationProbe | None) -> torch.Tensor:
    """Logits ``[K, H, W, D]`` (CPU) of one prepared image ``[3, H, W, D]``, reporting to ``probe``."""
    with torch.inference_mode(), attached(probe, network):
        return inferer(image.unsqueeze(0).to(device, non_blocking=True), network)[0].cpu()


def _components(mask: np.ndarray) -> tuple[int, float]:
    """Number of 26-connected components of ``mask`` and the fraction of voxels outside the largest."""
    from scipy import ndimage

    labelled, count = ndimage.label(mask, structure=np.ones((3, 3, 3), bool))
    if count == 0:
        return 0, math.nan
    sizes = np.bincount(labelled.ravel())[1:]
    return int(count), float(1.0 - sizes.max() / sizes.sum())


def measure_case(logits: torch.Tensor, probe: SegmentationProbe | None, spacing: Sequence[float],
                 labels: Sequence[str], chunk: int = 16) -> dict[str, Any]:
    """The raw QC measurements of one case from its logits ``[K, H, W, D]`` on the network's grid.

    Returns ``{"embeddings": [n, E], "organs": {name: {"volume_ml", "margin", "agreement",
    "components", "fragment_fraction"}}}``; signs that do not exist (an empty mask has no
    margin; a network without 3D refinement no agreement) are NaN.
    """
    from scipy import ndimage

    k = int(logits.shape[0])
    raw = logits.as_tensor() if hasattr(logits, "as_tensor") else logits
    margin_sum, voxels = np.zeros(k), np.zeros(k)
    label_map = torch.empty(raw.shape[1:], dtype=torch.uint8)
    for start in range(0, raw.shape[-1], chunk):  # slices at a time: no second CT-sized float map
        probabilities = torch.softmax(raw[..., start:start + chunk].float(), dim=0)
        top = probabilities.topk(2, dim=0)
        lab = top.indices[0].flatten()
        margin_sum += torch.bincount(lab, weights=(top.values[0] - top.values[1]).flatten().double(),
                                     minlength=k).numpy()
        voxels += torch.bincount(lab, minlength=k).numpy()
        label_map[..., start:start + chunk] = top.indices[0].to(torch.uint8)
    labels_np = label_map.numpy()
    boxes = ndimage.find_objects(labels_np, max_label=k - 1)
    voxel_ml = float(np.prod(np.asarray(spacing, dtype=np.float64))) / 1000.0
    counts = probe.counts if probe is not None else None
    organs: dict[str, dict[str, float]] = {}
    for index, name in enumerate(labels[1:], start=1):
        n = voxels[index]
        organ = {"volume_ml": float(n * voxel_ml), "margin": float(margin_sum[index] / n) if n else math.nan}
        if counts is not None and counts[1, index] + counts[2, index] > 0:
            organ["agreement"] = float(2 * counts[0, index] / (counts[1, index] + counts[2, index]))
        else:
            organ["agreement"] = math.nan
        box = boxes[index - 1] if index - 1 < len(boxes) else None
        components, fragments = _components(labels_np[box] == index) if box is not None else (0, math.nan)
        organ["components"], organ["fragment_fraction"] = components, fragments
        organs[name] = organ
    embeddings = probe.embeddings if probe is not None else np.zeros((0, 0), np.float32)
    return {"embeddings": embeddings, "organs": organs}


def dice_per_organ(prediction: np.ndarray, reference: np.ndarray, labels: Sequence[str]) -> dict[str, float]:
    """Dice of each organ between two label maps; 1.0 when both are empty (nothing to find, nothing found)."""
    prediction, reference = np.asarray(prediction), np.asarray(reference)
    out = {}
    for index, name in enumerate(labels[1:], start=1):
        p, r = prediction == index, reference == index
        total = int(p.sum()) + int(r.sum())
        out[name] = 1.0 if total == 0 else float(2 * np.logical_and(p, r).sum() / total)
    return out


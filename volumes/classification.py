"""Training a volume classifier on cached slice embeddings.

With a frozen encoder the slice embeddings of a case never change, so they are
computed once (:class:`volumes.embedding.SliceEmbedder`, through the persistent cache)
and the aggregator trains on them: no encoder pass after the first epoch, or the first
run. The pieces plug into MONAI's ignite engines (see the classification bundle):

* :class:`~volumes.embedding.SliceEmbedder` turns datalist items into ``{"embedding",
  "positions", "plane_ids", "label", "case_id"}`` items;
* :func:`collate_embeddings` pads a batch of them to the longest and adds a mask;
* :class:`EmbeddingBatch` is the ``prepare_batch`` that hands mask, positions and
  plane ids to the aggregator.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping, Sequence

import torch

from volumes.embedding import SliceEmbedder  # noqa: F401 - older bundle configs name it here

logger = logging.getLogger(__name__)


def collate_embeddings(batch: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Pad embedding items of different slice counts into ``[B, S_max, E]`` plus a ``[B, S_max]`` mask."""
    longest = max(item["embedding"].shape[0] for item in batch)
    dim = batch[0]["embedding"].shape[1]
    size = len(batch)
    embedding = torch.zeros(size, longest, dim)
    positions = torch.zeros(size, longest)
    plane_ids = torch.zeros(size, longest, dtype=torch.long)
    mask = torch.zeros(size, longest, dtype=torch.bool)
    for i, item in enumerate(batch):
        n = item["embedding"].shape[0]
        embedding[i, :n] = item["embedding"]
        positions[i, :n] = item["positions"]
        mask[i, :n] = True
        if "plane_ids" in item:
            plane_ids[i, :n] = item["plane_ids"]
    out: dict[str, Any] = {
        "embedding": embedding, "positions": positions, "mask": mask, "plane_ids": plane_ids,
        "case_id": [item["case_id"] for item in batch],
    }
    if all("label" in item for item in batch):
        out["label"] = torch.tensor([item["label"] for item in batch], dtype=torch.long)
    return out


class EmbeddingBatch:
    """``prepare_batch`` for MONAI engines: the aggregator gets mask, positions and plane ids."""

    def __call__(self, batch: Mapping[str, Any], device: torch.device | str | None = None, non_blocking: bool = False, **kwargs):
        def move(t: torch.Tensor) -> torch.Tensor:
            return t.to(device, non_blocking=non_blocking) if device is not None else t

        inputs = move(batch["embedding"])
        label = move(batch["label"]) if "label" in batch else None
        return inputs, label, (move(batch["mask"]), move(batch["positions"]), move(batch["plane_ids"])), {}


def class_probabilities(logits: torch.Tensor) -> torch.Tensor:
    """Logits ``[B, K]`` -> probabilities ``[B, K]`` (softmax)."""
    return torch.softmax(logits.float(), dim=-1)


class ClassificationPostd:
    """Per-item engine postprocessing: ``pred`` logits -> probabilities, ``label`` index -> one-hot.

    What MONAI's ROCAUC handler expects (``[K]`` scores and a ``[K]`` one-hot per item).
    """

    def __init__(self, num_classes: int):
        self.num_classes = int(num_classes)

    def __call__(self, item: dict) -> dict:
        item = dict(item)
        item["pred"] = torch.softmax(item["pred"].float(), dim=-1)
        if "label" in item and item["label"] is not None:
            label = torch.as_tensor(item["label"]).long().reshape(())
            item["label"] = torch.nn.functional.one_hot(label, self.num_classes).float()
        return item


def accuracy_output(output: Sequence[Mapping[str, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Engine output (decollated items) -> ``(probabilities [B, K], class indices [B])`` for ignite metrics."""
    pred = torch.stack([item["pred"] for item in output])
    label = torch.stack([item["label"] for item in output]).argmax(dim=-1)
    return pred, label

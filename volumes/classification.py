"""Training a volume classifier on cached slice embeddings.

With a frozen encoder the slice embeddings of a case never change, so they are
computed once (and kept in a persistent :class:`volumes.cache.EmbeddingCache`, keyed
by the volume's content, the encoder's parameters and the preprocessing) and the
aggregator trains on them: no encoder pass after the first epoch, or the first run.

A second key, from the input file's bytes (or the DICOM series' files), lets a later
run skip loading and preprocessing as well: it hashes the file, finds the entry and
never decodes the volume. The content key still decides what is computed, so the same
voxels in two files are encoded once; the source key is a second, small entry holding
the same arrays.

The pieces plug into MONAI's ignite engines (see the classification bundle):

* :class:`SliceEmbedder` turns datalist items into ``{"embedding", "positions",
  "plane_ids", "label", "case_id"}`` items;
* :func:`collate_embeddings` pads a batch of them to the longest and adds a mask;
* :class:`EmbeddingBatch` is the ``prepare_batch`` that hands mask, positions and
  plane ids to the aggregator.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from volumes.networks import SliceClassifier

logger = logging.getLogger(__name__)


class SliceEmbedder:
    """Computes (or fetches from the cache) the slice embeddings of datalist items.

    Args:
        network: the classifier whose ``embed`` defines the embeddings (encoder, features, planes).
        transform: loads and prepares an item: ``{"image": path, ...}`` -> ``{"image": [3, H, W, D], ...}``
            (e.g. ``LoadVolumed`` + :func:`volumes.transforms.preprocessing`).
        preprocessing: the settings behind ``transform``, for the cache key.
        cache_dir: a persistent cache folder, or None to keep embeddings in memory only.
        label_key: the item key of the class label.
        device: where the encoder runs.
        source_keys: also key entries by the input file's bytes, so a later run that
            finds them skips loading and preprocessing (see the module docstring).
    """

    #: part of every source key: bump when loading changes what a file becomes
    SOURCE_KEY_VERSION = "source-v1"

    def __init__(
        self,
        network: SliceClassifier,
        transform: Callable[[dict], dict],
        preprocessing: Mapping[str, Any],
        cache_dir: str | Path | None = None,
        label_key: str = "class_label",
        device: str | torch.device = "cpu",
        progress: bool = True,
        source_keys: bool = True,
    ):
        if not network.encoder.frozen:
            raise ValueError("cached slice embeddings need a frozen encoder (encoder mode 'frozen')")
        self.network = network
        self.transform = transform
        self.preprocessing = {**dict(preprocessing), "features": network.features, "planes": list(network.planes)}
        self.label_key = label_key
        self.device = torch.device(device)
        self.progress = progress
        self.source_keys = source_keys
        self.cache = None
        if cache_dir is not None:
            from volumes.cache import EmbeddingCache

            self.cache = EmbeddingCache(cache_dir)
        self._fingerprint: str | None = None

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = self.network.encoder.fingerprint()
        return self._fingerprint

    def _compute(self, image: torch.Tensor) -> dict[str, np.ndarray]:
        self.network.encoder.to(self.device)
        with torch.inference_mode():
            volume = image.unsqueeze(0).to(self.device)
            x, positions, plane_ids = self.network.embed(volume)
        arrays = {"embedding": x[0].cpu().numpy(), "positions": positions[0].cpu().numpy()}
        if plane_ids is not None:
            arrays["plane_ids"] = plane_ids[0].cpu().numpy()
        return arrays

    def cache_key_of(self, image: torch.Tensor) -> str:
        """The cache key of a prepared volume ``[3, H, W, D]``: its voxels and affine, encoder, preprocessing."""
        from volumes.cache import cache_key, volume_hash

        affine = np.asarray(getattr(image, "affine", np.eye(4)))
        return cache_key(
            volume_hash(image.detach().cpu().numpy(), affine), self.network.encoder.name, self.fingerprint,
            self.preprocessing,
        )

    def cache_meta(self, item: Mapping[str, Any]) -> dict[str, Any]:
        """The informational sidecar of an item's cache entry."""
        return {"case_id": item.get("case_id", str(item.get("image"))), "encoder": self.network.encoder.name,
                "weights_id": self.network.encoder.weights_id, "preprocessing": self.preprocessing}

    def source_key_of(self, item: Mapping[str, Any]) -> str | None:
        """The cache key of an item's input bytes (file or DICOM series), or None without one.

        None when source keys are off, there is no cache, or ``image`` is not a path to an
        existing file or folder (an image already in memory has no source bytes).
        """
        image = item.get("image")
        if not self.source_keys or self.cache is None or not isinstance(image, (str, Path)):
            return None
        if not Path(image).exists():
            return None
        from volumes import __version__
        from volumes.cache import cache_key
        from volumes.data.io import source_sha256

        source = f"{self.SOURCE_KEY_VERSION}:{source_sha256(image, item.get('series_uid'))}"
        loading = {**self.preprocessing, "loader": f"volumes {__version__}"}
        return cache_key(source, self.network.encoder.name, self.fingerprint, loading)

    def embed_item(self, item: Mapping[str, Any]) -> dict[str, Any]:
        """One datalist item -> an embedding item (see the module docstring)."""
        source_key = self.source_key_of(item)
        if source_key is not None and source_key in self.cache:  # `in` leaves the hit/miss counts alone
            arrays = self.cache.get(source_key)
            if arrays is not None:
                return self.output_item(item, arrays)
        data = self.transform(dict(item))
        image = data["image"]
        if self.cache is None:
            return self.output_item(item, self._compute(image))
        arrays = self.cache.get_or_compute(self.cache_key_of(image), lambda: self._compute(image),
                                           meta=self.cache_meta(item))
        if source_key is not None:
            try:
                self.cache.put(source_key, arrays, meta={**self.cache_meta(item), "source": str(item["image"])})
            except OSError as exc:  # as get_or_compute: a cache that cannot store is not an error
                from volumes.cache import CacheWarning

                self.cache.stats["write_errors"] += 1
                warnings.warn(f"embedding cache: could not store {self.cache.path(source_key)}: {exc}",
                              CacheWarning, stacklevel=2)
        return self.output_item(item, arrays)

    def output_item(self, item: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> dict[str, Any]:
        """Computed or cached arrays of ``item`` -> the embedding item."""
        out: dict[str, Any] = {
            "embedding": torch.as_tensor(arrays["embedding"]),
            "positions": torch.as_tensor(arrays["positions"]),
            "case_id": item.get("case_id", str(item.get("image"))),
        }
        if "plane_ids" in arrays:
            out["plane_ids"] = torch.as_tensor(arrays["plane_ids"]).long()
        if self.label_key in item:
            out["label"] = int(item[self.label_key])
        return out

    def __call__(self, items: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        """Embed every item (with a progress bar); used as ``$@embedder(@train_items)`` in bundles."""
        from tqdm.auto import tqdm

        out = [self.embed_item(item) for item in tqdm(items, desc="slice embeddings", unit="case", disable=not self.progress)]
        if self.cache is not None:
            logger.info("embedding cache %s: %s", self.cache.root, self.cache.stats)
        return out


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

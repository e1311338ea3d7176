"""The one slice embedder: per-slice arrays of datalist items with a frozen encoder, through the cache.

:class:`SliceEmbedder` loads and prepares an item, encodes its slices and keeps the
arrays in a persistent :class:`volumes.cache.EmbeddingCache`, keyed by the volume's
content, the encoder's parameters, the preprocessing and what is computed. A second
key from the input file's bytes (or DICOM series) lets a later run skip loading too.
*What* is computed per slice is a small feature object:

* :class:`ClassifierFeatures` - a :class:`~volumes.networks.SliceClassifier`'s own
  ``embed`` (``embedding``, ``positions``, ``plane_ids``): the classification bundle;
* :class:`~volumes.evaluation.features.EvaluationFeatures` - every frozen feature of the
  evaluation protocols in one array, batched over volumes;
* :class:`TokenFeatures` - class token, mean patch token and registers: ``volumes embed``.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol, Sequence

import numpy as np
import torch

logger = logging.getLogger(__name__)

__all__ = ["ClassifierFeatures", "SliceEmbedder", "SliceFeatureSource", "TokenFeatures"]


class SliceFeatureSource(Protocol):
    """What a :class:`SliceEmbedder` computes per slice.

    ``encoder`` names the weights (cache keys); ``key_settings`` holds everything else
    that changes the arrays; ``compute`` maps prepared volumes ``[3, H, W, D_i]`` (on
    ``device``) to one dict of numpy arrays each; ``encoded_slices`` counts encoder inputs.
    """

    encoder: Any
    key_settings: dict[str, Any]
    encoded_slices: int

    def compute(self, images: Sequence[torch.Tensor], device: torch.device) -> list[dict[str, np.ndarray]]: ...


class ClassifierFeatures:
    """A :class:`~volumes.networks.SliceClassifier`'s ``embed``: ``embedding [S, E']``, ``positions [S]``, ``plane_ids``."""

    def __init__(self, network: Any):
        self.network = network
        self.encoder = network.encoder
        self.key_settings = {"features": network.features, "planes": list(network.planes)}
        self.encoded_slices = 0

    def compute(self, images: Sequence[torch.Tensor], device: torch.device) -> list[dict[str, np.ndarray]]:
        out = []
        for image in images:
            x, positions, plane_ids = self.network.embed(image.unsqueeze(0).to(device))
            self.encoded_slices += int(x.shape[1])
            arrays = {"embedding": x[0].cpu().numpy(), "positions": positions[0].cpu().numpy()}
            if plane_ids is not None:
                arrays["plane_ids"] = plane_ids[0].cpu().numpy()
            out.append(arrays)
        return out


class TokenFeatures:
    """Per slice: ``cls [D, E]``, ``patch_mean [D, E]``, ``registers [D, R, E]`` and ``slice_mm [D]``."""

    key_settings = {"token_features": "cls|patch_mean|registers|slice_mm"}

    def __init__(self, encoder: Any):
        self.encoder = encoder
        self.encoded_slices = 0

    def compute(self, images: Sequence[torch.Tensor], device: torch.device) -> list[dict[str, np.ndarray]]:
        from volumes.encoders import volume_to_slices
        from volumes.networks import slice_spacing_mm

        out = []
        for image in images:
            volume = image.unsqueeze(0)
            slices = volume_to_slices(volume.as_tensor() if hasattr(volume, "as_tensor") else volume)
            features = self.encoder(slices.to(device, non_blocking=True).float(), with_grids=False)
            self.encoded_slices += int(slices.shape[0])
            spacing = float(slice_spacing_mm(volume, 4)[0])
            out.append({"cls": features.cls.cpu().numpy(), "patch_mean": features.patch_mean.cpu().numpy(),
                        "registers": features.registers.cpu().numpy(),
                        "slice_mm": (np.arange(slices.shape[0]) * spacing).astype(np.float32)})
        return out


class SliceEmbedder:
    """Computes (or fetches from the cache) the per-slice arrays of datalist items.

    Args:
        features: a :class:`SliceFeatureSource`, or a :class:`~volumes.networks.SliceClassifier`
            (then :class:`ClassifierFeatures`: what the classification bundle trains on);
            ``network=`` is the same argument under the name bundle configs use.
        transform: loads and prepares an item: ``{"image": path, ...}`` -> ``{"image": [3, H, W, D], ...}``
            (e.g. ``LoadVolumed`` + :func:`volumes.transforms.preprocessing`).
        preprocessing: the settings behind ``transform``, for the cache key.
        cache_dir: a persistent cache folder, or None to keep embeddings in memory only.
        label_key: the item key of the class label.
        device: where the encoder runs.
        source_keys: also key entries by the input file's bytes, so a later run that finds
            them skips loading and preprocessing. The content key still decides what is
            computed, so the same voxels in two files are encoded once.
    """

    #: part of every source key: bump when loading changes what a file becomes
    SOURCE_KEY_VERSION = "source-v1"

    def __init__(
        self,
        features: Any = None,
        transform: Callable[[dict], dict] | None = None,
        preprocessing: Mapping[str, Any] | None = None,
        cache_dir: str | Path | None = None,
        label_key: str = "class_label",
        device: str | torch.device = "cpu",
        progress: bool = True,
        source_keys: bool = True,
        *,
        network: Any = None,
    ):
        if (features is None) == (network is None):
            raise TypeError("SliceEmbedder needs one of features= (a feature source or classifier) and network=")
        features = features if features is not None else network  # bundle configs name it "network"
        if transform is None or preprocessing is None:
            raise TypeError("SliceEmbedder needs transform= and preprocessing=")
        if not hasattr(features, "compute"):
            features = ClassifierFeatures(features)
        if not features.encoder.frozen:
            raise ValueError("cached slice embeddings need a frozen encoder (encoder mode 'frozen')")
        self.features = features
        self.transform = transform
        self.preprocessing = {**dict(preprocessing), **features.key_settings}
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
    def encoder(self) -> Any:
        return self.features.encoder

    @property
    def network(self) -> Any:
        """The classifier of :class:`ClassifierFeatures` (None for other feature sources)."""
        return getattr(self.features, "network", None)

    @property
    def encoded_slices(self) -> int:
        return self.features.encoded_slices

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = self.encoder.fingerprint()
        return self._fingerprint

    # ------------------------------------------------------------------ computing
    def _compute(self, image: torch.Tensor) -> dict[str, np.ndarray]:
        return self._compute_many([image])[0]

    def _compute_many(self, images: Sequence[torch.Tensor]) -> list[dict[str, np.ndarray]]:
        self.encoder.to(self.device)
        with torch.inference_mode():
            return self.features.compute(images, self.device)

    # ------------------------------------------------------------------------ keys
    def cache_key_of(self, image: torch.Tensor) -> str:
        """The cache key of a prepared volume ``[3, H, W, D]``: its voxels and affine, encoder, preprocessing."""
        from volumes.cache import cache_key, volume_hash

        affine = np.asarray(getattr(image, "affine", np.eye(4)))
        return cache_key(volume_hash(image.detach().cpu().numpy(), affine), self.encoder.name, self.fingerprint,
                         self.preprocessing)

    def cache_meta(self, item: Mapping[str, Any]) -> dict[str, Any]:
        """The informational sidecar of an item's cache entry."""
        return {"case_id": item.get("case_id", str(item.get("image"))), "encoder": self.encoder.name,
                "weights_id": self.encoder.weights_id, "preprocessing": self.preprocessing}

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
        return cache_key(source, self.encoder.name, self.fingerprint, loading)

    # ---------------------------------------------------------------- embedding
    def _store(self, key: str, arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> None:
        try:
            self.cache.put(key, arrays, meta=meta)
        except OSError as exc:  # a cache that cannot store is not an error
            from volumes.cache import CacheWarning

            self.cache.stats["write_errors"] += 1
            warnings.warn(f"embedding cache: could not store {self.cache.path(key)}: {exc}", CacheWarning, stacklevel=3)

    def arrays_of(self, item: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """The per-slice arrays of one datalist item: from its source key, its content key, or computed."""
        source_key = self.source_key_of(item)
        if source_key is not None and source_key in self.cache:  # `in` leaves the hit/miss counts alone
            arrays = self.cache.get(source_key)
            if arrays is not None:
                return arrays
        image = self.transform(dict(item))["image"]
        if self.cache is None:
            return self._compute(image)
        arrays = self.cache.get_or_compute(self.cache_key_of(image), lambda: self._compute(image),
                                           meta=self.cache_meta(item))
        if source_key is not None:
            self._store(source_key, arrays, {**self.cache_meta(item), "source": str(item["image"])})
        return arrays

    def arrays_of_many(self, items: Sequence[Mapping[str, Any]]) -> list[dict[str, np.ndarray]]:
        """:meth:`arrays_of` for several items (content keys), with the cache misses encoded together.

        One encoder pass over several volumes' slices keeps a CPU busier than one pass per
        volume; the entries are the same as :meth:`arrays_of` stores.
        """
        prepared = [(item, self.transform(dict(item))["image"]) for item in items]
        arrays: list[dict[str, np.ndarray] | None] = [None] * len(prepared)
        keys: list[str | None] = [None] * len(prepared)
        if self.cache is not None:
            for i, (_, image) in enumerate(prepared):
                keys[i] = self.cache_key_of(image)
                arrays[i] = self.cache.get(keys[i])
        missing = [i for i, a in enumerate(arrays) if a is None]
        if missing:
            for i, computed in zip(missing, self._compute_many([prepared[i][1] for i in missing])):
                arrays[i] = computed
                if self.cache is not None:
                    self._store(keys[i], computed, self.cache_meta(prepared[i][0]))
        return arrays  # type: ignore[return-value]

    def output_item(self, item: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> dict[str, Any]:
        """Arrays of ``item`` -> ``{"embedding", "positions", "plane_ids"?, "case_id", "label"?}`` tensors."""
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

    def embed_item(self, item: Mapping[str, Any]) -> dict[str, Any]:
        """One datalist item -> an embedding item (:meth:`output_item`)."""
        return self.output_item(item, self.arrays_of(item))

    def embed_items(self, items: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        """``[embed_item(item) for item in items]`` with the misses encoded together (:meth:`arrays_of_many`)."""
        return [self.output_item(item, a) for item, a in zip(items, self.arrays_of_many(items))]

    def __call__(self, items: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        """Embed every item (with a progress bar); used as ``$@embedder(@train_items)`` in bundles."""
        from tqdm.auto import tqdm

        out = [self.embed_item(item) for item in tqdm(items, desc="slice embeddings", unit="case", disable=not self.progress)]
        if self.cache is not None:
            logger.info("embedding cache %s: %s", self.cache.root, self.cache.stats)
        return out

"""Frozen features for the evaluation protocols, computed once per volume and cached.

One encoder pass per volume gives every feature the protocols use, per slice:

* ``cls``: the class token after the final norm, ``[D, E]``;
* ``cls_patch_mean``: ``cls`` and the mean final patch token, ``[D, 2E]``;
* ``last4_cls``: the class tokens of the last four blocks, each through the final norm,
  concatenated ``[D, 4E]`` (DINOv2's linear evaluation reads these); for a CNN the global
  average pools of its last four stages.

They are stored side by side as one ``[D, F]`` array per volume in the persistent
:class:`volumes.cache.EmbeddingCache` through :func:`evaluation_embedder`, the
:class:`volumes.embedding.SliceEmbedder` with :class:`EvaluationFeatures`, whose cache key
also names this layout, so the classifier's embeddings and these never mix. :class:`FeatureLayout` says which
columns hold which kind.

Slices of constant value (the empty background slices of a MedMNIST mask volume) are
encoded once per distinct value (:func:`encode_deduplicated`): the encoder sees every
slice alone, so their features are identical anyway.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence, TypeVar

import numpy as np
import torch

from volumes.embedding import SliceEmbedder
from volumes.encoders import CNNSliceEncoder, SliceEncoder
from volumes.errors import ConfigError

__all__ = [
    "FEATURE_KINDS",
    "EvaluationFeatures",
    "evaluation_embedder",
    "FeatureLayout",
    "FeatureSet",
    "encode_deduplicated",
    "encode_for_evaluation",
    "standardize",
]

FEATURE_KINDS: tuple[str, ...] = ("cls", "cls_patch_mean", "last4_cls")
N_LAST_BLOCKS = 4
_LAYOUT_TAG = "volumes.evaluation.features.v1:cls|patch_mean|last4_cls"

T = TypeVar("T", torch.Tensor, dict)


@dataclass(frozen=True)
class FeatureLayout:
    """Column ranges of each part in an :func:`evaluation_embedder` embedding ``[D, F]``."""

    embed_dim: int
    last_dims: tuple[int, ...]

    @staticmethod
    def of(encoder: SliceEncoder) -> "FeatureLayout":
        if isinstance(encoder, CNNSliceEncoder):
            stages = _last_stages(encoder)
            info = encoder.backbone.feature_info
            dicts = info.get_dicts() if hasattr(info, "get_dicts") else list(info)
            return FeatureLayout(encoder.embed_dim, tuple(int(dicts[i]["num_chs"]) for i in stages))
        return FeatureLayout(encoder.embed_dim, (encoder.embed_dim,) * min(N_LAST_BLOCKS, encoder.depth))

    @property
    def width(self) -> int:
        return 2 * self.embed_dim + sum(self.last_dims)

    def columns(self, kind: str) -> slice:
        """Columns of feature ``kind`` (one of :data:`FEATURE_KINDS`)."""
        e = self.embed_dim
        if kind == "cls":
            return slice(0, e)
        if kind == "cls_patch_mean":
            return slice(0, 2 * e)
        if kind == "last4_cls":
            return slice(2 * e, self.width)
        raise ConfigError("features", kind, list(FEATURE_KINDS))

    def dim(self, kind: str) -> int:
        cols = self.columns(kind)
        return cols.stop - cols.start


def _last_stages(encoder: CNNSliceEncoder) -> list[int]:
    return list(range(max(0, encoder.depth - N_LAST_BLOCKS), encoder.depth))


def encode_deduplicated(encode: Callable[[torch.Tensor], T], slices: torch.Tensor) -> T:
    """``encode(slices)`` with each distinct constant slice encoded once.

    Args:
        encode: maps slices ``[M, C, h, w]`` to a tensor ``[M, ...]`` or a dict of them.
        slices: ``[N, C, h, w]``.

    Exact for encoders that treat every slice on its own (ViTs; CNNs with BatchNorm in eval
    mode). Differentiable: gradients reach the encoder through the shared copies.
    """
    n, c = slices.shape[:2]
    if n <= 1:
        return encode(slices)
    flat = slices.detach().reshape(n, c, -1)
    constant = (flat.amax(-1) == flat.amin(-1)).all(-1)
    if int(constant.sum()) <= 1:
        return encode(slices)
    values = flat[constant][:, :, 0]
    unique, inverse = torch.unique(values, dim=0, return_inverse=True)
    varying = torch.nonzero(~constant).flatten()
    first_of = torch.full((unique.shape[0],), -1, dtype=torch.long, device=slices.device)
    const_rows = torch.nonzero(constant).flatten()
    for row, group in zip(const_rows.tolist(), inverse.tolist()):
        if first_of[group] < 0:
            first_of[group] = row
    picked = torch.cat([varying, first_of])
    encoded = encode(slices[picked])
    # position of every input slice in `picked`
    where = torch.empty(n, dtype=torch.long)
    where[varying] = torch.arange(len(varying))
    where[const_rows] = len(varying) + inverse
    where = where.to(slices.device)
    if isinstance(encoded, dict):
        return {k: v.index_select(0, where) for k, v in encoded.items()}  # type: ignore[return-value]
    return encoded.index_select(0, where)


def encode_for_evaluation(encoder: SliceEncoder, slices: torch.Tensor) -> torch.Tensor:
    """Frozen features ``[N, F]`` of slices ``[N, 3, h, w]`` in :class:`FeatureLayout` order.

    ``F = 2E + sum(last_dims)``: class token, mean patch token, then the class tokens of the
    last four blocks (ViT, each through the final norm) or the pooled last four stages (CNN).
    Runs in chunks of ``encoder.chunk_size`` without gradients.
    """
    encoder.check_input(slices)
    parts: list[torch.Tensor] = []
    with torch.inference_mode():
        for start in range(0, slices.shape[0], encoder.chunk_size):
            chunk = slices[start : start + encoder.chunk_size]
            if isinstance(encoder, CNNSliceEncoder):
                pools = encoder.stage_pools(chunk, _last_stages(encoder))
                pooled = pools[-1]
                parts.append(torch.cat([pooled, pooled, *pools], dim=1))
                continue
            n_last = min(N_LAST_BLOCKS, encoder.depth)
            with encoder._autocast_context(chunk.device):
                final, intermediates = encoder.backbone.forward_intermediates(
                    chunk, indices=n_last, return_prefix_tokens=True, norm=True, output_fmt="NCHW"
                )
            prefix = encoder.num_prefix_tokens
            cls = final[:, 0].float()
            patch_mean = final[:, prefix:].mean(dim=1).float()
            layer_cls = [tokens[:, 0].float() for _, tokens in intermediates]
            parts.append(torch.cat([cls, patch_mean, *layer_cls], dim=1))
    return torch.cat(parts)


class EvaluationFeatures:
    """Every frozen evaluation feature per slice, ``embedding [D, F]`` in :class:`FeatureLayout` order.

    The feature source of :func:`evaluation_embedder`: volumes whose slices have one shape
    are encoded in one pass, each distinct constant slice once (exact; see the module
    docstring) unless ``dedupe_constant_slices`` is off.
    """

    # the cache key settings of every evaluation entry (unchanged since the layout's v1)
    key_settings = {"evaluation_features": _LAYOUT_TAG, "features": "cls", "planes": ["axial"]}

    def __init__(self, encoder: SliceEncoder, dedupe_constant_slices: bool = True):
        self.encoder = encoder
        self.layout = FeatureLayout.of(encoder)
        self.dedupe_constant_slices = dedupe_constant_slices
        self.encoded_slices = 0

    def compute(self, images: Sequence[torch.Tensor], device: torch.device) -> list[dict[str, np.ndarray]]:
        from volumes.encoders import volume_to_slices
        from volumes.networks import slice_spacing_mm

        if len({tuple(image.shape[:3]) for image in images}) > 1:
            return [self.compute([image], device)[0] for image in images]
        stacks = [volume_to_slices((image.as_tensor() if hasattr(image, "as_tensor") else image)[None])
                  for image in images]
        slices = torch.cat(stacks).to(device).float()  # [sum D_i, 3, H, W]

        def encode(batch: torch.Tensor) -> torch.Tensor:
            self.encoded_slices += int(batch.shape[0])
            return encode_for_evaluation(self.encoder, batch)

        features = encode_deduplicated(encode, slices) if self.dedupe_constant_slices else encode(slices)
        features = features.cpu().numpy().astype(np.float32)
        out, start = [], 0
        for image, stack in zip(images, stacks):
            depth = stack.shape[0]
            spacing = float(slice_spacing_mm(image.unsqueeze(0), 4)[0])
            out.append({"embedding": features[start : start + depth],
                        "positions": np.arange(depth, dtype=np.float32) * spacing})
            start += depth
        return out


def evaluation_embedder(
    encoder: SliceEncoder,
    transform: Callable[[dict], dict],
    preprocessing: Mapping[str, Any],
    cache_dir: str | Path | None = None,
    *,
    label_key: str = "class_label",
    device: str | torch.device = "cpu",
    progress: bool = True,
    dedupe_constant_slices: bool = True,
) -> SliceEmbedder:
    """The :class:`~volumes.embedding.SliceEmbedder` of the evaluation protocols.

    Items come out as ``{"embedding" [D, F], "positions" [D], "case_id", "label"}`` with
    ``F = embedder.features.layout.width``; entries are keyed by content only (the
    protocols look them up and encode the misses in batches, :meth:`SliceEmbedder.embed_items`).
    """
    features = EvaluationFeatures(encoder, dedupe_constant_slices=dedupe_constant_slices)
    return SliceEmbedder(features, transform, preprocessing, cache_dir=cache_dir, label_key=label_key, device=device,
                         progress=progress, source_keys=False)


@dataclass
class FeatureSet:
    """Fixed-length feature vectors with labels: one row per volume, or per slice for slice tasks.

    Attributes:
        x: ``[N, F]`` float32 features.
        y: ``[N]`` int64 class labels.
        ids: row names (``case_id`` or ``case_id#slice``).
        groups: the case each row comes from.
    """

    x: np.ndarray
    y: np.ndarray
    ids: list[str] = field(default_factory=list)
    groups: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def subset(self, rows: Sequence[int] | np.ndarray) -> "FeatureSet":
        rows = np.asarray(rows, dtype=np.int64)
        return FeatureSet(self.x[rows], self.y[rows], [self.ids[i] for i in rows], [self.groups[i] for i in rows])


def standardize(reference: np.ndarray, *arrays: np.ndarray) -> list[np.ndarray]:
    """Centre and scale ``arrays`` (and ``reference``) with the column mean and std of ``reference``.

    Raw features of a random-initialised encoder share a large offset with little spread
    between cases; cosine similarity and logistic regression then see mostly that offset.
    Returns ``[reference, *arrays]`` standardised, float32.
    """
    mean = reference.mean(axis=0, keepdims=True)
    std = reference.std(axis=0, keepdims=True)
    std = np.where(std > 1e-6, std, 1.0)
    return [((a - mean) / std).astype(np.float32) for a in (reference, *arrays)]

"""Encode once, many heads: bundles that share an encoder run it once per volume.

When several bundles of one ``volumes infer`` run have the same encoder (name, a hash of
its weights, the options that change its features) and the same slice preparation, the
runner encodes each case's slices once and hands the features to every head: the class
token (and mean patch token) to a classifier's aggregator, the patch grids to a
segmenter's decoder and 3D refinement.

How the heads get them without changing the networks: while a member of a group
predicts, its network's ``encoder`` is replaced by a :class:`FeatureMemo`, which answers
each slice it is asked for from the features computed once for the case, keyed by the
slice's bytes. A slice the memo does not hold (a padded slab border, a bundle whose
preparation differs after all) goes through the real encoder, so the results are those
of separate runs whatever the memo holds; only float rounding of a different chunking
differs (tested to 1e-5, identical label maps).

Memory: the features of every slice of a case are kept while the group's members run
(CLS ``[D, E]`` and the segmenters' grids ``L x [D, E, h, w]``: 75 MiB for 200 slices of a
ViT-S at 112 px with four grids), where separate runs keep one slab's worth.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import nn

from volumes.encoders.slice_encoder import SliceEncoder, SliceFeatures, volume_to_slices

__all__ = ["EncoderSharing", "FeatureMemo", "encoder_identity"]


def _network(model: Any) -> nn.Module | None:
    return getattr(getattr(model, "predictor", None), "network", None)


def _encoder(model: Any) -> SliceEncoder | None:
    """The network's slice encoder: a torch one or another backend's (``torch_encoder`` inside)."""
    encoder = getattr(_network(model), "encoder", None)
    return encoder if isinstance(encoder, SliceEncoder) or hasattr(encoder, "torch_encoder") else None


def encoder_identity(model: Any) -> str | None:
    """What decides a bundle's encoder features: a hex digest, or None when it cannot share.

    The encoder's class and name, the hash of its parameters
    (:meth:`SliceEncoder.fingerprint`, which tells two random initialisations apart), the
    options that change its output (autocast, intermediate norm, position-grid
    interpolation), the device, the backend (``backend`` attribute, ``torch`` by default)
    and the slice preparation (the bundle's ``preprocessing`` setting). A classifier
    reading other planes than the axial one does not share.
    """
    encoder = _encoder(model)
    preparation = getattr(model, "settings", {}).get("preprocessing")
    if encoder is None or preparation is None:
        return None
    if tuple(getattr(_network(model), "planes", ("axial",))) != ("axial",):
        return None
    content = {
        "class": type(encoder).__name__, "name": encoder.name, "weights": encoder.fingerprint(),
        "autocast": encoder.autocast, "norm_intermediates": getattr(encoder, "norm_intermediates", None),
        "pos_embed_interpolation": getattr(encoder, "pos_embed_interpolation", None),
        "device": str(model.predictor.device), "backend": getattr(encoder, "backend", "torch"),
        "preprocessing": preparation,
    }
    return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()


def _slice_key(slice_: torch.Tensor) -> bytes:
    """A digest of one slice ``[3, h, w]`` (float32 bytes and shape)."""
    data = slice_.detach().float().cpu().contiguous()
    digest = hashlib.blake2b(str(tuple(data.shape)).encode(), digest_size=16)
    digest.update(memoryview(data.numpy()).cast("B"))
    return digest.digest()


class FeatureMemo(nn.Module):
    """Stands in for a :class:`SliceEncoder`: answers slices from features computed once.

    ``forward(slices [N, 3, h, w], with_grids=True) -> SliceFeatures`` like the encoder;
    other attributes (``patch_size``, ``embed_dim``, ``layers``...) are the wrapped
    encoder's. ``hits`` / ``misses`` count slices answered from the memo / encoded.
    """

    def __init__(self, encoder: SliceEncoder, store: dict[bytes, dict[str, Any]]):
        super().__init__()
        self.encoder = encoder
        self.store = store
        self.hits = 0
        self.misses = 0

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("encoder"), name)

    def _entry(self, key: bytes, with_grids: bool) -> dict[str, Any] | None:
        entry = self.store.get(key)
        if entry is None or (with_grids and any(i not in entry["grids"] for i in self.encoder.layers)):
            return None
        return entry

    def forward(self, slices: torch.Tensor, *, with_grids: bool = True) -> SliceFeatures:
        entries = [self._entry(_slice_key(s), with_grids) for s in slices]
        missing = [i for i, e in enumerate(entries) if e is None]
        computed = self.encoder(slices[missing], with_grids=with_grids) if missing else None
        self.hits += len(slices) - len(missing)
        self.misses += len(missing)
        position = {index: n for n, index in enumerate(missing)}

        def pick(name: str, i: int, layer: int | None = None) -> torch.Tensor:
            if entries[i] is not None:
                return entries[i]["grids"][layer] if layer is not None else entries[i][name]
            part = computed.patch_grids[self.encoder.layers.index(layer)] if layer is not None else getattr(computed, name)
            return part[position[i]]

        n = range(len(slices))
        device = slices.device
        stack = lambda items: torch.stack(items).to(device)  # noqa: E731
        grids = tuple(stack([pick("", i, layer) for i in n]) for layer in self.encoder.layers) if with_grids else ()
        return SliceFeatures(cls=stack([pick("cls", i) for i in n]), registers=stack([pick("registers", i) for i in n]),
                             patch_mean=stack([pick("patch_mean", i) for i in n]), patch_grids=grids)


@dataclass
class _Group:
    """Bundles (in run order) that share one encoder, and the current case's features."""

    members: list[Any]
    store: dict[bytes, dict[str, Any]] = field(default_factory=dict)
    encoded: int = 0  # slices the last fill ran through the encoder

    @property
    def layers(self) -> tuple[int, ...]:
        """Union of the grid layers the members' heads read (segmenters), in first-seen order."""
        seen: dict[int, None] = {}
        for model in self.members:
            if model.task == "segmentation":
                seen.update(dict.fromkeys(_encoder(model).layers))
        return tuple(seen)

    def fill(self, image: torch.Tensor, encoder: SliceEncoder, device: torch.device) -> None:
        """Encode every slice of ``image [3, H, W, D]`` once, with the union of the grid layers."""
        self.store = {}
        raw = image.as_tensor() if hasattr(image, "as_tensor") else image
        slices = volume_to_slices(raw[None].to(device).float())
        layers = self.layers
        saved = encoder.layers
        encoder.layers = layers or saved  # the union for this pass only: the grids every head reads
        try:
            features = encoder(slices, with_grids=bool(layers))
        finally:
            encoder.layers = saved
        self.encoded = len(slices)
        for i, slice_ in enumerate(slices):
            self.store[_slice_key(slice_)] = {
                "cls": features.cls[i], "registers": features.registers[i], "patch_mean": features.patch_mean[i],
                "grids": {layer: grid[i] for layer, grid in zip(layers, features.patch_grids)},
            }


class EncoderSharing:
    """Groups a run's bundles by :func:`encoder_identity` and runs their encoder once per case.

    Args:
        models: the run's bundles (:class:`~volumes.inference.bundles.BundleModel`), in run order.
        enabled: False keeps every bundle on its own encoder (``volumes infer --no-share-encoder``).

    ``groups`` lists the bundle ids of every group of two or more. :meth:`predict` is the
    runner's one call per bundle and case.
    """

    def __init__(self, models: Sequence[Any], *, enabled: bool = True):
        self.enabled = enabled
        by_identity: dict[str, list[Any]] = {}
        if enabled:
            for model in models:
                identity = encoder_identity(model)
                if identity is not None:
                    by_identity.setdefault(identity, []).append(model)
        self._groups = [_Group(members) for members in by_identity.values() if len(members) > 1]
        self._group_of = {m.bundle_id: g for g in self._groups for m in g.members}
        self.last_memo: dict[str, FeatureMemo] = {}  # per bundle id, for tests and benchmarks
        self.last_report: dict[str, dict[str, Any]] = {}  # per bundle id: see predict

    @property
    def groups(self) -> list[list[str]]:
        return [[m.bundle_id for m in g.members] for g in self._groups]

    @contextlib.contextmanager
    def _installed(self, model: Any, group: _Group) -> Iterator[FeatureMemo]:
        network = _network(model)
        encoder = network.encoder
        memo = FeatureMemo(encoder, group.store)
        network.encoder = memo
        try:
            yield memo
        finally:
            network.encoder = encoder

    def predict(self, model: Any, data: Mapping[str, Any]) -> dict[str, Any]:
        """``model.predictor.predict(data)``, from the shared features when ``model`` is in a group.

        For a member of a group, ``last_report[bundle_id]`` then says what its prediction
        read: the group, the slices the shared pass encoded (the first member's report),
        the slices answered from it (``reused``) and those encoded again (``encoded_again``).

        The group's first member encodes the case (its prepared ``image [3, H, W, D]``);
        the store is emptied after the last member, so features never outlive the case.
        """
        group = self._group_of.get(model.bundle_id)
        if group is None:
            return model.predictor.predict(data)
        first, last = group.members[0] is model, group.members[-1] is model
        try:
            if first:
                with torch.inference_mode():
                    group.fill(data["image"], _encoder(model), torch.device(model.predictor.device))
            with self._installed(model, group) as memo:
                result = model.predictor.predict(data)
            self.last_memo[model.bundle_id] = memo
            self.last_report[model.bundle_id] = {
                "group": [m.bundle_id for m in group.members], "encoded_once": group.encoded if first else 0,
                "reused": memo.hits, "encoded_again": memo.misses}
            return result
        finally:
            if last:
                group.store = {}

"""Volume-level networks: ordinary MONAI networks from the outside.

``SliceClassifier``: volume ``[B, 3, H, W, D]`` -> logits ``[B, K]``.
``SliceSegmenter``: volume ``[B, 3, H, W, D]`` -> logits ``[B, K, H, W, D]``.
The volume is prepared by :func:`volumes.transforms.preprocessing` (slicing axis last,
``H`` and ``W`` multiples of the patch size, ImageNet-normalised channels).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from volumes.aggregators import build_aggregator, concat_planes
from volumes.decoders import DECODERS, Refine3D
from volumes.encoders import SliceEncoder, volume_to_slices
from volumes.errors import ConfigError

FEATURES = ("cls", "cls_patch_mean")
PLANES = ("axial", "coronal", "sagittal")
# Where each plane's slicing axis sits in the prepared volume [B, C, H, W, D] whose last
# axis is the axial one (see PrepareSlicesd: axial keeps [X, Y, Z]).
_PLANE_AXIS = {"axial": 4, "coronal": 3, "sagittal": 2}


def slice_spacing_mm(volume: torch.Tensor, axis: int) -> torch.Tensor:
    """Per-case spacing ``[B]`` in mm along spatial ``axis`` (2, 3 or 4) of ``[B, C, H, W, D]``.

    Read from a MONAI MetaTensor's batched affine; 1 mm (i.e. slice index) for plain tensors.
    """
    affine = getattr(volume, "affine", None)
    if affine is None or not isinstance(affine, torch.Tensor):
        return torch.ones(volume.shape[0], device=volume.device)
    from monai.data.utils import affine_to_spacing

    affine = affine if affine.ndim == 3 else affine.unsqueeze(0).expand(volume.shape[0], -1, -1)
    return torch.stack([affine_to_spacing(a, r=3)[axis - 2] for a in affine]).float().to(volume.device)


class SliceClassifier(nn.Module):
    """SliceEncoder + aggregator: a volume classifier from slice embeddings.

    Args:
        num_classes: number of logits ``K``.
        encoder: timm DINOv2/DINOv3 name, or a ready :class:`SliceEncoder`.
        aggregator: ``transformer``, ``gnn``, ``mean`` or ``attention_mil``.
        features: ``cls`` (class token, ``E``) or ``cls_patch_mean`` (class token and mean
            patch token concatenated, ``2E``) per slice.
        planes: which slice planes to embed; several planes form one token stream with a
            plane id per slice (aggregators get ``planes=len(planes)``).
        encoder_kwargs: passed to :class:`SliceEncoder` (``weights``, ``mode``, ``chunk_size``...).
        aggregator_kwargs: passed to the aggregator class.

    ``forward(volume [B, 3, H, W, D], mask [B, D] | None) -> logits [B, K]``. ``mask`` marks
    real slices when volumes of different depth were padded into one batch. Slice
    positions in mm come from the MetaTensor affine when there is one.
    """

    def __init__(
        self,
        num_classes: int = 2,
        encoder: str | SliceEncoder = "vit_small_patch14_dinov2",
        aggregator: str = "transformer",
        *,
        features: str = "cls",
        planes: Sequence[str] = ("axial",),
        encoder_kwargs: dict | None = None,
        aggregator_kwargs: dict | None = None,
    ):
        super().__init__()
        if features not in FEATURES:
            raise ConfigError("features", features, list(FEATURES))
        planes = tuple(planes)
        if not planes or any(p not in PLANES for p in planes) or len(set(planes)) != len(planes):
            raise ConfigError("planes", list(planes), f"distinct values from {list(PLANES)}")
        self.encoder = encoder if isinstance(encoder, SliceEncoder) else SliceEncoder(encoder, **(encoder_kwargs or {}))
        self.features = features
        self.planes = planes
        self.embed_dim = self.encoder.embed_dim * (2 if features == "cls_patch_mean" else 1)
        kwargs = dict(aggregator_kwargs or {})
        if len(planes) > 1:
            kwargs.setdefault("planes", len(planes))
        self.aggregator = build_aggregator(aggregator, self.embed_dim, num_classes, **kwargs)
        self.aggregator_name = aggregator

    # ------------------------------------------------------------------ embedding
    def _plane_slices(self, volume: torch.Tensor, plane: str) -> torch.Tensor:
        """``[B, 3, H, W, D]`` -> slices ``[B, n, 3, h, w]`` of one plane, sized to the patch grid."""
        axis = _PLANE_AXIS[plane]
        others = [a for a in (2, 3, 4) if a != axis]
        slices = volume.permute(0, axis, 1, *others)  # [B, n, 3, h, w]
        if plane == "axial":
            return slices  # prepared by PrepareSlicesd: already on the patch grid
        b, n, c, h, w = (int(v) for v in slices.shape)
        p = self.encoder.patch_size
        target = (max(p, round(h / p) * p), max(p, round(w / p) * p))
        if (h, w) != target:  # coronal/sagittal planes have the slice axis in-plane: fit it to the grid
            slices = F.interpolate(slices.reshape(b * n, c, h, w), size=target, mode="bilinear", align_corners=False)
            slices = slices.reshape(b, n, c, *target)
        return slices

    def embed(self, volume: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``[B, 3, H, W, D]`` -> embeddings ``[B, S, E']``, positions in mm ``[B, S]``, plane ids ``[B, S]``.

        ``S = D`` for the axial plane alone; several planes are concatenated.
        """
        xs, positions = [], []
        raw = volume.as_tensor() if hasattr(volume, "as_tensor") else volume
        for plane in self.planes:
            slices = self._plane_slices(raw, plane)
            b, n = slices.shape[:2]
            feats = self.encoder(slices.reshape(b * n, *slices.shape[2:]).float(), with_grids=False)
            per_slice = feats.cls if self.features == "cls" else torch.cat([feats.cls, feats.patch_mean], dim=-1)
            xs.append(per_slice.reshape(b, n, -1))
            spacing = slice_spacing_mm(volume, _PLANE_AXIS[plane])
            positions.append(torch.arange(n, device=raw.device, dtype=torch.float32)[None] * spacing[:, None])
        if len(xs) == 1:
            return xs[0], positions[0], None
        x, _, pos, plane_ids = concat_planes(xs, None, positions)
        return x, pos, plane_ids

    def _mask_for(self, mask: torch.Tensor | None, plane_ids: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor | None:
        if mask is None or plane_ids is None:
            return mask
        # The mask marks padded axial slices; other planes are never padded along their own axis.
        full = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        full[:, : mask.shape[1]] = mask
        return full

    # -------------------------------------------------------------------- forward
    def forward(self, volume: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x, positions, plane_ids = self.embed(volume)
        return self.aggregator(x, self._mask_for(mask, plane_ids, x), positions, plane_ids)

    def forward_with_importance(
        self, volume: torch.Tensor, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits ``[B, K]`` and per-slice importance ``[B, S]`` (sums to 1 over real slices)."""
        x, positions, plane_ids = self.embed(volume)
        return self.aggregator.forward_with_importance(x, self._mask_for(mask, plane_ids, x), positions, plane_ids)


class SliceSegmenter(nn.Module):
    """SliceEncoder + UNet-shaped 2D decoder per slice, stacked to 3D, with optional 3D refinement.

    Args:
        num_classes: ``K`` output channels (background included).
        encoder: timm DINOv2/DINOv3 name, or a ready :class:`SliceEncoder` (its four
            ``layers`` feed the decoder, shallow to deep).
        decoder: the 2D decoder: ``light`` (:class:`~volumes.decoders.LightSliceDecoder`,
            0.10 x a 12-block ViT-S/14's FLOPs at 112 px) or ``unetr``
            (:class:`~volumes.decoders.SliceUNetDecoder`, MONAI UNETR blocks, 0.39 x; the
            default before issue 18, so every older checkpoint holds it). Phantom-test Dice
            of the two is within 0.01 (docs/PERFORMANCE.md, "A cheaper decoder"). Their
            weights are not interchangeable.
        feature_size: decoder channels at full resolution.
        refine: add :class:`Refine3D`, a light 3D head over the stacked decoder features
            that adds inter-slice context (its output starts at zero).
        chunk_size: slices decoded per pass; bounds memory at inference. Defaults to
            the encoder's ``chunk_size``.
        encoder_kwargs: passed to :class:`SliceEncoder`.

    ``forward(volume [B, 3, H, W, D]) -> logits [B, K, H, W, D]``; ``H`` and ``W`` are
    multiples of the encoder's patch size and even. Works with MONAI's
    ``sliding_window_inference`` with ``roi_size=(-1, -1, n)`` (windows along the slices).
    """

    def __init__(
        self,
        num_classes: int = 7,
        encoder: str | SliceEncoder = "vit_small_patch14_dinov2",
        *,
        decoder: str = "light",
        feature_size: int = 16,
        refine: bool = True,
        chunk_size: int | None = None,
        encoder_kwargs: dict | None = None,
    ):
        super().__init__()
        if num_classes < 2:
            raise ConfigError("num_classes", num_classes, "an integer >= 2 (background + organs)")
        if decoder not in DECODERS:
            raise ConfigError("decoder", decoder, list(DECODERS))
        self.encoder = encoder if isinstance(encoder, SliceEncoder) else SliceEncoder(encoder, **(encoder_kwargs or {}))
        if len(self.encoder.layers) != 4:
            raise ConfigError("encoder layers", list(self.encoder.layers), "exactly four block indices")
        self.num_classes = int(num_classes)
        self.decoder_name = decoder
        self.decoder = DECODERS[decoder](self.encoder.embed_dim, in_channels=3, feature_size=feature_size,
                                         patch_size=self.encoder.patch_size)
        self.head = nn.Conv2d(feature_size, num_classes, kernel_size=1)
        self.refine = Refine3D(feature_size, num_classes) if refine else None
        self.chunk_size = int(chunk_size or self.encoder.chunk_size)
        # a volumes.quality.SegmentationProbe while one is attached (volumes.quality.attached)
        self.qc_probe = None

    def _decode(self, slices: torch.Tensor) -> torch.Tensor:
        """Slices ``[n, 3, H, W]`` -> decoder features ``[n, F, H, W]``."""
        encoded = self.encoder(slices, with_grids=True)
        if self.qc_probe is not None:  # quality control: the slices' class tokens
            self.qc_probe.add_slices(slices, encoded.cls)
        return self.decoder(encoded.patch_grids, slices)

    def per_slice(self, slices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Slices ``[n, 3, H, W]`` -> decoder features ``[n, F, H, W]`` and 2D logits ``[n, K, H, W]``.

        ``chunk_size`` slices at a time. Each slice's results depend on that slice alone
        (the encoder and the 2D decoder see one slice; their norms are per slice), so
        they can be computed once and shared between overlapping slabs
        (:class:`volumes.segmentation.SlabInferer`).
        """
        slices = slices.float()
        if torch.jit.is_tracing():  # one pass: a traced loop would fix the slice count
            features = self._decode(slices)
        else:
            features = torch.cat([self._decode(part) for part in slices.split(self.chunk_size)])
        return features, self.head(features)

    def combine(self, features: torch.Tensor, logits: torch.Tensor, batch: int) -> torch.Tensor:
        """Per-slice results of :meth:`per_slice` for ``batch`` cases (batch-major) -> logits ``[B, K, H, W, D]``.

        The 2D logits stacked along the slices, plus the 3D refinement over all ``D``
        slices given (its instance norm sees all of them, so it depends on the slab).
        """
        stacked = self._stack(logits, batch)
        if self.refine is not None:
            refined = stacked + self.refine(self._stack(features, batch))
            if self.qc_probe is not None:  # quality control: where the 3D refinement changed the 2D answer
                self.qc_probe.add_slab(stacked, refined)
            stacked = refined
        return stacked

    @staticmethod
    def _slices_of(volume: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W, D]`` -> slices ``[B*D, 3, H, W]`` (batch-major), after checking the shape."""
        raw = volume.as_tensor() if hasattr(volume, "as_tensor") else volume
        if raw.ndim != 5 or raw.shape[1] != 3:
            raise ValueError(f"SliceSegmenter expects volumes [B, 3, H, W, D]; got shape {tuple(raw.shape)}")
        return volume_to_slices(raw)

    @staticmethod
    def _stack(per_slice: torch.Tensor, batch: int) -> torch.Tensor:
        """``[B*D, C, H, W]`` -> ``[B, C, H, W, D]``."""
        n, c, h, w = per_slice.shape
        return per_slice.reshape(batch, n // batch, c, h, w).permute(0, 2, 3, 4, 1)

    def forward(self, volume: torch.Tensor) -> torch.Tensor:
        return self.combine(*self.per_slice(self._slices_of(volume)), volume.shape[0])

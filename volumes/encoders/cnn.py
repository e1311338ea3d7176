"""CNN slice encoders: a supervised timm CNN (e.g. ResNet-50) behind the ``SliceEncoder`` interface.

The evaluation protocols compare DINOv2/DINOv3 ViTs with a supervised ImageNet CNN
baseline, and everything downstream (``SliceClassifier``, ``SliceEmbedder``, the
embedding cache) takes a :class:`~volumes.encoders.SliceEncoder`. So the CNN adapter
is a ``SliceEncoder`` subclass returning the same :class:`SliceFeatures`, with these
meanings for a CNN:

* ``cls``: the global average pool of the last stage, ``[N, C]`` (what timm's
  classifier head reads);
* ``patch_mean``: the mean of the last stage's grid, which for a CNN *is* the global
  average pool, so it equals ``cls`` (``cls_patch_mean`` features repeat it);
* ``registers``: ``[N, 0, C]``;
* ``patch_grids``: the feature maps of the requested stages, ``[N, C_l, h_l, w_l]``;
  unlike a ViT's they differ in channels and resolution from stage to stage.

``patch_size`` is the last stage's stride (32 for a ResNet), so slices prepared for
it (:func:`volumes.transforms.preprocessing` with ``patch_size=encoder.patch_size``)
give whole feature-map cells. Build either kind by name with :func:`build_slice_encoder`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import timm
import torch
from torch import nn

from volumes.encoders.registry import register_encoder_family
from volumes.encoders.slice_encoder import SliceEncoder, SliceFeatures, check_encoder_options
from volumes.errors import ConfigError, WeightsError

__all__ = ["CNN_FAMILIES", "CNNSliceEncoder", "cnn_encoder_names"]

#: timm name patterns of the CNN families the adapter accepts.
CNN_FAMILIES: tuple[str, ...] = ("resnet*", "resnext*", "wide_resnet*", "seresnet*", "convnext*", "efficientnet*",
                                 "densenet*", "regnet*")


def cnn_encoder_names() -> list[str]:
    """Every timm CNN name :class:`CNNSliceEncoder` accepts (the families of :data:`CNN_FAMILIES`)."""
    return sorted(set(timm.list_models(list(CNN_FAMILIES))))


@register_encoder_family("timm CNN", accepts=lambda name: name in cnn_encoder_names(), example="resnet50",
                         listing="volumes.encoders.cnn_encoder_names()")
class CNNSliceEncoder(SliceEncoder):
    """Embeds 2D slices with a timm CNN, with the outputs and modes of :class:`SliceEncoder`.

    Args:
        name: a timm CNN from :func:`cnn_encoder_names`, e.g. ``resnet50``.
        pretrained: timm's hub weights (supervised ImageNet; needs network access).
        weights: a local timm-format state dict (``.safetensors``, ``.pth``, ``.pt``, ``.bin``),
            e.g. ``model.state_dict()`` of ``timm.create_model(name)``; classifier keys are ignored.
        layers: stage indices whose feature maps are returned as ``patch_grids`` (negative
            counts from the end); default: the last four stages.
        mode: ``frozen``, ``finetune`` or ``last_n`` (the last ``trainable_blocks`` stages train).
        trainable_blocks: how many stages train in ``last_n`` mode.
        chunk_size: slices per forward pass.
        autocast: ``auto`` (bf16 on CUDA), ``bf16`` or ``fp32``.
        random_zero_init_last: without weights, keep timm's zero-initialised last BatchNorm of
            each residual block (``True``) or not (``False``, the default). Zero init makes a
            random ResNet's blocks output nothing, so every stage after the stem passes its input
            through; ``False`` makes the random CNN a real random-feature baseline (the CNN
            counterpart of ``SliceEncoder(random_layer_scale=1.0)``). Only ResNet-family models
            have the option; others ignore it.
        model_kwargs: passed to ``timm.create_model``.
    """

    def __init__(
        self,
        name: str = "resnet50",
        *,
        pretrained: bool = False,
        weights: str | Path | None = None,
        layers: Sequence[int] | None = None,
        mode: str = "frozen",
        trainable_blocks: int = 1,
        chunk_size: int = 32,
        autocast: str = "auto",
        random_zero_init_last: bool = False,
        model_kwargs: dict | None = None,
    ):
        # SliceEncoder.__init__ builds a ViT (position grids, LayerScale, ViT weight formats);
        # this class sets the same attributes for a CNN and reuses the rest of SliceEncoder.
        nn.Module.__init__(self)
        known = cnn_encoder_names()
        if name not in known:
            raise ConfigError("encoder", name, f"a timm CNN such as resnet50 ({len(known)} names: cnn_encoder_names())")
        check_encoder_options(mode=mode, autocast=autocast, chunk_size=chunk_size, pretrained=pretrained,
                              weights=weights)

        self.name = name
        self.chunk_size = int(chunk_size)
        self.autocast = autocast
        self.norm_intermediates = False
        self.pos_embed_interpolation = None
        kwargs = dict(model_kwargs or {})
        if not pretrained and weights is None and not random_zero_init_last and name in timm.list_models(module="resnet"):
            kwargs.setdefault("zero_init_last", False)
        self.backbone = timm.create_model(name, pretrained=pretrained, num_classes=0, **kwargs)
        if weights is not None:
            _load_cnn_weights(self.backbone, Path(weights), name)
        self.weights_id = self._weights_id(pretrained, weights)

        info = self.backbone.feature_info
        stages = info.get_dicts() if hasattr(info, "get_dicts") else list(info)
        depth = len(stages)
        if any(not -depth <= i < depth for i in (layers or ())):
            raise ConfigError("layers", list(layers or ()), f"stage indices in [-{depth}, {depth - 1}]")
        self.stage_modules: tuple[str, ...] = tuple(str(s["module"]) for s in stages)
        self.layers = tuple(i % depth for i in (layers if layers is not None else range(max(0, depth - 4), depth)))
        self.embed_dim: int = int(self.backbone.num_features)
        self.patch_size: int = int(stages[-1]["reduction"])
        self.num_prefix_tokens = 0
        self.num_registers = 0
        self.depth = depth
        self.mode = mode
        self._set_trainable(mode, trainable_blocks)

    def _set_trainable(self, mode: str, trainable_blocks: int) -> None:
        if mode == "last_n" and not 1 <= trainable_blocks <= self.depth:
            raise ConfigError("trainable_blocks", trainable_blocks, f"1..{self.depth}")
        for p in self.backbone.parameters():
            p.requires_grad = mode == "finetune"
        if mode == "last_n":
            for module_name in self.stage_modules[-trainable_blocks:]:
                for p in self.backbone.get_submodule(module_name).parameters():
                    p.requires_grad = True
        if mode == "frozen":
            self.backbone.eval()

    def fingerprint(self) -> str:
        """sha256 of the current parameters and buffers (as :meth:`SliceEncoder.fingerprint`).

        Also hashes 0-d buffers such as BatchNorm's ``num_batches_tracked``, which a ViT has not.
        """
        import hashlib

        digest = hashlib.sha256(self.name.encode())
        for name, tensor in self.backbone.state_dict().items():
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()

    def stage_of(self, parameter_name: str) -> int:
        """Stage index (0 = stem) of a backbone parameter, for layer-wise learning rates.

        Parameters before the first listed stage module count as stage 0; a parameter after the
        last one (e.g. a head norm) as ``depth``.
        """
        top = parameter_name.split(".")[0]
        tops = [m.split(".")[0] for m in self.stage_modules]
        if top in tops:
            return tops.index(top)
        order = [n.split(".")[0] for n, _ in self.backbone.named_children()]
        if top in order and tops[-1] in order and order.index(top) > order.index(tops[-1]):
            return self.depth
        return 0

    def check_input(self, slices: torch.Tensor) -> None:
        if slices.ndim != 4 or slices.shape[1] != 3:
            raise ValueError(f"{type(self).__name__} expects slices [N, 3, h, w]; got shape {tuple(slices.shape)}")
        h, w = slices.shape[-2:]
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(
                f"slice size {h}x{w} is not a multiple of the stride {self.patch_size} of {self.name}; "
                "prepare slices with volumes.transforms.PrepareSlicesd(patch_size=encoder.patch_size)"
            )

    def _encode_chunk(self, slices: torch.Tensor, with_grids: bool) -> SliceFeatures:
        with self._autocast_context(slices.device):
            if with_grids:
                final, grids = self.backbone.forward_intermediates(slices, indices=list(self.layers))
            else:
                final, grids = self.backbone.forward_features(slices), []
        pooled = final.float().mean(dim=(2, 3))
        return SliceFeatures(
            cls=pooled,
            registers=pooled.new_zeros(pooled.shape[0], 0, pooled.shape[1]),
            patch_mean=pooled,
            patch_grids=tuple(g.float() for g in grids),
        )

    def stage_pools(self, slices: torch.Tensor, stages: Sequence[int]) -> list[torch.Tensor]:
        """Global average pools ``[N, C_l]`` of the given stages' feature maps (one chunk, no chunking)."""
        with self._autocast_context(slices.device):
            grids = self.backbone.forward_intermediates(slices, indices=list(stages), intermediates_only=True)
        return [g.float().mean(dim=(2, 3)) for g in grids]


def _load_cnn_weights(backbone: nn.Module, path: Path, name: str) -> None:
    """Load a timm-format state dict into ``backbone`` (no classifier); WeightsError on any mismatch."""
    if not path.exists():
        raise WeightsError(path, "no such file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any reader error means "not a usable weights file"
        raise WeightsError(path, f"cannot read it as a state dict ({type(exc).__name__}: {exc})") from exc
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(path, "does not hold a flat state dict of tensors")
    head = backbone.default_cfg.get("classifier", "fc")
    state = {k: v for k, v in state.items() if not k.startswith(f"{head}.")}
    expected = backbone.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = sorted(k for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    if missing or unexpected or mismatched:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape-mismatched", mismatched)):
            if keys:
                parts.append(f"{len(keys)} {label} keys (first: {', '.join(keys[:3])})")
        raise WeightsError(path, f"does not fit timm's {name}: " + "; ".join(parts))
    backbone.load_state_dict(state)

"""The foundation-model zoo as slice encoders: SAM / MedSAM, CLIP / OpenCLIP / BiomedCLIP, BLIP, MAE, ViT IN-21k.

:class:`ZooSliceEncoder` is a :class:`~volumes.encoders.SliceEncoder` over timm models
other than DINOv2/DINOv3, with the same :class:`~volumes.encoders.SliceFeatures`
contract, chunking, modes and LoRA targets, and the weight formats of
:mod:`volumes.encoders.zoo_weights`:

=====================  ===================================  =======================================
family                 timm names (``zoo_encoder_names``)   weight files it loads
=====================  ===================================  =======================================
``sam``                ``samvit_{base,large,huge}_patch16`` Meta ``sam_vit_{b,l,h}_*.pth``, MedSAM
                                                            ``medsam_vit_b.pth``, timm files
``clip``               ``vit_*_clip_*`` (``*_quickgelu_*``  OpenCLIP ``open_clip_pytorch_model.bin`` /
                       for OpenAI weights)                  ``.safetensors`` / hf-hub dir, OpenAI CLIP
                                                            ``state_dict()``, timm files
``vit``                ``vit_{tiny..huge}_patch{8..32}_     BiomedCLIP hf-hub dir (``vit_base_patch16_224``),
                       {224,384}``                          BLIP transformers dir (``vit_base_patch16_384``,
                                                            ``vit_large_patch16_384``), MAE
                                                            ``mae_pretrain_vit_*.pth``, timm IN-21k files
=====================  ===================================  =======================================

What the features mean per family:

* ViTs with a class token (``clip``, ``vit``): ``cls`` is the class token after the final
  LayerNorm (CLIP's ``ln_post``, BLIP's ``post_layernorm``), *before* the image-text
  projection; :meth:`ZooSliceEncoder.projected` gives the projected embedding (CLIP
  ``visual.proj``, BiomedCLIP ``head.proj``, BLIP ``vision_proj``).
* SAM: ``cls`` is the mean of the neck's tokens, grids are ``neck(block)`` (see
  :mod:`volumes.encoders.sam`); ``embed_dim`` is the neck width (256).

RAD-DINO (a transformers ``Dinov2Model`` directory) is a DINOv2 ViT and stays with
:class:`~volumes.encoders.SliceEncoder` (``vit_base_patch14_dinov2``).
"""

from __future__ import annotations

import fnmatch
import re
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import timm
import torch
from torch import nn

import volumes.encoders.pos_embed as pos_embed
from volumes.encoders.sam import SamTokenViT, to_token_vit
from volumes.encoders.slice_encoder import SliceEncoder, check_encoder_options
from volumes.encoders.weights import load_checkpoint_into
from volumes.encoders.registry import register_encoder_family
from volumes.encoders.zoo_weights import ZooCheckpoint, read_zoo_checkpoint
from volumes.errors import ConfigError

__all__ = ["ZooSliceEncoder", "native_input_size", "zoo_encoder_names", "zoo_family"]

_PLAIN_VIT = re.compile(r"vit_(tiny|small|base|large|huge)_patch(8|14|16|32)_(224|384)")


@lru_cache(maxsize=1)
def _names() -> dict[str, str]:
    names = {n: "sam" for n in timm.list_models("samvit_*")}
    names.update({n: "clip" for n in timm.list_models("vit_*_clip_*")})
    names.update({n: "vit" for n in timm.list_models("vit_*") if _PLAIN_VIT.fullmatch(n)})
    return names


def zoo_encoder_names() -> list[str]:
    """Every timm name :class:`ZooSliceEncoder` accepts (a ``.tag`` such as ``.openai`` may follow)."""
    return sorted(_names())


def zoo_family(name: str) -> str | None:
    """``sam``, ``clip`` or ``vit`` for a zoo name (with or without a ``.tag``), else ``None``."""
    return _names().get(name.split(".")[0])


def native_input_size(name: str) -> int:
    """The slice size the model was trained at (timm's ``input_size``): 1024 SAM, 224 / 336 CLIP, 518 DINOv2..."""
    cfg = timm.models.get_pretrained_cfg(name) or timm.models.get_pretrained_cfg(name.split(".")[0])
    if cfg is None:
        raise ConfigError("encoder", name, "a timm model name")
    return int(cfg.input_size[-1])


def _clip_projection_width(name: str) -> int:
    """Width of a CLIP tower's image-text projection: the tag's, else the first image-text (not fine-tuned) tag's."""
    tags = [name] if "." in name else [t for t in timm.list_pretrained(name + ".*") if "_ft" not in t]
    for tag in tags:
        cfg = timm.models.get_pretrained_cfg(tag)
        if cfg is not None and cfg.num_classes:
            return int(cfg.num_classes)
    return 0


@register_encoder_family("zoo model", accepts=lambda name: is_zoo_name(name),
                         example="samvit_base_patch16, vit_base_patch16_clip_224",
                         listing="volumes.encoders.zoo_encoder_names()")
class ZooSliceEncoder(SliceEncoder):
    """A SAM, CLIP-family or plain timm ViT as a slice encoder (see the module docstring).

    Args:
        name: a name of :func:`zoo_encoder_names`, optionally with a timm tag
            (``vit_base_patch16_clip_224.openai``) for ``pretrained=True``.
        pretrained: timm hub weights (network on first use).
        weights: a file or directory of :mod:`volumes.encoders.zoo_weights`.
        layers: blocks whose patch grids are returned (default: four evenly spaced, ending with the last).
        mode: ``frozen``, ``finetune`` or ``last_n``.
        trainable_blocks: blocks that train in ``last_n`` mode (with the final norm / SAM's neck).
        chunk_size: slices per forward pass.
        autocast: ``auto`` (bf16 on CUDA), ``bf16`` or ``fp32``.
        norm_intermediates: intermediate grids through the final norm (SAM: through the neck).
        pos_embed_interpolation: ``bicubic_antialias`` (timm) or ``bicubic`` (transformers' BLIP);
            default: what the weights' reference implementation does.
        model_kwargs: passed to ``timm.create_model`` (``depth``, ``embed_dim`` ... for small test models).
    """

    def __init__(
        self,
        name: str = "vit_base_patch16_clip_224",
        *,
        pretrained: bool = False,
        weights: str | Path | None = None,
        layers: Sequence[int] | None = None,
        mode: str = "frozen",
        trainable_blocks: int = 1,
        chunk_size: int = 32,
        autocast: str = "auto",
        norm_intermediates: bool = True,
        pos_embed_interpolation: str | None = None,
        model_kwargs: dict | None = None,
    ):
        # SliceEncoder.__init__ builds DINOv2/DINOv3 ViTs; this sets the same attributes for the zoo.
        nn.Module.__init__(self)
        family = zoo_family(name)
        if family is None:
            raise ConfigError("encoder", name, "a zoo name from volumes.encoders.zoo_encoder_names(), e.g. "
                                               "samvit_base_patch16, vit_base_patch16_clip_224, vit_base_patch16_224")
        check_encoder_options(mode=mode, autocast=autocast, chunk_size=chunk_size, pretrained=pretrained,
                              weights=weights, pos_embed_interpolation=pos_embed_interpolation)

        self.name = name
        self.family = family
        self.chunk_size = int(chunk_size)
        self.autocast = autocast
        self.norm_intermediates = norm_intermediates
        checkpoint = read_zoo_checkpoint(weights) if weights is not None else None
        self.backbone = self._build(name, family, pretrained, checkpoint, dict(model_kwargs or {}))
        if checkpoint is not None:
            load_checkpoint_into(self.backbone, checkpoint, name)
        if pos_embed_interpolation is None:
            pos_embed_interpolation = "bicubic" if checkpoint is not None and checkpoint.layout == "blip" else "bicubic_antialias"
        self.pos_embed_interpolation = pos_embed_interpolation
        if family != "sam":
            pos_embed.install(self.backbone, pos_embed_interpolation)  # SAM resamples its NHWC grid itself
        self.weights_id = self._weights_id(pretrained, weights)

        depth = len(self.backbone.blocks)
        if any(not -depth <= i < depth for i in (layers or ())):
            raise ConfigError("layers", list(layers or ()), f"block indices in [-{depth}, {depth - 1}]")
        from volumes.encoders.slice_encoder import default_layers

        self.layers = tuple(i % depth for i in (layers if layers is not None else default_layers(depth)))
        sam = isinstance(self.backbone, SamTokenViT)
        self.embed_dim = self.backbone.token_dim if sam else int(self.backbone.embed_dim)
        self.patch_size = int(self.backbone.patch_embed.patch_size[0])
        self.num_prefix_tokens = int(self.backbone.num_prefix_tokens)
        self.num_registers = self.num_prefix_tokens - 1
        self.proj_dim = 0 if sam else int(getattr(self.backbone, "num_classes", 0))
        self.depth = depth
        self.mode = mode
        self._set_trainable(mode, trainable_blocks)

    @staticmethod
    def _build(name: str, family: str, pretrained: bool, checkpoint: ZooCheckpoint | None, kwargs: dict) -> nn.Module:
        base = name.split(".")[0]
        if checkpoint is not None:
            for key, value in checkpoint.model_kwargs.items():
                kwargs.setdefault(key, value)
            if checkpoint.grid is not None:
                # built at the checkpoint's own grid: loading never resamples, inputs of other sizes do
                patch = int(kwargs.get("patch_size") or re.search(r"patch(\d+)", base).group(1))
                kwargs.setdefault("img_size", checkpoint.grid * patch)
        if family == "sam":
            from functools import partial

            kwargs.setdefault("norm_layer", partial(nn.LayerNorm, eps=1e-6))  # Meta's build_sam (timm's: 1e-5)
            return to_token_vit(timm.create_model(name, pretrained=pretrained, num_classes=0, **kwargs))
        if checkpoint is not None:
            num_classes = checkpoint.proj_dim
        elif family == "clip":
            num_classes = _clip_projection_width(name)
        else:
            num_classes = 0
        model = timm.create_model(name, pretrained=pretrained, num_classes=num_classes, dynamic_img_size=True, **kwargs)
        if getattr(model, "cls_token", None) is None:
            raise ConfigError("encoder", name, "a ViT with a class token")
        return model

    def _set_trainable(self, mode: str, trainable_blocks: int) -> None:
        if mode == "last_n" and not 1 <= trainable_blocks <= self.depth:
            raise ConfigError("trainable_blocks", trainable_blocks, f"1..{self.depth}")
        for p in self.backbone.parameters():
            p.requires_grad = mode == "finetune"
        if mode == "last_n":
            final = self.backbone.neck if isinstance(self.backbone, SamTokenViT) else self.backbone.norm
            for module in [*self.backbone.blocks[-trainable_blocks:], final]:
                for p in module.parameters():
                    p.requires_grad = True
        if mode == "frozen":
            self.backbone.eval()

    def projected(self, slices: torch.Tensor) -> torch.Tensor:
        """Image-text embeddings ``[N, P]``: the projection of :attr:`SliceFeatures.cls` (CLIP, BLIP).

        Raises:
            ConfigError: the encoder has no projection (SAM, MAE, ImageNet ViTs).
        """
        if self.proj_dim == 0:
            raise ConfigError("projected", self.name, "an encoder with an image-text projection (CLIP, BiomedCLIP, BLIP)")
        self.check_input(slices)
        parts = []
        with self._grad_context():
            for start in range(0, slices.shape[0], self.chunk_size):
                chunk = slices[start : start + self.chunk_size]
                with self._autocast_context(chunk.device):
                    parts.append(self.backbone.forward_head(self.backbone.forward_features(chunk)).float())
        return torch.cat(parts)

    def extra_repr(self) -> str:
        return f"family={self.family}, " + super().extra_repr()


def is_zoo_name(name: str) -> bool:
    """Whether :func:`volumes.encoders.build_slice_encoder` should build a :class:`ZooSliceEncoder`."""
    return zoo_family(name) is not None and not fnmatch.fnmatch(name, "*dinov[23]*")

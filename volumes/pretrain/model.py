"""Student and teacher for DINOv2-style pretraining: a timm ViT (as :class:`SliceEncoder` builds it) with DINO and iBOT heads.

The pieces come from ``lightly`` (MIT): :class:`~lightly.models.modules.MaskedVisionTransformerTIMM`
wraps the timm ViT so masked patches are replaced by a learned mask token (iBOT),
:class:`~lightly.models.modules.DINOv2ProjectionHead` is the DINO / iBOT head (MLP,
L2-normalised bottleneck, weight-normalised prototypes). The backbone is built by
:class:`volumes.encoders.SliceEncoder`, so every name and weight format the bundles read
(timm, Meta ``.pth``, Hugging Face, our own ``encoder.safetensors``) starts a pretraining
run, and the teacher's backbone state dict is what the bundles load back.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["Branch", "PretrainModel", "layer_of", "parameter_groups"]


def _lightly():
    from volumes._optional import require

    return require("lightly", "self-supervised pretraining (volumes pretrain)")


class Branch(nn.Module):
    """A backbone with its DINO and iBOT heads: the student, or the teacher (an EMA copy).

    ``forward(global_views, mask=, select=, local_views=)`` encodes the global views
    (``mask``: token positions replaced by the mask token, the student's iBOT input), puts
    their class tokens and those of the local views through the DINO head, and the tokens
    at ``select`` through the iBOT head. Returns ``(class tokens of the global views, DINO
    outputs of all views, iBOT outputs or None)``. One forward per step, so
    DistributedDataParallel synchronises every gradient.
    """

    def __init__(self, backbone: nn.Module, dino: nn.Module, ibot: nn.Module):
        super().__init__()
        self.backbone, self.dino, self.ibot = backbone, dino, ibot

    def forward(self, global_views: torch.Tensor, mask: torch.Tensor | None = None, select: torch.Tensor | None = None,
                local_views: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        tokens = self.backbone.encode(global_views, mask=mask)
        cls = tokens[:, 0]
        dino = self.dino(cls)
        if local_views is not None:
            dino = torch.cat([dino, self.dino(self.backbone.encode(local_views)[:, 0])])
        ibot = self.ibot(tokens[select]) if select is not None and bool(select.any()) else None
        return cls, dino, ibot


class PretrainModel(nn.Module):
    """``student`` and ``teacher``: each a :class:`Branch`; the teacher is an EMA of the student.

    Args:
        encoder: a DINOv2 / DINOv3 timm name :class:`SliceEncoder` knows.
        weights, pretrained: where the backbone starts (a local file or directory, or timm's
            hub weights); neither: random initialisation.
        model_kwargs: ``timm.create_model`` options (e.g. ``{"depth": 4}``).
        prototypes: DINO head outputs; ``ibot_prototypes``: iBOT head outputs.
        separate_ibot_head: an iBOT head of its own (DINOv2) or the DINO head's.
        head_hidden, head_bottleneck: the heads' MLP sizes.
        drop_path: the student's stochastic depth (every block).
        layer_scale: a random backbone's LayerScale start (DINOv2 trains from 1e-5, which gives every slice
            the same class token at first; 1.0, as the random baselines use, gives them room to differ).
    """

    def __init__(self, encoder: str = "vit_small_patch14_dinov2", *, weights: str | Path | None = None,
                 pretrained: bool = False, model_kwargs: dict | None = None, prototypes: int = 1024,
                 ibot_prototypes: int = 1024, separate_ibot_head: bool = True, head_hidden: int = 1024,
                 head_bottleneck: int = 256, drop_path: float = 0.1, layer_scale: float = 1.0):
        super().__init__()
        _lightly()  # a missing package names the extra that installs it
        from lightly.models.modules import DINOv2ProjectionHead, MaskedVisionTransformerTIMM
        from lightly.models.utils import update_drop_path_rate

        from volumes.encoders import SliceEncoder

        slice_encoder = SliceEncoder(encoder, weights=weights, pretrained=pretrained, mode="finetune",
                                     random_layer_scale=layer_scale, model_kwargs=model_kwargs)
        vit = slice_encoder.backbone
        self.encoder_name = encoder
        self.patch_size = slice_encoder.patch_size
        self.num_prefix_tokens = slice_encoder.num_prefix_tokens
        self.embed_dim = slice_encoder.embed_dim
        self.depth = slice_encoder.depth
        # keep the backbone's weights and position grid as built (loaded or timm's initialisation)
        backbone = MaskedVisionTransformerTIMM(vit=vit, weight_initialization="skip", pos_embed_initialization="skip",
                                               antialias=slice_encoder.pos_embed_interpolation == "bicubic_antialias")

        def head(outputs: int) -> nn.Module:
            return DINOv2ProjectionHead(input_dim=self.embed_dim, hidden_dim=head_hidden,
                                        bottleneck_dim=head_bottleneck, output_dim=outputs)

        def heads() -> tuple[nn.Module, nn.Module]:
            dino = head(prototypes)
            return dino, (head(ibot_prototypes) if separate_ibot_head else dino)

        # the heads' weight norm cannot be deep-copied: the teacher's are built anew, then given the student's values
        self.student = Branch(backbone, *heads())
        self.teacher = Branch(copy.deepcopy(backbone), *heads())
        self.teacher.load_state_dict(self.student.state_dict())
        if drop_path > 0:
            update_drop_path_rate(self.student.backbone.vit, drop_path_rate=drop_path, mode="uniform")
        for parameter in self.teacher.parameters():
            parameter.requires_grad = False
        self.prototypes, self.ibot_prototypes = prototypes, ibot_prototypes

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """teacher = momentum x teacher + (1 - momentum) x student, parameter by parameter."""
        from lightly.models.utils import update_momentum

        update_momentum(self.student, self.teacher, m=momentum)

    def teacher_backbone_state(self) -> dict[str, torch.Tensor]:
        """The teacher's ViT as a timm state dict: what ``encoder.safetensors`` holds."""
        return {k: v.detach().cpu().contiguous() for k, v in self.teacher.backbone.vit.state_dict().items()}

    def train(self, mode: bool = True) -> "PretrainModel":
        super().train(mode)
        self.teacher.eval()  # the teacher never drops paths
        return self


def layer_of(name: str, depth: int) -> int | None:
    """A student parameter's layer for layer-wise lr decay: 0 for the embeddings, ``i + 1`` for block ``i``,
    ``depth + 1`` for the final norm, None for the heads (no decay)."""
    if not name.startswith("backbone."):
        return None
    rest = name[len("backbone."):]
    if rest.startswith("vit.blocks."):
        return int(rest.split(".")[2]) + 1
    if rest.startswith(("mask_token", "vit.cls_token", "vit.reg_token", "vit.pos_embed", "vit.patch_embed")):
        return 0
    return depth + 1


def parameter_groups(model: PretrainModel, layer_decay: float) -> list[dict[str, Any]]:
    """AdamW groups of the student: per layer an ``lr_scale`` of ``layer_decay ** (depth + 1 - layer)``,
    no weight decay on biases, norms and tokens, and flags for the backbone and the heads' last layers."""
    groups: dict[tuple, dict[str, Any]] = {}
    for name, parameter in model.student.named_parameters():
        if not parameter.requires_grad:
            continue
        layer = layer_of(name, model.depth)
        lr_scale = 1.0 if layer is None else layer_decay ** (model.depth + 1 - layer)
        no_decay = parameter.ndim <= 1 or name.endswith(".bias") or "token" in name or "pos_embed" in name
        last_layer = ".last_layer." in name
        key = (layer, no_decay, last_layer)
        group = groups.setdefault(key, {"params": [], "lr_scale": lr_scale, "wd_scale": 0.0 if no_decay else 1.0,
                                        "backbone": layer is not None, "last_layer": last_layer, "names": []})
        group["params"].append(parameter)
        group["names"].append(name)
    return list(groups.values())

"""SliceEncoder: a timm DINOv2 / DINOv3 ViT that embeds the 2D slices of a volume."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import timm
import torch
from torch import nn

import volumes.encoders.pos_embed as pos_embed
from volumes.encoders.weights import Checkpoint, load_checkpoint_into, read_checkpoint
from volumes.hashing import NAMED, sha256_files
from volumes.encoders.registry import register_encoder_family
from volumes.errors import ConfigError

MODES = ("frozen", "finetune", "last_n")


def encoder_names() -> list[str]:
    """Every timm DINOv2 and DINOv3 ViT this encoder accepts."""
    return sorted(set(timm.list_models("*_dinov2")) | set(timm.list_models("*_dinov3*")))


@dataclass
class SliceFeatures:
    """What the encoder returns for ``N`` slices of size ``h x w`` with patch ``p``.

    Attributes:
        cls: class token after the final norm, ``[N, E]``.
        registers: register tokens after the final norm, ``[N, R, E]`` (``R = 0`` without registers).
        patch_mean: mean of the final patch tokens, ``[N, E]``.
        patch_grids: one patch-token grid ``[N, E, h/p, w/p]`` per requested layer
            (empty when grids were not asked for).
    """

    cls: torch.Tensor
    registers: torch.Tensor
    patch_mean: torch.Tensor
    patch_grids: tuple[torch.Tensor, ...]

    @staticmethod
    def cat(parts: Sequence["SliceFeatures"]) -> "SliceFeatures":
        """Concatenate chunk results along the slice dimension."""
        return SliceFeatures(
            cls=torch.cat([p.cls for p in parts]),
            registers=torch.cat([p.registers for p in parts]),
            patch_mean=torch.cat([p.patch_mean for p in parts]),
            patch_grids=tuple(torch.cat(grids) for grids in zip(*(p.patch_grids for p in parts))),
        )


def check_encoder_options(*, mode: str, autocast: str, chunk_size: int, pretrained: bool, weights: object,
                          pos_embed_interpolation: str | None = None) -> None:
    """The argument checks every slice encoder class makes first (ViT, CNN and zoo alike)."""
    if mode not in MODES:
        raise ConfigError("mode", mode, list(MODES))
    if autocast not in ("auto", "bf16", "fp32"):
        raise ConfigError("autocast", autocast, ["auto", "bf16", "fp32"])
    if pos_embed_interpolation not in (None, *pos_embed.INTERPOLATIONS):
        raise ConfigError("pos_embed_interpolation", pos_embed_interpolation, list(pos_embed.INTERPOLATIONS))
    if chunk_size < 1:
        raise ConfigError("chunk_size", chunk_size, "an integer >= 1")
    if pretrained and weights is not None:
        raise ValueError("give either pretrained=True (timm hub) or weights=PATH (local file), not both")


def default_layers(depth: int) -> tuple[int, ...]:
    """Four evenly spaced blocks ending with the last, as DINOv2's dense-task heads use.

    ViT-S/B (12 blocks) -> (2, 5, 8, 11); ViT-L (24) -> (5, 11, 17, 23); 2 blocks -> (0, 0, 0, 1).
    """
    return tuple(max(0, depth * (i + 1) // 4 - 1) for i in range(4))  # shallow encoders repeat block 0


@register_encoder_family("DINOv2/DINOv3 ViT", accepts=lambda name: name in encoder_names(),
                         example="vit_small_patch14_dinov2", listing="volumes.encoders.encoder_names()")
class SliceEncoder(nn.Module):
    """Embeds 2D slices with a timm DINOv2 / DINOv3 ViT, in chunks of bounded size.

    Args:
        name: a timm model name from :func:`encoder_names`, e.g. ``vit_small_patch14_dinov2``,
            ``vit_base_patch14_reg4_dinov2`` or ``vit_small_patch16_dinov3``.
        pretrained: load timm's hub weights (needs network access on first use).
        weights: a local weights file or Hugging Face directory (see
            :mod:`volumes.encoders.weights` for the formats). Mutually exclusive with ``pretrained``.
        layers: block indices whose patch grids are returned (negative counts from the end);
            default: four evenly spaced blocks ending with the last.
        mode: ``frozen`` (no gradients, always eval), ``finetune`` (all trainable) or
            ``last_n`` (only the last ``trainable_blocks`` blocks and the final norm train).
        trainable_blocks: how many blocks train in ``last_n`` mode.
        chunk_size: slices per forward pass; memory stays bounded whatever the slice count.
        autocast: ``auto`` (bf16 on CUDA, fp32 elsewhere: CPUs without bf16 units run it
            several times slower), ``bf16`` or ``fp32``.
        norm_intermediates: apply the final norm to intermediate grids (DINOv2's convention).
        pos_embed_interpolation: how the position grid is resampled for other slice sizes,
            ``bicubic_antialias`` or ``bicubic`` (see :mod:`volumes.encoders.pos_embed`); default:
            what the checkpoint's reference implementation does (``bicubic`` for Hugging Face
            ``Dinov2Model``, ``bicubic_antialias`` otherwise, as timm does).
        random_layer_scale: without weights, start every LayerScale at this value. timm
            starts them at 1e-5 (DINOv2's training recipe), which makes an untrained ViT
            nearly skip its blocks and give every slice the same class token; 1.0 (as
            transformers initialises) makes the random encoder a real random-feature
            baseline. ``None`` keeps timm's initialisation.
        model_kwargs: passed to ``timm.create_model`` (e.g. ``depth`` for small test models).
    """

    def __init__(
        self,
        name: str = "vit_small_patch14_dinov2",
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
        random_layer_scale: float | None = 1.0,
        model_kwargs: dict | None = None,
    ):
        super().__init__()
        known = encoder_names()
        if name not in known:
            raise ConfigError("encoder", name, known)
        check_encoder_options(mode=mode, autocast=autocast, chunk_size=chunk_size, pretrained=pretrained,
                              weights=weights, pos_embed_interpolation=pos_embed_interpolation)

        self.name = name
        self.chunk_size = int(chunk_size)
        self.autocast = autocast
        self.norm_intermediates = norm_intermediates
        kwargs = dict(model_kwargs or {})
        checkpoint: Checkpoint | None = read_checkpoint(weights) if weights is not None else None
        if checkpoint is not None:
            # Build at the checkpoint's own position grid so loading never resamples;
            # dynamic_img_size then interpolates for whatever slice size comes in.
            patch = timm.create_model(name, pretrained=False, **kwargs).patch_embed.patch_size[0]
            grid = checkpoint.grid_size(patch)
            if grid is not None:
                kwargs.setdefault("img_size", grid * patch)
        self.backbone = timm.create_model(name, pretrained=pretrained, num_classes=0, dynamic_img_size=True, **kwargs)
        if checkpoint is not None:
            load_checkpoint_into(self.backbone, checkpoint, name)
        elif not pretrained and random_layer_scale is not None:
            _set_layer_scale(self.backbone, random_layer_scale)
        if pos_embed_interpolation is None:
            hf_plain = checkpoint is not None and checkpoint.hf_config.get("model_type") == "dinov2"
            pos_embed_interpolation = "bicubic" if hf_plain else "bicubic_antialias"
        self.pos_embed_interpolation = pos_embed_interpolation
        pos_embed.install(self.backbone, pos_embed_interpolation)
        self.weights_id = self._weights_id(pretrained, weights)

        depth = len(self.backbone.blocks)
        self.layers = tuple(i % depth for i in (layers if layers is not None else default_layers(depth)))
        if any(not -depth <= i < depth for i in (layers or ())):
            raise ConfigError("layers", list(layers or ()), f"block indices in [-{depth}, {depth - 1}]")
        self.embed_dim: int = self.backbone.embed_dim
        self.patch_size: int = self.backbone.patch_embed.patch_size[0]
        self.num_prefix_tokens: int = self.backbone.num_prefix_tokens
        self.num_registers: int = self.num_prefix_tokens - 1
        self.depth = depth
        self.mode = mode
        self._set_trainable(mode, trainable_blocks)

    # ----------------------------------------------------------------- set-up
    def _weights_id(self, pretrained: bool, weights: str | Path | None) -> str:
        """Identifies the weights for cache keys: a content hash, the hub tag or 'random'."""
        if weights is not None:
            return "sha256:" + sha256_files(weights, names=NAMED)
        if pretrained:
            return "timm-hub:" + str(self.backbone.pretrained_cfg.get("tag") or self.name)
        return "random"

    def _set_trainable(self, mode: str, trainable_blocks: int) -> None:
        if mode == "last_n" and not 1 <= trainable_blocks <= self.depth:
            raise ConfigError("trainable_blocks", trainable_blocks, f"1..{self.depth}")
        for p in self.backbone.parameters():
            p.requires_grad = mode == "finetune"
        if mode == "last_n":
            for module in [*self.backbone.blocks[-trainable_blocks:], self.backbone.norm]:
                for p in module.parameters():
                    p.requires_grad = True
        if mode == "frozen":
            self.backbone.eval()

    def fingerprint(self) -> str:
        """sha256 of the current parameters: identifies what this encoder computes.

        Unlike ``weights_id`` it tells apart two random initialisations and an encoder
        changed by fine-tuning, so it is what embedding caches key on.
        """
        import hashlib

        digest = hashlib.sha256(self.name.encode())
        for name, tensor in self.backbone.state_dict().items():
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()

    @property
    def frozen(self) -> bool:
        return self.mode == "frozen"

    def train(self, mode: bool = True) -> "SliceEncoder":
        super().train(mode)
        if self.frozen:
            self.backbone.eval()  # a frozen encoder keeps eval behaviour inside a training loop
        return self

    # ---------------------------------------------------------------- forward
    def _grad_context(self) -> contextlib.AbstractContextManager:
        if not self.frozen:
            return contextlib.nullcontext()
        # inference_mode is the cheapest, but its tensors cannot enter autograd later;
        # when the caller records gradients (training a head on top) use no_grad.
        return torch.no_grad() if torch.is_grad_enabled() else torch.inference_mode()

    def _autocast_context(self, device: torch.device) -> contextlib.AbstractContextManager:
        use_bf16 = self.autocast == "bf16" or (self.autocast == "auto" and device.type == "cuda")
        if not use_bf16:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)

    def check_input(self, slices: torch.Tensor) -> None:
        """Raise a clear error for slices the backbone cannot take."""
        if slices.ndim != 4 or slices.shape[1] != 3:
            raise ValueError(f"SliceEncoder expects slices [N, 3, h, w]; got shape {tuple(slices.shape)}")
        h, w = slices.shape[-2:]
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(
                f"slice size {h}x{w} is not a multiple of the patch size {self.patch_size} of {self.name}; "
                "prepare slices with volumes.transforms.PrepareSlicesd"
            )

    def _encode_chunk(self, slices: torch.Tensor, with_grids: bool) -> SliceFeatures:
        with self._autocast_context(slices.device):
            if with_grids:
                # timm returns each block once, in block order; map back to the requested
                # layers (a shallow encoder may repeat one)
                unique = sorted(set(self.layers))
                final, found = self.backbone.forward_intermediates(
                    slices, indices=unique, norm=self.norm_intermediates, output_fmt="NCHW"
                )
                grids = [found[unique.index(i)] for i in self.layers]
            else:
                final, grids = self.backbone.forward_features(slices), []
        prefix = self.num_prefix_tokens
        return SliceFeatures(
            cls=final[:, 0].float(),
            registers=final[:, 1:prefix].float(),
            patch_mean=final[:, prefix:].mean(dim=1).float(),
            patch_grids=tuple(g.float() for g in grids),
        )

    def iter_chunks(self, slices: torch.Tensor, *, with_grids: bool = True) -> Iterator[SliceFeatures]:
        """Yield the features of ``chunk_size`` slices at a time (for streaming consumers)."""
        self.check_input(slices)
        with self._grad_context():
            if torch.jit.is_tracing():
                # A traced loop is unrolled for the example's slice count; one pass keeps
                # the exported graph valid for any count.
                yield self._encode_chunk(slices, with_grids)
                return
            for start in range(0, slices.shape[0], self.chunk_size):
                yield self._encode_chunk(slices[start : start + self.chunk_size], with_grids)

    def forward(self, slices: torch.Tensor, *, with_grids: bool = True) -> SliceFeatures:
        """Encode slices ``[N, 3, h, w]`` (h, w multiples of the patch size) -> :class:`SliceFeatures`."""
        return SliceFeatures.cat(list(self.iter_chunks(slices, with_grids=with_grids)))

    def extra_repr(self) -> str:
        return f"name={self.name}, mode={self.mode}, layers={self.layers}, chunk_size={self.chunk_size}, weights={self.weights_id[:20]}"


def _set_layer_scale(backbone: nn.Module, value: float) -> None:
    with torch.no_grad():
        for name, param in backbone.named_parameters():
            # timm ViT: blocks.N.ls1.gamma; timm EVA (DINOv3): blocks.N.gamma_1
            if name.endswith((".ls1.gamma", ".ls2.gamma", ".gamma_1", ".gamma_2")):
                param.fill_(value)


def volume_to_slices(volume: torch.Tensor) -> torch.Tensor:
    """``[B, C, H, W, D]`` -> ``[B * D, C, H, W]``: every slice along the last axis, case by case."""
    b, c, h, w, d = volume.shape
    return volume.permute(0, 4, 1, 2, 3).reshape(b * d, c, h, w)


def write_random_encoder(path: str | Path, name: str = "vit_small_patch14_dinov2", model_kwargs: dict | None = None,
                         seed: int = 0) -> Path:
    """A random-initialised ``SliceEncoder(name)`` saved as a timm state dict (safetensors), atomically.

    What a model folder ships when no weights are given: a random encoder is still one specific
    encoder, and the heads trained on it need exactly it (the demo, the click model folders).
    """
    from safetensors.torch import save_file

    from volumes.atomic import atomic_path

    torch.manual_seed(seed)
    encoder = SliceEncoder(name, model_kwargs=model_kwargs or {})
    state = {k: v.detach().contiguous() for k, v in encoder.backbone.state_dict().items()}
    with atomic_path(path, suffix=".safetensors") as tmp:
        save_file(state, str(tmp))
    return Path(path)

"""End-to-end training of encoder + head: full fine-tuning, LoRA and BitFit.

The model is :class:`EndToEndClassifier`: every slice of a volume goes through the
encoder, a parameter-free feature normalisation, then an aggregator from
:mod:`volumes.aggregators` gives the volume's logits (``mean``: masked mean + linear
head, the end-to-end counterpart of the linear probe). A slice task is the same model
on one-slice "volumes".

Methods (what trains besides the head):

``finetune``
    every encoder parameter, with layer-wise learning-rate decay: block ``i`` of ``L``
    gets ``encoder_lr * layer_decay ** (L + 1 - i)`` (patch embedding and tokens count as
    block 0, the final norm as ``L + 1``), as BEiT / DINOv2 fine-tuning does, and the
    encoder's learning rate sits far below the head's (default 1e-5 vs 1e-2).
``lora``
    low-rank adapters (peft ``LoraConfig``, rank 8, alpha 16) on the attention ``qkv`` and
    MLP ``fc1`` / ``fc2`` layers of every block; the encoder's own weights stay frozen and
    unchanged. For a CNN the adapters go on the convolutions of its residual stages.
``bitfit``
    only the encoder's bias terms (Ben Zaken et al. 2022; for a ResNet its BatchNorm shifts).

Choices worth knowing:

* The encoder runs in eval mode while it trains: BatchNorm statistics of a CNN stay frozen
  (small batches of similar slices would corrupt them) and DINOv2/DINOv3 ViTs have no
  dropout, so nothing else changes. This also keeps :func:`encode_deduplicated` exact.
* Slice embeddings are standardised before the aggregator with a fixed mean and std per
  feature, measured once on training slices with the encoder as it starts
  (:meth:`EndToEndClassifier.calibrate`), as the frozen protocols standardise their
  features: a random-initialised or foreign encoder's features share a large offset that a
  freshly initialised head barely moves past in a short run. Fixed statistics (not
  BatchNorm's running ones) keep training and evaluation consistent while the encoder moves.
* The epoch with the best validation AUC (ties: the later one) is kept (trainable
  parameters restored) and scored on the test split.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from volumes.encoders import CNNSliceEncoder, SliceEncoder
from volumes.errors import ConfigError
from volumes.evaluation.features import encode_deduplicated
from volumes.metrics import classification_metrics

__all__ = [
    "METHODS",
    "EndToEndClassifier",
    "FinetuneConfig",
    "SliceStandardizer",
    "Sample",
    "add_lora",
    "count_parameters",
    "lora_targets",
    "prepare_encoder",
    "snapshot",
    "train_end_to_end",
]

METHODS: tuple[str, ...] = ("finetune", "lora", "bitfit")
_DEFAULT_ENCODER_LR = {"finetune": 1e-5, "lora": 3e-4, "bitfit": 3e-4}
_LORA_SUFFIXES = ("attn.qkv", "attn.q_proj", "attn.k_proj", "attn.v_proj", "mlp.fc1", "mlp.fc2", "mlp.fc1_g",
                  "mlp.fc1_x")


@dataclass
class FinetuneConfig:
    """Settings of one end-to-end training run (see the module docstring).

    Attributes:
        method: ``finetune``, ``lora`` or ``bitfit``.
        epochs: passes over the training samples; the best epoch by validation AUC is kept.
        batch_size: volumes (or slices) per optimiser step.
        head_lr: AdamW learning rate of the aggregator / head.
        encoder_lr: learning rate of the trainable encoder parameters (the top layer's for
            ``finetune``); ``None``: 1e-5 for ``finetune``, 3e-4 for ``lora`` / ``bitfit``.
        layer_decay: layer-wise decay factor (``finetune`` only; 1.0 = none).
        weight_decay: AdamW weight decay (not on biases, norms and tokens).
        lora_rank, lora_alpha, lora_dropout: the LoRA adapters.
        aggregator: volume aggregator name (:func:`volumes.aggregators.aggregator_names`).
        grad_clip: gradient-norm clip (0 = none).
    """

    method: str = "finetune"
    epochs: int = 3
    batch_size: int = 8
    head_lr: float = 1e-2
    encoder_lr: float | None = None
    layer_decay: float = 0.75
    weight_decay: float = 0.05
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    aggregator: str = "mean"
    grad_clip: float = 1.0

    def __post_init__(self) -> None:
        from volumes.aggregators.factory import aggregator_names

        if self.method not in METHODS:
            raise ConfigError("method", self.method, list(METHODS))
        if self.aggregator not in aggregator_names():
            raise ConfigError("aggregator", self.aggregator, list(aggregator_names()))
        for key in ("epochs", "batch_size", "lora_rank"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(key, value, "a positive integer")
        for key in ("head_lr", "lora_alpha"):
            if not getattr(self, key) > 0:
                raise ConfigError(key, getattr(self, key), "a positive number")
        if self.encoder_lr is not None and not self.encoder_lr > 0:
            raise ConfigError("encoder_lr", self.encoder_lr, "a positive number or None")
        if not 0.0 < self.layer_decay <= 1.0:
            raise ConfigError("layer_decay", self.layer_decay, "a factor in (0, 1]")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError("lora_dropout", self.lora_dropout, "[0, 1)")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise ConfigError("weight_decay/grad_clip", (self.weight_decay, self.grad_clip), "numbers >= 0")

    @property
    def resolved_encoder_lr(self) -> float:
        return float(self.encoder_lr if self.encoder_lr is not None else _DEFAULT_ENCODER_LR[self.method])

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "encoder_lr": self.resolved_encoder_lr}


# --------------------------------------------------------------------------- encoder set-up
def lora_targets(backbone: nn.Module) -> list[str]:
    """Module names LoRA adapts: attention qkv and MLP fc1/fc2 of a ViT, residual-stage convs of a CNN.

    A timm attention that folds separate q/k/v biases into ``F.linear(x, qkv.weight, ...)``
    (the ``*_qkvb`` DINOv3 variants) bypasses its ``qkv`` module, so an adapter there would
    never run; such ``qkv`` layers are left out.
    """
    names = []
    for name, module in backbone.named_modules():
        if isinstance(module, nn.Linear) and name.endswith(_LORA_SUFFIXES):
            if name.endswith("attn.qkv"):
                attn = backbone.get_submodule(name.rsplit(".", 1)[0])
                if getattr(attn, "q_bias", None) is not None and not getattr(attn, "qkv_bias_separate", False):
                    continue
            names.append(name)
    if not names:  # a CNN: the convolutions inside residual stages (not the stem, not the shortcuts)
        names = [name for name, module in backbone.named_modules()
                 if isinstance(module, nn.Conv2d) and name.startswith("layer") and ".downsample" not in name]
    return names


def add_lora(encoder: SliceEncoder, *, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0,
             targets: Sequence[str] | None = None) -> list[str]:
    """Inject peft LoRA adapters into ``encoder.backbone`` in place; only the adapters stay trainable.

    Returns:
        The adapted module names.
    """
    from volumes._optional import require

    peft = require("peft", "LoRA fine-tuning")
    targets = list(targets) if targets is not None else lora_targets(encoder.backbone)
    if not targets:
        raise ConfigError("lora targets", [], "at least one Linear/Conv2d module of the encoder")
    config = peft.LoraConfig(r=int(rank), lora_alpha=float(alpha), lora_dropout=float(dropout),
                             target_modules=targets, bias="none")
    peft.inject_adapter_in_model(config, encoder.backbone)
    for name, param in encoder.backbone.named_parameters():
        param.requires_grad = "lora_" in name
    return targets


def prepare_encoder(encoder: SliceEncoder, config: FinetuneConfig) -> dict[str, Any]:
    """Set which encoder parameters train for ``config.method``; returns a description.

    The encoder must have been built with ``mode="finetune"`` (gradients flow through it).
    """
    if encoder.frozen:
        raise ConfigError("encoder mode", encoder.mode, "'finetune' (build it with mode='finetune')")
    info: dict[str, Any] = {"method": config.method}
    if config.method == "finetune":
        for param in encoder.backbone.parameters():
            param.requires_grad = True
    elif config.method == "bitfit":
        for name, param in encoder.backbone.named_parameters():
            param.requires_grad = name.endswith("bias")
    else:
        info["lora_targets"] = len(add_lora(encoder, rank=config.lora_rank, alpha=config.lora_alpha,
                                            dropout=config.lora_dropout))
    return info


def count_parameters(module: nn.Module, trainable_only: bool = True) -> int:
    """Number of (trainable) parameters of ``module``."""
    return int(sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only))


def _layer_id(encoder: SliceEncoder, name: str) -> tuple[int, int]:
    """(layer index, number of layers) of an encoder parameter for layer-wise decay."""
    if isinstance(encoder, CNNSliceEncoder):
        return encoder.stage_of(name), encoder.depth
    if name.startswith(("cls_token", "reg_token", "pos_embed", "patch_embed", "mask_token", "register_tokens",
                        "norm_pre")):  # norm_pre: CLIP's ln_pre, below the first block
        return 0, encoder.depth + 1
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1, encoder.depth + 1
    return encoder.depth + 1, encoder.depth + 1


def _param_groups(model: "EndToEndClassifier", config: FinetuneConfig) -> list[dict[str, Any]]:
    groups: dict[tuple[str, float, float], list[nn.Parameter]] = {}

    def add(param: nn.Parameter, lr: float, decay: bool, tag: str) -> None:
        key = (tag, lr, config.weight_decay if decay else 0.0)
        groups.setdefault(key, []).append(param)

    for name, param in model.head_parameters():
        add(param, config.head_lr, param.ndim > 1, "head")
    encoder_lr = config.resolved_encoder_lr
    for name, param in model.encoder.backbone.named_parameters():
        if not param.requires_grad:
            continue
        lr = encoder_lr
        if config.method == "finetune":
            layer, layers = _layer_id(model.encoder, name)
            lr = encoder_lr * config.layer_decay ** (layers - layer)
        add(param, lr, param.ndim > 1, "encoder")
    return [{"params": params, "lr": lr, "weight_decay": wd, "name": f"{tag} lr={lr:.2e}"}
            for (tag, lr, wd), params in groups.items()]


# --------------------------------------------------------------------------- model
class SliceStandardizer(nn.Module):
    """``(x - mean) / std`` per feature with fixed buffers (identity until :meth:`fit`)."""

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))

    @torch.no_grad()
    def fit(self, tokens: torch.Tensor) -> None:
        """Set mean and std from tokens ``[N, E]``."""
        self.mean.copy_(tokens.mean(dim=0))
        std = tokens.std(dim=0) if tokens.shape[0] > 1 else torch.ones_like(self.std)
        self.std.copy_(torch.where(std > 1e-6, std, torch.ones_like(std)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class EndToEndClassifier(nn.Module):
    """Encoder -> per-slice standardisation -> aggregator: volumes to logits ``[B, K]``.

    Args:
        encoder: a :class:`SliceEncoder` / :class:`~volumes.encoders.CNNSliceEncoder` in ``finetune`` mode.
        num_classes: ``K``.
        aggregator: a :func:`volumes.aggregators.build_aggregator` name.
        aggregator_kwargs: passed to the aggregator.
    """

    def __init__(self, encoder: SliceEncoder, num_classes: int, aggregator: str = "mean",
                 aggregator_kwargs: dict | None = None):
        super().__init__()
        from volumes.aggregators import build_aggregator

        self.encoder = encoder
        self.norm = SliceStandardizer(encoder.embed_dim)
        self.aggregator = build_aggregator(aggregator, encoder.embed_dim, num_classes, **(aggregator_kwargs or {}))

    def head_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(f"aggregator.{n}", p) for n, p in self.aggregator.named_parameters() if p.requires_grad]

    def train(self, mode: bool = True) -> "EndToEndClassifier":
        super().train(mode)
        self.encoder.backbone.eval()  # see the module docstring
        return self

    @torch.no_grad()
    def calibrate(self, samples: Sequence["Sample"], *, max_samples: int = 64, batch_size: int = 8,
                  device: str | torch.device = "cpu") -> None:
        """Fit the standardisation to the slices of the first ``max_samples`` samples."""
        from volumes.encoders import pos_embed

        pos_embed.clear_cache(self.encoder.backbone)
        self.eval()
        tokens = []
        for start in range(0, min(len(samples), max_samples), batch_size):
            batch = samples[start : min(start + batch_size, max_samples)]
            for sample in batch:
                tokens.append(self.embed(sample.image.permute(3, 0, 1, 2).to(device)).float().cpu())
        self.norm.fit(torch.cat(tokens))
        self.norm.to(device)

    def embed(self, slices: torch.Tensor) -> torch.Tensor:
        """Slices ``[N, 3, h, w]`` -> class tokens ``[N, E]`` (constant slices encoded once)."""
        return encode_deduplicated(lambda batch: self.encoder(batch, with_grids=False).cls, slices)

    def forward(self, slices: torch.Tensor, counts: Sequence[int], positions: torch.Tensor | None = None) -> torch.Tensor:
        """``slices [sum(counts), 3, h, w]`` of ``B`` volumes (``counts[b]`` slices each) -> logits ``[B, K]``.

        ``positions [B, max(counts)]`` in mm (slice index when ``None``).
        """
        tokens = self.norm(self.embed(slices))
        longest = max(counts)
        x = tokens.new_zeros(len(counts), longest, tokens.shape[1])
        mask = torch.zeros(len(counts), longest, dtype=torch.bool, device=tokens.device)
        start = 0
        for b, n in enumerate(counts):
            x[b, :n] = tokens[start : start + n]
            mask[b, :n] = True
            start += n
        if positions is None:
            positions = torch.arange(longest, device=tokens.device, dtype=torch.float32).expand(len(counts), -1)
        return self.aggregator(x, mask, positions)


# --------------------------------------------------------------------------- data
@dataclass
class Sample:
    """One training or evaluation example: ``image [3, H, W, D]`` (``D = 1`` for a slice), label, positions ``[D]``."""

    image: torch.Tensor
    label: int
    positions: torch.Tensor


def _batches(samples: Sequence[Sample], batch_size: int, order: Sequence[int]) -> list[list[Sample]]:
    return [[samples[i] for i in order[start : start + batch_size]] for start in range(0, len(order), batch_size)]


def _forward(model: EndToEndClassifier, batch: Sequence[Sample], device: torch.device) -> torch.Tensor:
    shapes = {tuple(s.image.shape[1:3]) for s in batch}
    counts = [int(s.image.shape[-1]) for s in batch]
    longest = max(counts)
    positions = torch.zeros(len(batch), longest)
    for b, s in enumerate(batch):
        positions[b, : counts[b]] = s.positions
    if len(shapes) == 1:
        slices = torch.cat([s.image.permute(3, 0, 1, 2) for s in batch]).to(device)
        return model(slices, counts, positions.to(device))
    # volumes of different in-plane size cannot share an encoder batch: one by one
    logits = [model(s.image.permute(3, 0, 1, 2).to(device), [c], positions[b : b + 1, :c].to(device))
              for b, (s, c) in enumerate(zip(batch, counts))]
    return torch.cat(logits)


def evaluate_model(model: EndToEndClassifier, samples: Sequence[Sample], *, batch_size: int,
                   device: torch.device) -> dict[str, float]:
    """``{"auc", "acc"}`` of ``model`` on ``samples``."""
    from volumes.encoders import pos_embed

    pos_embed.clear_cache(model.encoder.backbone)  # a trained pos_embed must not be read from a stale cache
    model.eval()
    probabilities = []
    with torch.no_grad():
        for batch in _batches(samples, batch_size, list(range(len(samples)))):
            probabilities.append(torch.softmax(_forward(model, batch, device).float(), dim=1).cpu())
    labels = np.array([s.label for s in samples])
    return classification_metrics(torch.cat(probabilities).numpy(), labels)


def train_end_to_end(
    model: EndToEndClassifier,
    train: Sequence[Sample],
    val: Sequence[Sample],
    test: Sequence[Sample],
    config: FinetuneConfig,
    *,
    seed: int = 0,
    device: str | torch.device = "cpu",
    on_step: Callable[[int, int, float], None] | None = None,
) -> dict[str, Any]:
    """Train ``model`` on ``train``, keep the epoch with the best validation AUC, score ``test``.

    Returns:
        ``{"val_auc", "best_epoch", "test_auc", "test_acc", "trainable_params", "encoder_trainable_params",
        "seconds", "losses"}``.
    """
    device = torch.device(device)
    model.to(device)
    model.calibrate(train, batch_size=config.batch_size, device=device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimiser = torch.optim.AdamW(_param_groups(model, config))
    loss_fn = nn.CrossEntropyLoss()
    generator = torch.Generator().manual_seed(int(seed))
    best_auc, best_epoch, best_state = -math.inf, 0, None
    losses: list[float] = []
    start = time.perf_counter()
    step = 0
    total_steps = config.epochs * math.ceil(len(train) / config.batch_size)
    for epoch in range(1, config.epochs + 1):
        model.train()
        order = torch.randperm(len(train), generator=generator).tolist()
        for batch in _batches(train, config.batch_size, order):
            labels = torch.tensor([s.label for s in batch], device=device)
            loss = loss_fn(_forward(model, batch, device), labels)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(trainable, config.grad_clip)
            optimiser.step()
            losses.append(loss.detach().item())
            step += 1
            if on_step is not None:
                on_step(step, total_steps, losses[-1])
        scores = evaluate_model(model, val, batch_size=max(config.batch_size, 32), device=device)
        auc = scores["auc"] if not math.isnan(scores["auc"]) else -math.inf
        if auc >= best_auc or best_state is None:  # ties: the later epoch (more trained, better calibrated)
            best_auc, best_epoch = auc, epoch
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()
                          if k.startswith("norm.") or _is_trainable(model, k)}
    assert best_state is not None
    model.load_state_dict(best_state, strict=False)
    test = evaluate_model(model, test, batch_size=max(config.batch_size, 32), device=device)
    return {
        "val_auc": float(best_auc), "best_epoch": best_epoch, "test_auc": test["auc"], "test_acc": test["acc"],
        "trainable_params": count_parameters(model), "encoder_trainable_params": count_parameters(model.encoder),
        "seconds": time.perf_counter() - start, "losses": losses,
    }


def _is_trainable(model: nn.Module, state_key: str) -> bool:
    try:
        return bool(model.get_parameter(state_key).requires_grad)
    except AttributeError:
        return False


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of ``module``'s state dict (for before/after comparisons)."""
    return {k: v.detach().clone() for k, v in module.state_dict().items()}

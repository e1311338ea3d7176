"""Frozen backbone + attention head (Huix et al., WACV 2024): a small transformer on frozen patch tokens.

Between the linear probe (one vector per volume) and fine-tuning (the whole encoder moves)
sits the protocol of Huix et al.: the encoder stays frozen and a small transformer head
learns to attend over its patch tokens. On volumes:

1. every slice goes once through the frozen encoder; its final patch grid ``[E, h, w]``
   is average-pooled to ``pool x pool`` cells (``h, w`` -> ``pool``; 16 tokens per slice by
   default) so that a whole volume's tokens fit a small head: ``[D * pool^2, E]``
   (SAM: the neck's grid; a CNN: its last stage's map);
2. tokens are standardised with training-split statistics (as the frozen protocols
   standardise their features) and kept in memory as float16;
3. the head: LayerNorm -> Linear(E, dim) -> + learned in-slice cell embedding + sinusoidal
   slice-position embedding -> a learned query token -> ``depth`` pre-norm transformer
   layers (``heads`` heads, MLP ``2 * dim``) -> LayerNorm -> Linear(dim, K) on the query;
4. AdamW, cross-entropy, the epoch with the best validation AUC kept and scored on test.

A slice task is the same head on one-slice volumes. Tokens are not written to the
persistent embedding cache (they are ``pool^2`` times larger than the cached features);
the encoder pass is reported separately as ``details["encode_seconds"]``.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from volumes.errors import ConfigError
from volumes.metrics import classification_metrics

__all__ = ["AttentionHead", "AttentionHeadConfig", "encode_tokens", "run_attention_head", "train_attention_head"]


@dataclass
class AttentionHeadConfig:
    """Settings of the attention-head protocol (see the module docstring).

    Attributes:
        pool: patch-grid cells per side kept per slice (``pool^2`` tokens per slice).
        dim: head width.
        depth: transformer layers of the head.
        heads: attention heads (``dim`` must be a multiple).
        epochs, batch_size, lr, weight_decay: AdamW training; best validation epoch kept.
        dropout: in the head's transformer layers.
    """

    pool: int = 4
    dim: int = 128
    depth: int = 1
    heads: int = 4
    epochs: int = 20
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.05
    dropout: float = 0.1

    def __post_init__(self) -> None:
        for key in ("pool", "dim", "depth", "heads", "epochs", "batch_size"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"attention_head.{key}", value, "a positive integer")
        if self.dim % self.heads:
            raise ConfigError("attention_head.dim", self.dim, f"a multiple of heads={self.heads}")
        if not self.lr > 0 or self.weight_decay < 0 or not 0 <= self.dropout < 1:
            raise ConfigError("attention_head.lr/weight_decay/dropout", (self.lr, self.weight_decay, self.dropout),
                              "lr > 0, weight_decay >= 0, dropout in [0, 1)")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _slice_positions(depth: int, dim: int) -> torch.Tensor:
    """Sinusoidal embeddings ``[depth, dim]`` of slice indices 0..depth-1 (any volume depth)."""
    half = dim // 2
    freq = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / max(1, half))
    angles = torch.arange(depth, dtype=torch.float32)[:, None] * freq[None]
    out = torch.zeros(depth, dim)
    out[:, 0 : 2 * half : 2], out[:, 1 : 2 * half : 2] = angles.sin(), angles.cos()
    return out


class AttentionHead(nn.Module):
    """Transformer head over a volume's pooled patch tokens ``[B, D * pool^2, E]`` -> logits ``[B, K]``.

    Args:
        embed_dim: ``E``, the encoder's token width.
        num_classes: ``K``.
        config: head settings (``pool``, ``dim``, ``depth``, ``heads``, ``dropout``).
    """

    def __init__(self, embed_dim: int, num_classes: int, config: AttentionHeadConfig):
        super().__init__()
        self.pool = config.pool
        self.dim = config.dim
        self.inp = nn.Sequential(nn.LayerNorm(embed_dim), nn.Linear(embed_dim, config.dim))
        self.cell = nn.Parameter(torch.zeros(config.pool * config.pool, config.dim))  # where in the slice
        self.query = nn.Parameter(torch.zeros(1, 1, config.dim))
        nn.init.trunc_normal_(self.cell, std=0.02)
        nn.init.trunc_normal_(self.query, std=0.02)
        layer = nn.TransformerEncoderLayer(config.dim, config.heads, dim_feedforward=2 * config.dim,
                                           dropout=config.dropout, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, config.depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(config.dim)
        self.fc = nn.Linear(config.dim, num_classes)

    def forward(self, tokens: torch.Tensor, padding: torch.Tensor | None = None) -> torch.Tensor:
        """``tokens [B, D * pool^2, E]`` (slice-major), ``padding [B, D * pool^2]`` True where absent -> ``[B, K]``."""
        b, n, _ = tokens.shape
        cells = self.pool * self.pool
        depth = n // cells
        x = self.inp(tokens.float())
        where = self.cell.repeat(depth, 1) + _slice_positions(depth, self.dim).repeat_interleave(cells, 0).to(x.device)
        x = torch.cat([self.query.expand(b, -1, -1), x + where], dim=1)
        if padding is not None:
            padding = torch.cat([padding.new_zeros(b, 1), padding], dim=1)
        x = self.blocks(x, src_key_padding_mask=padding)
        return self.fc(self.norm(x[:, 0]))


@torch.no_grad()
def encode_tokens(encoder: Any, image: torch.Tensor, pool: int, device: torch.device) -> torch.Tensor:
    """Pooled final patch tokens of a prepared volume ``[3, H, W, D]`` -> ``[D * pool^2, E]`` (float32, CPU).

    Uses the encoder's last requested grid (``SliceFeatures.patch_grids[-1]``), in chunks.
    """
    from volumes.evaluation.features import encode_deduplicated

    slices = image.permute(3, 0, 1, 2).to(device).float()  # [D, 3, H, W]

    def last_grid(batch: torch.Tensor) -> torch.Tensor:
        grid = encoder(batch).patch_grids[-1]  # [M, E, h, w]
        return F.adaptive_avg_pool2d(grid.float(), pool)

    pooled = encode_deduplicated(last_grid, slices)  # [D, E, pool, pool]
    return pooled.flatten(2).transpose(1, 2).reshape(-1, pooled.shape[1]).cpu()


def _stack(tokens: Sequence[torch.Tensor], cells: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad a batch of ``[n_i, E]`` token sets to ``[B, n_max, E]`` with a padding mask ``[B, n_max]``."""
    longest = max(t.shape[0] for t in tokens)
    out = tokens[0].new_zeros(len(tokens), longest, tokens[0].shape[1])
    padding = torch.ones(len(tokens), longest, dtype=torch.bool)
    for i, t in enumerate(tokens):
        out[i, : t.shape[0]] = t
        padding[i, : t.shape[0]] = False
    return out, padding


def _predict(head: AttentionHead, tokens: Sequence[torch.Tensor], batch_size: int, device: torch.device) -> np.ndarray:
    head.eval()
    probabilities = []
    with torch.no_grad():
        for start in range(0, len(tokens), batch_size):
            x, padding = _stack(tokens[start : start + batch_size], head.pool ** 2)
            probabilities.append(head(x.to(device), padding.to(device)).softmax(-1).cpu())
    return torch.cat(probabilities).numpy()


def train_attention_head(
    train: tuple[list[torch.Tensor], list[int]],
    val: tuple[list[torch.Tensor], list[int]],
    test: tuple[list[torch.Tensor], list[int]],
    *,
    embed_dim: int,
    num_classes: int,
    config: AttentionHeadConfig,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> dict[str, Any]:
    """Train one head on ``(tokens, labels)`` splits; returns val/test metrics, best epoch, losses, params."""
    device = torch.device(device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        head = AttentionHead(embed_dim, num_classes, config).to(device)
        decay = [p for n, p in head.named_parameters() if p.ndim > 1 and n not in ("cell", "query")]
        other = [p for n, p in head.named_parameters() if not (p.ndim > 1 and n not in ("cell", "query"))]
        optimiser = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                                       {"params": other, "weight_decay": 0.0}], lr=config.lr)
        generator = torch.Generator().manual_seed(int(seed))
        labels = torch.as_tensor(train[1], dtype=torch.long)
        best_auc, best_epoch, best_state, losses = -math.inf, 0, None, []
        for epoch in range(config.epochs):
            head.train()
            order = torch.randperm(len(train[0]), generator=generator).tolist()
            for start in range(0, len(order), config.batch_size):
                rows = order[start : start + config.batch_size]
                x, padding = _stack([train[0][i] for i in rows], config.pool ** 2)
                loss = F.cross_entropy(head(x.to(device), padding.to(device)), labels[rows].to(device))
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
                losses.append(float(loss.detach()))
            auc = classification_metrics(_predict(head, val[0], config.batch_size, device), np.asarray(val[1]))["auc"]
            auc = -math.inf if math.isnan(auc) else auc
            if auc >= best_auc or best_state is None:  # ties: the later epoch, as train_end_to_end
                best_auc, best_epoch = auc, epoch
                best_state = {k: v.detach().clone() for k, v in head.state_dict().items()}
    assert best_state is not None
    head.load_state_dict(best_state)
    metrics = classification_metrics(_predict(head, test[0], config.batch_size, device), np.asarray(test[1]))
    return {"val_auc": float(best_auc), "best_epoch": best_epoch, "test_auc": metrics["auc"], "test_acc": metrics["acc"],
            "trainable_params": int(sum(p.numel() for p in head.parameters())), "final_loss": losses[-1]}


def run_attention_head(evaluator: Any, config: AttentionHeadConfig | None = None, *,
                       seeds: Sequence[int] = (0,)) -> Any:
    """The protocol on an :class:`~volumes.evaluation.runner.Evaluator`'s data and frozen encoder.

    Returns:
        The fields of one :class:`~volumes.evaluation.runner.ProtocolResult` (``protocol="attention"``,
        one run per seed) as a dict; :meth:`Evaluator.attention_head` builds the result.
    """
    from tqdm.auto import tqdm

    config = config or AttentionHeadConfig()
    encoder = evaluator.encoder
    start = time.perf_counter()
    splits: dict[str, tuple[list[torch.Tensor], list[int]]] = {}
    for split in ("train", "val", "test"):
        samples = evaluator.samples(split)
        tokens = [encode_tokens(encoder, s.image, config.pool, evaluator.device)
                  for s in tqdm(samples, desc=f"tokens {split}", unit="case", disable=not evaluator.progress)]
        splits[split] = (tokens, [int(s.label) for s in samples])
    encode_seconds = time.perf_counter() - start
    # standardise every token feature with the training split's statistics, then keep float16
    train_tokens = torch.cat(splits["train"][0])
    mean, std = train_tokens.mean(0), train_tokens.std(0).clamp_min(1e-6)
    for split, (tokens, labels) in splits.items():
        splits[split] = ([((t - mean) / std).half() for t in tokens], labels)
    runs = []
    for seed in seeds:
        result = train_attention_head(splits["train"], splits["val"], splits["test"], embed_dim=int(mean.shape[0]),
                                      num_classes=evaluator.data.num_classes, config=config, seed=int(seed),
                                      device=evaluator.device)
        runs.append({"seed": int(seed), **result})
    details = {**config.to_dict(), "encode_seconds": encode_seconds, "tokens_per_slice": config.pool ** 2,
               "train_samples": len(splits["train"][0])}
    return {"protocol": "attention", "variant": f"{config.depth}-layer head, {config.pool}x{config.pool} tokens/slice",
            "runs": runs, "trainable_params": runs[-1]["trainable_params"] if runs else 0,
            "seconds": time.perf_counter() - start, "details": details}

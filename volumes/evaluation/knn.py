"""Weighted k-nearest-neighbour classification on frozen features, as in DINOv2's evaluation.

Features are L2-normalised, so the dot product is the cosine similarity. Each of the
``k`` most similar training rows votes for its class with weight ``exp(similarity / T)``
(``T = 0.07``); the normalised votes are the class scores. DINOv2 reports ``k`` in
{10, 20, 100, 200} on ImageNet; the medical studies use the small values.
"""

from __future__ import annotations

import numpy as np
import torch

from volumes.errors import ConfigError

__all__ = ["DEFAULT_KS", "DEFAULT_TEMPERATURE", "knn_scores"]

DEFAULT_KS: tuple[int, ...] = (10, 20)
DEFAULT_TEMPERATURE = 0.07


def knn_scores(
    train_x: np.ndarray,
    train_y: np.ndarray,
    query_x: np.ndarray,
    *,
    k: int,
    num_classes: int,
    temperature: float = DEFAULT_TEMPERATURE,
    chunk: int = 1024,
) -> np.ndarray:
    """Class scores ``[Q, K]`` (rows sum to 1) of queries ``[Q, F]`` from training rows ``[N, F]``.

    ``k`` larger than the training set uses every training row.

    Raises:
        ConfigError: ``k < 1`` or ``temperature <= 0``.
    """
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ConfigError("k", k, "a positive integer")
    if not temperature > 0:
        raise ConfigError("temperature", temperature, "a positive number")
    train = torch.nn.functional.normalize(torch.as_tensor(np.asarray(train_x), dtype=torch.float32), dim=1)
    labels = torch.as_tensor(np.asarray(train_y), dtype=torch.long)
    query = torch.nn.functional.normalize(torch.as_tensor(np.asarray(query_x), dtype=torch.float32), dim=1)
    k = min(int(k), train.shape[0])
    out = []
    for start in range(0, query.shape[0], chunk):
        similarity = query[start : start + chunk] @ train.T  # [q, N]
        top_sim, top_idx = similarity.topk(k, dim=1)
        weights = (top_sim / temperature).exp()
        votes = torch.zeros(top_sim.shape[0], num_classes)
        votes.scatter_add_(1, labels[top_idx], weights)
        out.append(votes / votes.sum(dim=1, keepdim=True))
    return torch.cat(out).numpy() if out else np.zeros((0, num_classes), dtype=np.float32)

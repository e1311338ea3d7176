"""Classification metrics without extra dependencies: accuracy, ROC AUC, mean ± std.

Below both the research protocols (:mod:`volumes.evaluation`) and clinical inference's quality
control (:mod:`volumes.quality`), so neither rests on the other.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

__all__ = ["accuracy", "binary_auc", "classification_metrics", "mean_std", "roc_auc"]


def accuracy(probabilities: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of rows whose argmax over ``probabilities [N, K]`` equals ``labels [N]``."""
    probabilities = np.asarray(probabilities)
    labels = np.asarray(labels)
    if len(labels) == 0:
        return float("nan")
    return float(np.mean(probabilities.argmax(axis=1) == labels))


def binary_auc(scores: Sequence[float] | np.ndarray, positive: Sequence[bool] | np.ndarray) -> float:
    """Mann-Whitney AUC: P(score of a positive > score of a negative), ties counting one half; NaN without both."""
    scores = np.asarray(scores, dtype=np.float64)
    positive = np.asarray(positive, dtype=bool)
    n_pos = int(positive.sum())
    n_neg = int(len(positive) - n_pos)
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores), dtype=np.float64)
    sorted_scores = scores[order]
    # average ranks (1-based) over runs of tied scores
    boundaries = np.flatnonzero(np.diff(sorted_scores)) + 1
    starts = np.concatenate([[0], boundaries])
    ends = np.concatenate([boundaries, [len(scores)]])
    for start, end in zip(starts, ends):
        ranks[order[start:end]] = (start + end + 1) / 2.0
    rank_sum = ranks[positive].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def roc_auc(probabilities: np.ndarray, labels: np.ndarray) -> float:
    """ROC AUC of class scores ``[N, K]`` against ``labels [N]``.

    Binary: the AUC of the class-1 score. More classes: the macro average of one-vs-rest
    AUCs over the classes present with both positives and negatives. NaN when no class has both.
    """
    probabilities = np.asarray(probabilities, dtype=np.float64)
    labels = np.asarray(labels)
    if probabilities.ndim != 2 or probabilities.shape[0] != labels.shape[0]:
        raise ValueError(f"roc_auc: scores [N, K] and labels [N] needed, got {probabilities.shape} and {labels.shape}")
    if probabilities.shape[1] == 2:
        return binary_auc(probabilities[:, 1], labels == 1)
    aucs = [binary_auc(probabilities[:, k], labels == k) for k in range(probabilities.shape[1])]
    aucs = [a for a in aucs if not math.isnan(a)]
    return float(np.mean(aucs)) if aucs else float("nan")


def classification_metrics(probabilities: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """``{"auc": ..., "acc": ...}`` of class probabilities ``[N, K]`` against ``labels [N]``."""
    return {"auc": roc_auc(probabilities, labels), "acc": accuracy(probabilities, labels)}


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value; NaNs are skipped)."""
    finite = [float(v) for v in values if not math.isnan(float(v))]
    if not finite:
        return float("nan"), float("nan")
    if len(finite) == 1:
        return finite[0], 0.0
    return float(np.mean(finite)), float(np.std(finite, ddof=1))

"""Linear probe: L2-regularised multinomial logistic regression on frozen features.

Fitted with full-batch L-BFGS in float64 (a convex problem, so the solution does not
depend on a seed). The regularisation strength is chosen on the validation split from
a log-spaced grid, strongest first, each fit warm-started from the previous one; the
chosen model is then scored on the test split. The loss is
``mean cross-entropy + l2 / 2 * ||W||^2`` (the bias is not penalised), i.e. scikit-learn's
``LogisticRegression(C=1 / (l2 * N))``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from volumes.errors import ConfigError
from volumes.metrics import classification_metrics

__all__ = ["DEFAULT_L2_GRID", "LogisticModel", "fit_logistic", "select_logistic"]

#: Regularisation strengths tried on the validation split.
DEFAULT_L2_GRID: tuple[float, ...] = (1.0, 0.3, 0.1, 0.03, 0.01, 0.003, 0.001, 0.0001)


@dataclass
class LogisticModel:
    """``softmax(x @ weight + bias)``: ``weight [F, K]``, ``bias [K]``."""

    weight: torch.Tensor
    bias: torch.Tensor
    l2: float

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        """Class probabilities ``[N, K]`` of features ``[N, F]``."""
        logits = torch.as_tensor(np.asarray(x), dtype=torch.float64) @ self.weight + self.bias
        return torch.softmax(logits, dim=1).numpy()


def fit_logistic(
    x: np.ndarray,
    y: np.ndarray,
    *,
    num_classes: int,
    l2: float,
    max_iter: int = 500,
    init: LogisticModel | None = None,
) -> LogisticModel:
    """Fit an L2-regularised logistic regression on ``x [N, F]``, ``y [N]`` with L-BFGS."""
    if not l2 >= 0 or not math.isfinite(l2):
        raise ConfigError("l2", l2, "a finite number >= 0")
    features = torch.as_tensor(np.asarray(x), dtype=torch.float64)
    labels = torch.as_tensor(np.asarray(y), dtype=torch.long)
    if init is not None:
        weight = init.weight.clone().requires_grad_(True)
        bias = init.bias.clone().requires_grad_(True)
    else:
        weight = torch.zeros(features.shape[1], num_classes, dtype=torch.float64, requires_grad=True)
        bias = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    optimiser = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, history_size=20,
                                  tolerance_grad=1e-7, tolerance_change=1e-10, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimiser.zero_grad()
        loss = torch.nn.functional.cross_entropy(features @ weight + bias, labels) + 0.5 * l2 * (weight**2).sum()
        loss.backward()
        return loss

    optimiser.step(closure)
    return LogisticModel(weight.detach(), bias.detach(), float(l2))


def select_logistic(
    train_x: np.ndarray,
    train_y: np.ndarray,
    val_x: np.ndarray,
    val_y: np.ndarray,
    *,
    num_classes: int,
    l2_grid: Sequence[float] = DEFAULT_L2_GRID,
    metric: str = "auc",
) -> tuple[LogisticModel, list[dict[str, float]]]:
    """Fit every ``l2`` of the grid on the training rows; keep the best on the validation rows.

    Args:
        metric: ``auc`` or ``acc``, the validation metric that picks ``l2`` (ties: the stronger one).

    Returns:
        The chosen model and one ``{"l2", "val_auc", "val_acc"}`` row per grid value.
    """
    if metric not in ("auc", "acc"):
        raise ConfigError("select_metric", metric, ["auc", "acc"])
    if not l2_grid:
        raise ConfigError("l2_grid", list(l2_grid), "at least one value")
    grid = sorted({float(v) for v in l2_grid}, reverse=True)
    best: LogisticModel | None = None
    best_score = -math.inf
    sweep: list[dict[str, float]] = []
    previous: LogisticModel | None = None
    for l2 in grid:
        model = fit_logistic(train_x, train_y, num_classes=num_classes, l2=l2, init=previous)
        previous = model
        scores = classification_metrics(model.predict_proba(val_x), val_y)
        sweep.append({"l2": l2, "val_auc": scores["auc"], "val_acc": scores["acc"]})
        score = scores[metric]
        score = -math.inf if math.isnan(score) else score
        if score > best_score:
            best, best_score = model, score
    assert best is not None
    return best, sweep

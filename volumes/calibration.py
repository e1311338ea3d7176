"""Post-hoc calibration of a classifier's probabilities: temperature and Platt scaling, ECE and Brier score.

Temperature scaling (Guo et al., ICML 2017) divides the logits by one scalar ``T > 0``
fitted on held-out data by minimising the negative log-likelihood; it changes the
probabilities, not the ranking (argmax and AUC stay the same). ``T > 1`` softens an
over-confident classifier. For two classes the bundle fits Platt scaling (Platt 1999):
``p(1) = sigmoid(a (l1 - l0) + b)``, a temperature ``T = 1 / a`` plus an intercept ``b``
that moves the 0.5 threshold (the ranking, so the AUC, stays; the accuracy at 0.5 can
change), fitted to Platt's smoothed targets ``(N+ + 1) / (N+ + 2)`` and ``1 / (N- + 2)``,
which keep the fit finite when the validation split has no mistake.

* :func:`fit_temperature`: ``T`` from validation logits and labels (``T = 1`` when the
  split is :func:`separable`: then the likelihood has no minimum).
* :func:`fit_platt`: ``a``, ``b`` for two classes, as a :class:`Calibration`.
* :func:`fit_calibration`: what the bundle fits, chosen by a criterion that can refuse: the
  identity, temperature scaling and (two classes) Platt scaling compete on the validation
  split's cross-validated NLL; a fitted map is kept only when it beats the identity there and
  lowers the held-in NLL without raising the held-in ECE. A split without a mistake keeps the
  identity (it cannot say how confident to be), and the temperature is bounded
  (:data:`TEMPERATURE_BOUNDS`). The choice and its reason go into ``model.calibration.json``.
* :func:`expected_calibration_error`: the standard ECE with equal-width confidence bins.
* :func:`brier_score`: mean squared distance of the probability vector to the one-hot label.
* :class:`FitTemperature`: the classification bundle's training handler that fits the
  calibration on the validation split whenever the checkpoint saver keeps a new best
  checkpoint, and writes it beside it (``model.calibration.json``); :func:`load_calibration`
  reads it at inference (identity for a checkpoint without one, said once in the log).
* :class:`CalibrationReport`: the bundle's evaluation handler that writes the test split's
  ECE, Brier score and accuracy before and after that calibration (``eval/calibration.json``).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

__all__ = ["TEMPERATURE_BOUNDS", "Calibration", "CalibrationReport", "FitTemperature", "brier_score",
           "calibration_metrics", "calibration_path", "cross_validated_nll", "expected_calibration_error",
           "fit_calibration", "fit_platt", "fit_temperature", "load_calibration", "separable", "softmax"]


#: The temperatures (and Platt slopes ``1 / T``) a fit may choose: at most 4x sharper (a validation
#: split of a few dozen cases cannot support more; the demo's unbounded fits reached 0.05) and at
#: most 20x softer.
TEMPERATURE_BOUNDS: tuple[float, float] = (0.25, 20.0)

#: Fewer validation cases than this: no calibration is fitted (nothing to cross-validate on).
MIN_CASES = 10


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row-wise softmax of ``logits [N, K] / temperature`` (float64, numerically stable)."""
    z = np.asarray(logits, dtype=np.float64) / float(temperature)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _nll(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0, offsets: Any = 0.0) -> np.ndarray:
    """Each case's NLL under ``softmax(logits / temperature + offsets)`` (log-sum-exp, no clipping)."""
    z = np.asarray(logits, dtype=np.float64) / temperature + offsets
    z = z - z.max(axis=1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return -log_p[np.arange(len(labels)), labels]


def separable(logits: np.ndarray, labels: np.ndarray) -> bool:
    """Whether every case's largest logit is its label's (ties count as errors).

    Then the NLL of ``softmax(logits / T)`` falls all the way as ``T -> 0``: the split
    says the classifier is never wrong, not how confident it should be.
    """
    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    own = logits[np.arange(len(labels)), labels]
    others = np.where(np.eye(logits.shape[1], dtype=bool)[labels], -np.inf, logits)
    return bool((own > others.max(axis=1)).all())


def fit_temperature(logits: np.ndarray, labels: np.ndarray, *,
                    bounds: tuple[float, float] = TEMPERATURE_BOUNDS, warn: bool = True) -> float:
    """The temperature that minimises the NLL of ``softmax(logits / T)`` on ``labels``.

    Args:
        logits: ``[N, K]`` held-out logits (validation split, never the test split).
        labels: ``[N]`` integer class labels.
        bounds: the search range of ``T``.

    A bounded 1-D search on ``log T`` (the NLL is smooth in it), deterministic. On a
    :func:`separable` split the NLL has no minimum (it keeps falling as ``T -> 0``), and
    sharpening to the lower bound makes every later mistake near-certain (the demo's
    16 validation phantoms, all right, gave T = 0.05 and doubled the test ECE), so no
    temperature is fitted: 1.0, with a warning.
    """
    from scipy.optimize import minimize_scalar

    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    if logits.ndim != 2 or len(logits) != len(labels) or len(labels) == 0:
        raise ValueError(f"fit_temperature needs logits [N, K] and labels [N], got {logits.shape} and {labels.shape}")
    if separable(logits, labels):
        if warn:
            logger.warning("temperature scaling: all %d held-out cases are classified correctly, so they cannot say how "
                           "confident the classifier should be; T = 1 (probabilities left as they are)", len(labels))
        return 1.0
    low, high = np.log(bounds[0]), np.log(bounds[1])
    result = minimize_scalar(lambda log_t: float(_nll(logits, labels, float(np.exp(log_t))).mean()),
                             bounds=(low, high),
                             method="bounded", options={"xatol": 1e-6})
    return float(np.exp(result.x))


@dataclass(frozen=True)
class Calibration:
    """``softmax(logits / temperature + bias)``: the identity, temperature scaling, or Platt scaling for two classes.

    ``bias`` holds one offset per class (empty: none); Platt's intercept ``b`` is ``(0, b)``.
    ``reason`` says why this map was chosen (:func:`fit_calibration`) and ``heldout_nll`` the
    cross-validated NLL of every candidate it weighed.
    """

    temperature: float = 1.0
    bias: tuple[float, ...] = ()
    method: str = "none"
    separable: bool = False
    reason: str = ""
    heldout_nll: dict[str, float] = field(default_factory=dict)

    def _offsets(self, classes: int) -> np.ndarray:
        if not self.bias:
            return np.zeros(classes)
        if len(self.bias) != classes:
            raise ValueError(f"calibration has {len(self.bias)} class offsets, the classifier {classes} classes")
        return np.asarray(self.bias, dtype=np.float64)

    @property
    def identity(self) -> bool:
        """Whether the map leaves the probabilities as they are (``T = 1``, no offsets)."""
        return self.temperature == 1.0 and not any(self.bias)

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        """Calibrated ``[N, K]`` probabilities from logits (or log-probabilities) ``[N, K]``."""
        logits = np.asarray(logits, dtype=np.float64)
        return softmax(logits / self.temperature + self._offsets(logits.shape[1]))

    def apply_to_probabilities(self, probabilities: np.ndarray) -> np.ndarray:
        """Calibrated ``[N, K]`` probabilities from uncalibrated ones (the identity returns them unchanged)."""
        probabilities = np.asarray(probabilities, dtype=np.float64)
        if self.identity:
            return probabilities
        return self.probabilities(np.log(probabilities + 1e-12))

    def torch_probabilities(self, logits: Any) -> Any:
        """The same on a torch tensor ``[..., K]`` (float32)."""
        import torch

        offsets = torch.as_tensor(self._offsets(logits.shape[-1]), dtype=torch.float32, device=logits.device)
        return torch.softmax(logits.float() / self.temperature + offsets, dim=-1)

    def as_dict(self) -> dict[str, Any]:
        return {"method": self.method, "temperature": self.temperature, "bias": list(self.bias),
                "separable": self.separable, "reason": self.reason,
                "heldout_nll": {k: round(v, 6) for k, v in self.heldout_nll.items()}}


def _platt_targets(labels: np.ndarray) -> np.ndarray:
    positives = int(labels.sum())
    negatives = len(labels) - positives
    return np.where(labels == 1, (positives + 1.0) / (positives + 2.0), 1.0 / (negatives + 2.0))


def fit_platt(logits: np.ndarray, labels: np.ndarray, *, bounds: tuple[float, float] = TEMPERATURE_BOUNDS) -> Calibration:
    """Platt scaling of a two-class classifier: ``p(1) = sigmoid(a (l1 - l0) + b)``, as ``T = 1 / a``, ``bias = (0, b)``.

    Fitted by cross-entropy against Platt's smoothed targets (``(N+ + 1) / (N+ + 2)`` for
    the positives, ``1 / (N- + 2)`` for the negatives), so a validation split without a
    mistake still gives finite, not certain, probabilities; ``a`` stays within
    ``1 / bounds`` so the ranking is kept. Convex in ``(a, b)``: L-BFGS-B, deterministic.
    """
    from scipy.optimize import minimize

    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    if logits.ndim != 2 or logits.shape[1] != 2 or len(logits) != len(labels) or len(labels) == 0:
        raise ValueError(f"fit_platt needs two-class logits [N, 2] and labels [N], got {logits.shape} and {labels.shape}")
    margin = logits[:, 1] - logits[:, 0]
    targets = _platt_targets(labels)

    def loss(params: np.ndarray) -> tuple[float, np.ndarray]:
        z = params[0] * margin + params[1]
        # cross-entropy with soft targets: log(1 + e^z) - t z, stable for either sign of z
        value = np.logaddexp(0.0, z) - targets * z
        residual = 1.0 / (1.0 + np.exp(-z)) - targets
        return float(value.sum()), np.array([float((residual * margin).sum()), float(residual.sum())])

    result = minimize(loss, np.array([1.0, 0.0]), jac=True, method="L-BFGS-B",
                      bounds=[(1.0 / bounds[1], 1.0 / bounds[0]), (None, None)])
    a, b = (float(v) for v in result.x)
    return Calibration(temperature=1.0 / a, bias=(0.0, b), method="Platt scaling",
                       separable=separable(logits, labels))


def _case_nll(calibration: Calibration, logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    logits = np.asarray(logits, dtype=np.float64)
    return _nll(logits, labels, calibration.temperature, calibration._offsets(logits.shape[1]))


def _candidates(classes: int) -> dict[str, Any]:
    """The maps :func:`fit_calibration` weighs: name -> fit(logits, labels) -> Calibration."""
    candidates: dict[str, Any] = {
        "temperature scaling": lambda x, y: Calibration(temperature=fit_temperature(x, y, warn=False),
                                                        method="temperature scaling")}
    if classes == 2:
        candidates["Platt scaling"] = fit_platt
    return candidates


def _folds(labels: np.ndarray, folds: int) -> np.ndarray:
    """A fold index per case, stratified and deterministic: each class's cases dealt out in turn."""
    index = np.zeros(len(labels), dtype=np.int64)
    dealt = 0
    for value in np.unique(labels):
        members = np.flatnonzero(labels == value)
        index[members] = (np.arange(len(members)) + dealt) % folds
        dealt += len(members)
    return index


def cross_validated_nll(logits: np.ndarray, labels: np.ndarray, fit: Any, folds: int = 10) -> np.ndarray:
    """Each case's NLL under the map ``fit`` learnt on the other folds (``min(folds, N)``; N: leave-one-out)."""
    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    assignment = _folds(labels, min(folds, len(labels)))
    nll = np.zeros(len(labels))
    for fold in np.unique(assignment):
        held = assignment == fold
        nll[held] = _case_nll(fit(logits[~held], labels[~held]), logits[held], labels[held])
    return nll


def fit_calibration(logits: np.ndarray, labels: np.ndarray, *, folds: int = 10) -> Calibration:
    """What the classification bundle fits on its validation split, by a rule that can refuse.

    1. Fewer than :data:`MIN_CASES` cases, or a :func:`separable` split (no mistake: it
       cannot say how confident the classifier should be): the identity.
    2. Otherwise the identity, temperature scaling and, for two classes, Platt scaling
       (:func:`fit_platt`) compete on the split's ``folds``-fold cross-validated NLL
       (:func:`cross_validated_nll`, stratified; temperature and slope within
       :data:`TEMPERATURE_BOUNDS`). The identity wins unless the best map lowers the
       mean NLL by more than one standard error of the per-case gains.
    3. The winner is refitted on the whole split and kept only if it lowers the held-in NLL
       and does not raise the held-in ECE; else the identity.

    The result's ``reason`` says which rule decided, ``heldout_nll`` holds every candidate's score.
    """
    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    if logits.ndim != 2 or len(logits) != len(labels) or len(labels) == 0:
        raise ValueError(f"fit_calibration needs logits [N, K] and labels [N], got {logits.shape} and {labels.shape}")
    n = len(labels)
    identity = Calibration()
    if separable(logits, labels):
        return replace(identity, separable=True, reason=(
            f"all {n} validation cases are classified correctly, so they cannot say how confident the classifier "
            "should be: probabilities left as they are"))
    if n < MIN_CASES:
        return replace(identity, reason=f"{n} validation cases are too few to cross-validate a calibration "
                                        f"(at least {MIN_CASES}): probabilities left as they are")
    scheme = "leave-one-out" if min(folds, n) == n else f"{folds}-fold"
    per_case = {"none": _case_nll(identity, logits, labels)}
    candidates = _candidates(logits.shape[1])
    for name, fit in candidates.items():
        per_case[name] = cross_validated_nll(logits, labels, fit, folds)
    scores = {name: float(values.mean()) for name, values in per_case.items()}
    said = ", ".join(f"{name} {value:.3f}" for name, value in scores.items())
    best = min(scores, key=lambda name: (scores[name], name != "none"))
    if best != "none":
        # one standard error: the gain over the raw probabilities must exceed the spread of the per-case gains
        gain = per_case["none"] - per_case[best]
        if gain.mean() <= gain.std(ddof=1) / np.sqrt(n):
            return replace(identity, heldout_nll=scores, reason=(
                f"{best} lowered the {scheme} cross-validated NLL of the {n} validation cases ({said}) by "
                f"{gain.mean():.3f}, within one standard error ({gain.std(ddof=1) / np.sqrt(n):.3f}): "
                "probabilities left as they are"))
    if best == "none":
        return replace(identity, heldout_nll=scores, reason=(
            f"no fitted map beat the raw probabilities on the {scheme} cross-validated NLL of the {n} validation "
            f"cases ({said})"))
    fitted = candidates[best](logits, labels)
    raw_p, fitted_p = softmax(logits), fitted.probabilities(logits)
    raw_ece, fitted_ece = expected_calibration_error(raw_p, labels), expected_calibration_error(fitted_p, labels)
    if float(_case_nll(fitted, logits, labels).mean()) >= scores["none"] or fitted_ece > raw_ece:
        return replace(identity, heldout_nll=scores, reason=(
            f"{best} won the {scheme} cross-validated NLL ({said}) but, fitted on all {n} validation cases, "
            f"did not lower their NLL without raising their ECE ({raw_ece:.3f} -> {fitted_ece:.3f}): "
            "probabilities left as they are"))
    return replace(fitted, heldout_nll=scores, reason=(
        f"lowest {scheme} cross-validated NLL on the {n} validation cases ({said}); held-in ECE "
        f"{raw_ece:.3f} -> {fitted_ece:.3f}"))


def expected_calibration_error(probabilities: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """ECE: ``sum_b |B_b| / N * |accuracy(B_b) - confidence(B_b)|`` over ``bins`` equal-width bins.

    The confidence of a case is its largest probability; bin ``b`` holds confidences in
    ``((b-1)/bins, b/bins]`` (the first bin includes 0). ``probabilities`` is ``[N, K]``.
    """
    probabilities = np.asarray(probabilities, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    confidence = probabilities.max(axis=1)
    correct = (probabilities.argmax(axis=1) == labels).astype(np.float64)
    index = np.clip(np.ceil(confidence * bins).astype(int) - 1, 0, bins - 1)
    ece = 0.0
    for b in range(bins):
        members = index == b
        if members.any():
            ece += members.mean() * abs(correct[members].mean() - confidence[members].mean())
    return float(ece)


def brier_score(probabilities: np.ndarray, labels: np.ndarray) -> float:
    """Mean over cases of ``sum_k (p_k - y_k)^2`` (Brier's multi-class form; 0 is perfect, 2 the worst)."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    onehot = np.eye(probabilities.shape[1])[np.asarray(labels, dtype=np.int64)]
    return float(((probabilities - onehot) ** 2).sum(axis=1).mean())


def calibration_metrics(val_probabilities: np.ndarray, val_labels: np.ndarray, test_probabilities: np.ndarray,
                        test_labels: np.ndarray) -> dict[str, Any]:
    """Test ECE and Brier score before and after the calibration :func:`fit_calibration` chooses on the validation split.

    Works from probabilities: ``log p`` differs from the logits by a constant per row, which
    the softmax removes, so ``softmax(log p / T)`` is temperature scaling of the logits.
    Returns ``calibration`` (the chosen method), ``calibration_reason``, ``temperature``,
    ``test_ece``, ``test_brier``, ``test_ece_calibrated``, ``test_brier_calibrated`` and
    ``test_acc_calibrated`` (argmax after calibration; Platt's intercept can move it).
    """
    calibration = fit_calibration(np.log(np.asarray(val_probabilities) + 1e-12), val_labels)
    calibrated = calibration.apply_to_probabilities(test_probabilities)
    return {
        "calibration": calibration.method,
        "calibration_reason": calibration.reason,
        "temperature": calibration.temperature,
        "test_ece": expected_calibration_error(test_probabilities, test_labels),
        "test_brier": brier_score(test_probabilities, test_labels),
        "test_ece_calibrated": expected_calibration_error(calibrated, test_labels),
        "test_brier_calibrated": brier_score(calibrated, test_labels),
        "test_acc_calibrated": float(np.mean(calibrated.argmax(axis=1) == np.asarray(test_labels))),
    }


# ---------------------------------------------------------------------------- with the checkpoint
def calibration_path(checkpoint: str | Path) -> Path:
    """``model.pt`` -> ``model.calibration.json`` beside it."""
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(checkpoint.name.rsplit(".", 1)[0] + ".calibration.json")


def load_calibration(checkpoint: str | Path | None) -> Calibration:
    """The calibration saved with ``checkpoint``; the identity (``T = 1``, logged) when it has none.

    Raises:
        VolumesError: the calibration file is unreadable, holds no positive temperature or
            a malformed ``bias``.
    """
    from volumes.errors import VolumesError

    if checkpoint is None:
        return Calibration()
    path = calibration_path(checkpoint)
    if not path.is_file():
        logger.info("%s: no %s beside it (trained before calibration): probabilities are not calibrated (T = 1)",
                    checkpoint, path.name)
        return Calibration()
    try:
        content = json.loads(path.read_text())
        temperature = float(content["temperature"])
        bias = tuple(float(v) for v in content.get("bias") or ())
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise VolumesError(f"{path}: unreadable calibration file ({exc})") from exc
    if not (math.isfinite(temperature) and temperature > 0):
        raise VolumesError(f"{path}: temperature must be a positive number, got {temperature}")
    if not all(math.isfinite(v) for v in bias):
        raise VolumesError(f"{path}: bias must be finite numbers, got {list(bias)}")
    return Calibration(temperature=temperature, bias=bias, method=str(content.get("method", "temperature scaling")),
                       separable=bool(content.get("separable", False)), reason=str(content.get("reason", "")))


class _ValidationProbabilities:
    """Collects one validation run's probabilities (``pred``, after the bundle's softmax) and labels."""

    def __init__(self) -> None:
        self._probabilities: list[np.ndarray] = []
        self._labels: list[int] = []

    def attach(self, engine: Any) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.EPOCH_STARTED, lambda _: self._reset())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._completed)

    def _reset(self) -> None:
        self._probabilities, self._labels = [], []

    def _collect(self, engine: Any) -> None:
        for item in engine.state.output:
            self._probabilities.append(item["pred"].detach().float().cpu().numpy())
            self._labels.append(int(item["label"].argmax()))

    def _completed(self, engine: Any) -> None:
        raise NotImplementedError


class CalibrationReport(_ValidationProbabilities):
    """Evaluation handler: the test split's ECE, Brier score and accuracy before and after the saved calibration.

    Written atomically to ``output_dir/calibration.json`` when the evaluation run ends
    (the classification bundle's ``evaluate.json``). Accuracy is at the 0.5 threshold for
    two classes (Platt's intercept can move it) and the argmax otherwise (temperature
    scaling keeps it); the report says both.

    Args:
        checkpoint: the evaluated checkpoint (its ``model.calibration.json``; identity without one).
        output_dir: where ``calibration.json`` goes.
    """

    def __init__(self, checkpoint: str | Path, output_dir: str | Path):
        super().__init__()
        self.checkpoint, self.path = Path(checkpoint), Path(output_dir) / "calibration.json"

    def _completed(self, engine: Any) -> None:
        if self._labels:
            self.write(np.stack(self._probabilities), np.asarray(self._labels))

    def write(self, probabilities: np.ndarray, labels: np.ndarray) -> Path:
        from volumes.atomic import atomic_write_bytes

        calibration = load_calibration(self.checkpoint)
        calibrated = calibration.apply_to_probabilities(probabilities)

        def accuracy(p: np.ndarray) -> float:
            predicted = (p[:, 1] >= 0.5).astype(int) if p.shape[1] == 2 else p.argmax(axis=1)
            return float(np.mean(predicted == labels))

        content = {
            **calibration.as_dict(), "cases": int(len(labels)), "split": "test",
            "ece": expected_calibration_error(probabilities, labels),
            "ece_calibrated": expected_calibration_error(calibrated, labels),
            "brier": brier_score(probabilities, labels), "brier_calibrated": brier_score(calibrated, labels),
            "accuracy": accuracy(probabilities), "accuracy_calibrated": accuracy(calibrated),
        }
        text = json.dumps(content, indent=1) + "\n"
        atomic_write_bytes(self.path, lambda handle: handle.write(text.encode()))
        logger.info("calibration on the test split (%s): ECE %.3f -> %.3f, Brier %.3f -> %.3f, accuracy %.3f",
                    self.path, content["ece"], content["ece_calibrated"], content["brier"],
                    content["brier_calibrated"], content["accuracy_calibrated"])
        return self.path


class FitTemperature(_ValidationProbabilities):
    """Validation handler: fit the calibration of the checkpoint the saver keeps, and save it beside it.

    Collects the validation run's probabilities (``pred``, after the bundle's softmax
    postprocessing) and one-hot labels; when the key metric is at least the best so far
    (the rule of ``CheckpointSaver(key_metric_greater_or_equal=True)``, so the file always
    belongs to the saved weights), lets :func:`fit_calibration` choose on them (the identity,
    temperature scaling or, for two classes, Platt scaling, by cross-validated NLL) and writes
    ``model.calibration.json`` atomically with the choice, its reason and the validation ECE
    and Brier score before and after.

    Under torchrun (``multi_gpu_train.json``) the handler runs on rank 0 only and fits on
    rank 0's share of the validation split.

    Args:
        checkpoint: the checkpoint file the saver writes.
        key_metric: the evaluator's key metric name (``val_auc``).
    """

    def __init__(self, checkpoint: str | Path, key_metric: str = "val_auc"):
        super().__init__()
        self.path = calibration_path(checkpoint)
        self.key_metric = key_metric
        self.best = -math.inf

    def _completed(self, engine: Any) -> None:
        score = float(engine.state.metrics.get(self.key_metric, math.nan))
        if not self._labels or math.isnan(score) or score < self.best:
            return
        self.best = score
        self.write(np.stack(self._probabilities), np.asarray(self._labels))

    def write(self, probabilities: np.ndarray, labels: np.ndarray) -> Path:
        from volumes.atomic import atomic_write_bytes

        calibration = fit_calibration(np.log(probabilities + 1e-12), labels)
        calibrated = calibration.apply_to_probabilities(probabilities)
        content = {
            **calibration.as_dict(), "fitted_on": "validation split", "cases": int(len(labels)),
            "val_ece": expected_calibration_error(probabilities, labels),
            "val_ece_calibrated": expected_calibration_error(calibrated, labels),
            "val_brier": brier_score(probabilities, labels),
            "val_brier_calibrated": brier_score(calibrated, labels),
        }
        text = json.dumps(content, indent=1) + "\n"
        atomic_write_bytes(self.path, lambda handle: handle.write(text.encode()))
        logger.info("calibration (%s): %s, because %s", self.path.name, calibration.method, calibration.reason)
        return self.path

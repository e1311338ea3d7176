"""Quality control of segmentations: a score and a pass / review flag per organ and per case.

A segmentation model gives a mask for every case, good or not. This module measures,
while the segmenter predicts, five signs that a mask should be checked by a person:

* ``ood``: the case looks unlike the training data: the mean distance of its slice
  embeddings (the encoder's class tokens, each dimension standardised by the training
  slices' mean and spread) to their ``k`` nearest training slices, from a small index
  saved with the checkpoint;
* ``volume``: the organ's volume is implausible against the training labels' volumes
  (log scale, both directions: a missing or a swollen organ);
* ``margin``: low confidence: the mean softmax margin (top-1 minus top-2 probability)
  over the organ's voxels;
* ``agreement``: the 2D decoder and the 3D refinement disagree: the Dice between the
  argmax of the 2D logits and of the refined logits, over the organ;
* ``fragments``: the mask falls apart: the fraction of its voxels outside its largest
  connected component (26-connected).

Each sign becomes a z-score against a robust reference (median and scaled MAD, with a
floor on the scale: :data:`SCALE_FLOORS`), one-sided where only one direction is bad. An
organ's score is the largest of its z-scores; a case's score is the largest of its organs'
and of its ``ood`` z-score. A score above the threshold flags ``review``, otherwise
``pass``, and the reasons name the signs above the threshold.

Where the references come from (:func:`fit_reference`, run at the end of training by the
segmentation bundle's :class:`FitQualityControl`):

* the embedding index and the volume reference: the training split (the labels' volumes);
* the ``ood`` reference: the case distances of the validation split, and of each training
  case against the index without its own slices;
* ``margin``, ``agreement`` and ``fragments``: the validation split's predictions, a centre
  per organ and one scale pooled over the organs;
* the threshold: the validation split's organs scored leave-one-case-out (each case
  against references fitted without it); the smallest threshold that flags at most 10% of
  the organs with Dice >= 0.8 (:data:`FALSE_ALARM_TARGET`), never below :data:`MIN_THRESHOLD`.

Saved beside the checkpoint: ``model.qc.json`` (references, threshold, validation figures;
readable) and ``model.qc_index.npy`` (the index). :func:`load_quality_reference` reads them
at inference (:class:`volumes.inference.SegmentationPredictor`); a checkpoint without them
gets no QC, said once in the log. docs/QC.md has the study of the flag on corrupted cases.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

# Measuring a case lives in volumes.quality_measure; re-exported here, where callers import it from.
import volumes.quality_measure as _measure
from volumes.metrics import binary_auc
from volumes.quality_measure import SegmentationProbe, attached, dice_per_organ, measure_case, predict_with_probe

_components = _measure._components  # still reachable as volumes.quality._components

logger = logging.getLogger(__name__)

__all__ = [
    "FEATURES", "MIN_THRESHOLD", "SCALE_FLOORS", "DICE_BAR", "FitQualityControl", "QualityReference",
    "SegmentationProbe", "attached", "dice_per_organ", "fit_reference", "load_quality_reference", "measure_case",
    "predict_with_probe", "quality_paths",
]

#: The signs, in the order reasons are listed when equal.
FEATURES = ("ood", "volume", "margin", "agreement", "fragments")
#: What each sign means, for reasons shown to users.
MEANING = {
    "ood": "unusual image", "volume": "implausible volume", "margin": "low confidence",
    "agreement": "2D and 3D disagree", "fragments": "fragmented mask",
}
#: Which direction is bad: ``high`` (above the reference), ``low`` or ``both``.
DIRECTION = {"ood": "high", "volume": "both", "margin": "low", "agreement": "low", "fragments": "high"}
#: Smallest scale of each z-score: ``ood`` relative to its centre; ``volume`` in log(1 + mL)
#: (0.1: about 10%); margin, agreement and fragment fraction in their own units (0..1).
#: A reference of a few validation cases can have a near-zero spread; the floor keeps a
#: tiny difference from becoming a large z.
SCALE_FLOORS = {"ood": 0.1, "volume": 0.1, "margin": 0.02, "agreement": 0.02, "fragments": 0.01}
#: The threshold is never below this (in z units).
MIN_THRESHOLD = 2.0
#: An organ "needs review" in the validation and the study when its Dice is below this.
DICE_BAR = 0.8
#: The threshold flags at most this fraction of the validation organs with Dice >= DICE_BAR.
FALSE_ALARM_TARGET = 0.1
K_NEIGHBOURS = 5
INDEX_SIZE = 2048


def quality_paths(checkpoint: str | Path) -> tuple[Path, Path]:
    """``model.pt`` -> (``model.qc.json``, ``model.qc_index.npy``) beside it."""
    checkpoint = Path(checkpoint)
    stem = checkpoint.name.rsplit(".", 1)[0]
    return checkpoint.with_name(f"{stem}.qc.json"), checkpoint.with_name(f"{stem}.qc_index.npy")


# ---------------------------------------------------------------------------- statistics
def _robust(values: Sequence[float], floor: float) -> dict[str, float]:
    """Median and scale (1.4826 x MAD, at least ``floor``) of the finite ``values``."""
    v = np.asarray([x for x in values if _finite(x)], dtype=np.float64)
    if v.size == 0:
        return {"center": None, "scale": None, "n": 0}
    center = float(np.median(v))
    return {"center": center, "scale": max(1.4826 * float(np.median(np.abs(v - center))), floor), "n": int(v.size)}


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _plain(value: Any, digits: int = 4) -> Any:
    """JSON-ready: floats rounded, NaN as None (strict JSON has no NaN)."""
    if isinstance(value, float):
        return round(value, digits) if math.isfinite(value) else None
    return value


def _z(feature: str, value: float, stats: Mapping[str, Any]) -> float:
    if not _finite(value) or not stats or not _finite(stats.get("center")):
        return math.nan
    delta = (value - stats["center"]) / stats["scale"]
    direction = DIRECTION[feature]
    return max(0.0, delta if direction == "high" else -delta if direction == "low" else abs(delta))


def _standardise(embeddings: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """Each dimension centred and scaled by the training slices' mean and standard deviation."""
    return (np.asarray(embeddings, np.float32) - mean) / std


def _knn_distance(queries: np.ndarray, index: np.ndarray, k: int) -> np.ndarray:
    """Per query row, the mean Euclidean distance to its ``k`` nearest rows of ``index``, over sqrt(dimensions).

    Euclidean rather than cosine: a shift of the whole image (wrong intensity scale, noise)
    moves the embeddings' length as much as their direction.
    """
    if len(queries) == 0 or len(index) == 0:
        return np.zeros(0)
    squared = (queries ** 2).sum(1)[:, None] + (index ** 2).sum(1)[None, :] - 2.0 * queries @ index.T
    k = min(k, index.shape[0])
    nearest = np.partition(np.maximum(squared, 0.0), k - 1, axis=1)[:, :k]
    return np.sqrt(nearest).mean(axis=1) / math.sqrt(queries.shape[1])


# ---------------------------------------------------------------------------- the fitted reference
@dataclass
class QualityReference:
    """What QC compares a case with: fitted by :func:`fit_reference`, saved beside the checkpoint.

    ``assess(measurements)`` scores one case (:func:`measure_case`'s output).
    """

    labels: list[str]
    index: np.ndarray  # [N, E] standardised training-slice embeddings
    mean: np.ndarray
    std: np.ndarray
    ood: dict[str, float]
    organs: dict[str, dict[str, dict[str, float]]]  # organ -> feature -> {center, scale, n}
    threshold: float
    k: int = K_NEIGHBOURS
    validation: dict[str, Any] = field(default_factory=dict)

    def ood_distance(self, embeddings: np.ndarray) -> float:
        """Mean over the case's slices of the distance to their nearest training slices."""
        if embeddings is None or len(embeddings) == 0:
            return math.nan
        return float(_knn_distance(_standardise(embeddings, self.mean, self.std), self.index, self.k).mean())

    def z_scores(self, measurements: Mapping[str, Any]) -> tuple[float, float, dict[str, dict[str, float]]]:
        """The case's ``ood`` distance and z-score, and every organ's z-score per sign."""
        distance = self.ood_distance(measurements.get("embeddings"))
        ood_z = _z("ood", distance, self.ood)
        organs = {}
        for name, values in measurements["organs"].items():
            ref = self.organs.get(name, {})
            organs[name] = {
                "volume": _z("volume", math.log1p(max(values["volume_ml"], 0.0)), ref.get("volume", {})),
                "margin": _z("margin", values["margin"], ref.get("margin", {})),
                "agreement": _z("agreement", values["agreement"], ref.get("agreement", {})),
                "fragments": _z("fragments", values["fragment_fraction"], ref.get("fragments", {})),
            }
        return distance, ood_z, organs

    def assess(self, measurements: Mapping[str, Any]) -> dict[str, Any]:
        """Score, flag and reasons of one case and of each of its organs (JSON-ready, rounded).

        An organ's score is the largest z of its own signs; the case's is the largest of its
        organs' scores and its ``ood`` z.
        """
        distance, ood_z, z = self.z_scores(measurements)
        organs, reasons, scores = {}, [], [ood_z] if math.isfinite(ood_z) else []
        if math.isfinite(ood_z) and ood_z > self.threshold:
            reasons.append(MEANING["ood"])
        for name, values in measurements["organs"].items():
            finite = {k: v for k, v in z[name].items() if math.isfinite(v)}
            score = max(finite.values(), default=0.0)
            scores.append(score)
            above = sorted((k for k, v in finite.items() if v > self.threshold), key=lambda k: -finite[k])
            organs[name] = {
                "score": round(score, 3), "flag": "review" if score > self.threshold else "pass",
                "reasons": [MEANING[k] for k in above], "z": {k: round(v, 3) for k, v in finite.items()},
                **{k: _plain(v) for k, v in values.items()},
            }
            reasons += [f"{name}: {MEANING[k]}" for k in above]
        case_score = max(scores, default=0.0)
        return {
            "score": round(case_score, 3), "flag": "review" if case_score > self.threshold else "pass",
            "threshold": round(self.threshold, 3), "reasons": reasons,
            "ood_distance": _plain(distance, 5), "ood_z": _plain(ood_z, 3), "organs": organs,
        }

    # ------------------------------------------------------------------ files
    def save(self, checkpoint: str | Path) -> tuple[Path, Path]:
        """Write ``model.qc_index.npy`` then ``model.qc.json`` (with the index's hash) atomically."""
        from volumes.atomic import atomic_path, atomic_write_bytes

        json_path, index_path = quality_paths(checkpoint)
        with atomic_path(index_path, suffix=".npy") as tmp:
            np.save(tmp, np.ascontiguousarray(self.index, dtype=np.float32), allow_pickle=False)
        content = {
            "method": "volumes.quality (docs/QC.md)", "labels": self.labels, "threshold": self.threshold,
            "k": self.k, "ood": self.ood, "organs": self.organs, "validation": self.validation,
            "embedding_mean": [float(v) for v in self.mean], "embedding_std": [float(v) for v in self.std],
            "index_file": index_path.name, "index_shape": list(self.index.shape),
            "index_sha256": hashlib.sha256(index_path.read_bytes()).hexdigest(),
        }
        text = json.dumps(content, indent=1, allow_nan=False) + "\n"
        atomic_write_bytes(json_path, lambda handle: handle.write(text.encode()))
        return json_path, index_path

    @classmethod
    def load(cls, checkpoint: str | Path) -> QualityReference:
        """Read the pair written by :meth:`save`.

        Raises:
            VolumesError: a file is missing, unreadable, or the index is not the one the JSON describes.
        """
        from volumes.errors import VolumesError

        json_path, index_path = quality_paths(checkpoint)
        try:
            content = json.loads(json_path.read_text())
            index_bytes = index_path.read_bytes()
            if hashlib.sha256(index_bytes).hexdigest() != content["index_sha256"]:
                raise ValueError(f"{index_path.name} is not the index this file was written with (sha256 differs)")
            index = np.load(index_path, allow_pickle=False)
            reference = cls(labels=list(content["labels"]), index=index,
                            mean=np.asarray(content["embedding_mean"], np.float32),
                            std=np.asarray(content["embedding_std"], np.float32), ood=dict(content["ood"]),
                            organs=content["organs"], threshold=float(content["threshold"]), k=int(content["k"]),
                            validation=content.get("validation", {}))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise VolumesError(f"{json_path}: unreadable quality-control reference ({exc})") from exc
        if reference.index.ndim != 2 or reference.index.shape[1] != len(reference.mean):
            raise VolumesError(f"{index_path}: index of shape {reference.index.shape} does not fit "
                               f"{len(reference.mean)}-dimensional embeddings")
        return reference


def load_quality_reference(checkpoint: str | Path | None, labels: Sequence[str] | None = None
                           ) -> QualityReference | None:
    """The QC reference saved with ``checkpoint``; None (no QC, logged) when it has none.

    Raises:
        VolumesError: the files are broken, or fitted for other labels than ``labels``.
    """
    from volumes.errors import VolumesError

    if checkpoint is None:
        return None
    json_path, _ = quality_paths(checkpoint)
    if not json_path.is_file():
        logger.info("%s: no %s beside it (trained before quality control): outputs carry no QC flag",
                    checkpoint, json_path.name)
        return None
    reference = QualityReference.load(checkpoint)
    if labels is not None and list(labels) != reference.labels:
        raise VolumesError(f"{json_path}: fitted for labels {reference.labels}, the bundle has {list(labels)}")
    return reference


# ---------------------------------------------------------------------------- fitting
def _pooled(values: Mapping[str, Sequence[float]], floor: float) -> dict[str, dict[str, float]]:
    """Per organ: its median, and one scale for all organs (1.4826 x the median absolute deviation
    of every value from its organ's median, at least ``floor``): a few validation cases cannot
    estimate a spread per organ, all their organs together can."""
    centers = {name: _robust(v, floor)["center"] for name, v in values.items()}
    deviations = [abs(x - centers[name]) for name, v in values.items() for x in v
                  if _finite(x) and centers[name] is not None]
    scale = max(1.4826 * float(np.median(deviations)), floor) if deviations else None
    return {name: {"center": centers[name], "scale": scale if centers[name] is not None else None,
                   "n": sum(_finite(x) for x in values[name])} for name in values}


def _organ_reference(labels: Sequence[str], train_volumes: Sequence[Mapping[str, float]],
                     validation: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
    """Volume per organ from the training labels; margin, agreement and fragments per organ from the
    validation predictions, with a scale pooled over the organs."""
    names = list(labels[1:])
    pooled = {sign: _pooled({n: [m["organs"][n][key] for m in validation] for n in names}, SCALE_FLOORS[sign])
              for sign, key in (("margin", "margin"), ("agreement", "agreement"), ("fragments", "fragment_fraction"))}
    return {n: {"volume": _robust([math.log1p(v.get(n, 0.0)) for v in train_volumes], SCALE_FLOORS["volume"]),
                **{sign: pooled[sign][n] for sign in pooled}} for n in names}


def _ood_reference(values: Sequence[float]) -> dict[str, float]:
    stats = _robust(values, 0.0)
    if stats["center"] is not None:
        stats["scale"] = max(stats["scale"], SCALE_FLOORS["ood"] * abs(stats["center"]), 1e-6)
    return stats


def choose_threshold(scores: Sequence[float], positive: Sequence[bool]) -> tuple[float, str]:
    """The flag's threshold from validation scores: at most :data:`FALSE_ALARM_TARGET` of the organs
    with Dice >= 0.8 flagged, and never below :data:`MIN_THRESHOLD`.

    The smallest such threshold also flags the most organs below the bar, so the positives
    do not change the choice (only what is reported about it). Returns the threshold and
    how it was chosen.
    """
    s, y = np.asarray(scores, np.float64), np.asarray(positive, bool)
    negatives = np.sort(s[~y])
    if negatives.size == 0:
        return MIN_THRESHOLD, "no validation organ with Dice >= 0.8: the minimum"
    allowed = math.floor(FALSE_ALARM_TARGET * negatives.size)  # negatives that may lie above the threshold
    threshold = float(negatives[negatives.size - 1 - allowed])
    return max(threshold, MIN_THRESHOLD), (f"at most {100 * FALSE_ALARM_TARGET:.0f}% of the {negatives.size} validation "
                                           "organs with Dice >= 0.8 flagged")


def fit_reference(labels: Sequence[str], train_embeddings: Sequence[np.ndarray],
                  train_volumes: Sequence[Mapping[str, float]], validation: Sequence[Mapping[str, Any]],
                  validation_dice: Sequence[Mapping[str, float]], *, index_size: int = INDEX_SIZE,
                  k: int = K_NEIGHBOURS, seed: int = 0) -> QualityReference:
    """Fit the QC reference and its threshold.

    Args:
        labels: label names, background first.
        train_embeddings: per training case, its slices' embeddings ``[n, E]``.
        train_volumes: per training case, the labels' organ volumes in mL.
        validation: per validation case, :func:`measure_case`'s output.
        validation_dice: per validation case, Dice per organ of its prediction (:func:`dice_per_organ`).
        index_size: at most this many training slices in the index (a seeded random subset).
    """
    labels = list(labels)
    cases = [np.asarray(e, np.float32) for e in train_embeddings if len(e)]
    if not cases:
        raise ValueError("fit_reference needs the embeddings of at least one training case")
    every = np.concatenate(cases)
    mean, std = every.mean(axis=0), np.maximum(every.std(axis=0), 1e-6)
    owner = np.concatenate([np.full(len(e), i) for i, e in enumerate(cases)])
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(len(every), size=min(index_size, len(every)), replace=False))
    index, owner = _standardise(every[chosen], mean, std), owner[chosen]
    # each training case against the index without its own slices: in-distribution distances
    loco = []
    for i in range(len(cases)):
        others = index[owner != i]
        if len(others):
            loco.append(float(_knn_distance(_standardise(cases[i], mean, std), others, k).mean()))
    partial = QualityReference(labels, index, mean, std, {}, {}, MIN_THRESHOLD, k)
    val_distance = [partial.ood_distance(m.get("embeddings")) for m in validation]

    def reference_without(skip: int | None) -> QualityReference:
        keep = [i for i in range(len(validation)) if i != skip]
        return QualityReference(labels, index, mean, std, _ood_reference(loco + [val_distance[i] for i in keep]),
                                _organ_reference(labels, train_volumes, [validation[i] for i in keep]),
                                MIN_THRESHOLD, k)

    scores, positive = [], []
    for i, (measurements, dice) in enumerate(zip(validation, validation_dice)):
        scorer = reference_without(i if len(validation) > 1 else None)
        _, _, z = scorer.z_scores(measurements)
        for name in labels[1:]:
            scores.append(max((v for v in z[name].values() if math.isfinite(v)), default=0.0))
            positive.append(dice[name] < DICE_BAR)
    threshold, how = choose_threshold(scores, positive)
    reference = reference_without(None)
    reference.threshold = threshold
    s, y = np.asarray(scores), np.asarray(positive, bool)
    reference.validation = {
        "cases": len(validation), "organs": int(s.size), "organs_below_dice_bar": int(y.sum()),
        "dice_bar": DICE_BAR, "threshold_rule": how, "scored": "leave one case out",
        "auroc": _plain(binary_auc(s, y)) if s.size else None,
        "flagged": int((s > threshold).sum()),
        "false_alarm_rate": _plain(float((s[~y] > threshold).mean())) if (~y).any() else None,
        "sensitivity": _plain(float((s[y] > threshold).mean())) if y.any() else None,
        "training_cases": len(cases), "index_slices": int(len(index)),
    }
    return reference


# ---------------------------------------------------------------------------- with a network
def _slices_cls(network: torch.nn.Module, image: torch.Tensor, device: Any) -> np.ndarray:
    from volumes.encoders import volume_to_slices

    raw = image.as_tensor() if hasattr(image, "as_tensor") else image
    slices = volume_to_slices(raw[None].to(device).float())
    with torch.inference_mode():
        cls = network.encoder(slices, with_grids=False).cls
    probe = SegmentationProbe()
    probe.add_slices(slices, cls)
    return probe.embeddings


def _label_volumes(label: torch.Tensor, labels: Sequence[str]) -> dict[str, float]:
    from volumes.arrays import spacing_mm
    from volumes.segmentation import organ_volumes_ml

    values = np.asarray(label.as_tensor() if hasattr(label, "as_tensor") else label)[0]
    return organ_volumes_ml(values.astype(np.uint8), spacing_mm(label.affine), labels)


class FitQualityControl:
    """Training handler: at the end of training, fit QC for the best checkpoint and save it beside it.

    On the trainer's ``COMPLETED`` event (early stopping included) the best weights
    (``checkpoint``) are loaded into the network for the fit and the training weights put
    back after it. Also callable directly (:meth:`fit`): the segmentation bundle's
    ``python -m monai.bundle run fit_quality --config_file configs/train.json`` fits QC for
    an existing checkpoint.

    Args:
        checkpoint: the checkpoint the saver writes (``models/model.pt``).
        network: the bundle's network.
        preprocessing: image-and-label transforms to the network's grid (the bundle's
            ``preprocessing``, with labels).
        inferer: the validation inferer (slabs).
        training_items, validation_items: the datalist sections.
        labels: label names (background first).
        device: where the network runs.
        max_training_cases: at most this many training cases feed the index and the volumes.
    """

    def __init__(self, checkpoint: str | Path, network: torch.nn.Module, preprocessing: Any, inferer: Any,
                 training_items: Sequence[Mapping[str, Any]], validation_items: Sequence[Mapping[str, Any]],
                 labels: Sequence[str], device: Any = "cpu", max_training_cases: int = 64):
        self.checkpoint = Path(checkpoint)
        self.network, self.preprocessing, self.inferer = network, preprocessing, inferer
        self.training_items, self.validation_items = list(training_items), list(validation_items)
        self.labels, self.device, self.max_training_cases = list(labels), device, int(max_training_cases)

    def attach(self, engine: Any) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.COMPLETED, lambda _: self.fit())

    def fit(self) -> QualityReference | None:
        """Load the best checkpoint, fit, save; returns the reference (None without validation cases)."""
        if not self.validation_items or not self.training_items:
            logger.warning("quality control not fitted: it needs training and validation cases")
            return None
        saved = {k: v.detach().clone() for k, v in self.network.state_dict().items()}
        try:
            if self.checkpoint.is_file():
                from volumes.bundle import load_network_weights

                load_network_weights(self.network, self.checkpoint)
            self.network.eval()
            reference = self._fit()
        finally:
            self.network.load_state_dict(saved)
        json_path, _ = reference.save(self.checkpoint)
        v = reference.validation
        logger.info("quality control fitted (%s): threshold %.2f, %d validation organs (%d below Dice %.1f), "
                    "AUROC %s, false alarms %s", json_path, reference.threshold, v["organs"],
                    v["organs_below_dice_bar"], DICE_BAR, _fmt(v["auroc"]), _fmt(v["false_alarm_rate"]))
        return reference

    def _fit(self) -> QualityReference:
        from volumes.arrays import spacing_mm

        embeddings, volumes = [], []
        for item in self.training_items[: self.max_training_cases]:
            data = self.preprocessing(dict(item))
            embeddings.append(_slices_cls(self.network, data["image"], self.device))
            volumes.append(_label_volumes(data["label"], self.labels))
        measured, dice = [], []
        for item in self.validation_items:
            data = self.preprocessing(dict(item))
            probe = SegmentationProbe()
            logits = predict_with_probe(self.network, self.inferer, data["image"], self.device, probe)
            measurements = measure_case(logits, probe, spacing_mm(data["image"].affine), self.labels)
            prediction = logits.argmax(0).numpy()
            measured.append(measurements)
            dice.append(dice_per_organ(prediction, np.asarray(data["label"])[0], self.labels))
        return fit_reference(self.labels, embeddings, volumes, measured, dice)


def _fmt(value: float | None) -> str:
    return f"{value:.3f}" if _finite(value) else "n/a"

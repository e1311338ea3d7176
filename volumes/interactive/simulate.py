"""The standard click protocol, for any interactive method.

* The first click is positive, at the object's centre: the voxel farthest (in mm) from
  its border.
* Each next click goes to the centre (same rule) of the largest error region of the
  current result: the largest 26-connected component of false negatives or of false
  positives, whichever has more voxels; positive for a missed region, negative for a
  wrong one.

:func:`run_protocol` applies it to a method (a callable from the clicks so far to a
mask) and records Dice and seconds after every click; :func:`clicks_to_reach` reads the
clicks a method needed for a Dice.
"""

from __future__ import annotations

import time
from typing import Callable, Sequence

import numpy as np
from scipy import ndimage

__all__ = ["centre_of", "next_click", "dice", "run_protocol", "clicks_to_reach", "Method"]

Method = Callable[[list[tuple[int, int, int]], list[tuple[int, int, int]], list[bool]], np.ndarray]


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    pred, truth = np.asarray(pred, bool), np.asarray(truth, bool)
    total = pred.sum() + truth.sum()
    return 1.0 if total == 0 else float(2 * (pred & truth).sum() / total)


def centre_of(region: np.ndarray, spacing: Sequence[float]) -> tuple[int, int, int]:
    """The voxel of ``region`` farthest from its border (mm); the first such voxel on ties."""
    padded = np.pad(region, 1)
    distance = ndimage.distance_transform_edt(padded, sampling=spacing)[1:-1, 1:-1, 1:-1]
    return tuple(int(v) for v in np.unravel_index(int(np.argmax(distance)), region.shape))  # type: ignore[return-value]


def _largest(region: np.ndarray) -> tuple[np.ndarray, int]:
    labels, n = ndimage.label(region, structure=np.ones((3, 3, 3)))
    if n == 0:
        return region, 0
    sizes = np.bincount(labels.ravel())[1:]
    best = int(np.argmax(sizes)) + 1
    return labels == best, int(sizes[best - 1])


def next_click(truth: np.ndarray, pred: np.ndarray, spacing: Sequence[float]) -> tuple[tuple[int, int, int], bool] | None:
    """The protocol's next click on ``pred`` against ``truth``: (voxel, positive), or None when they agree."""
    missed, n_missed = _largest(truth & ~pred)
    wrong, n_wrong = _largest(pred & ~truth)
    if n_missed == 0 and n_wrong == 0:
        return None
    if n_missed >= n_wrong:
        return centre_of(missed, spacing), True
    return centre_of(wrong, spacing), False


def run_protocol(method: Method, truth: np.ndarray, spacing: Sequence[float], clicks: int = 10,
                 ) -> list[dict[str, float]]:
    """Dice and seconds after each of ``clicks`` protocol clicks (stops early at a perfect result)."""
    truth = np.asarray(truth, bool)
    fg: list[tuple[int, int, int]] = [centre_of(truth, spacing)]
    bg: list[tuple[int, int, int]] = []
    order = [True]
    rows = []
    for i in range(clicks):
        start = time.perf_counter()
        pred = np.asarray(method(list(fg), list(bg), list(order)), bool)
        seconds = time.perf_counter() - start
        rows.append({"click": i + 1, "dice": dice(pred, truth), "seconds": seconds})
        if i + 1 == clicks:
            break
        step = next_click(truth, pred, spacing)
        if step is None:
            break
        point, positive = step
        (fg if positive else bg).append(point)
        order.append(positive)
    return rows


def clicks_to_reach(rows: Sequence[dict[str, float]], target: float) -> int | None:
    """The first click count whose Dice reaches ``target`` (None: not within the clicks run)."""
    return next((int(r["click"]) for r in rows if r["dice"] >= target), None)


def dice_at(rows: Sequence[dict[str, float]], click: int) -> float:
    """Dice after ``click`` clicks (the last one reached when the protocol stopped early at a perfect result)."""
    reached = [r for r in rows if r["click"] <= click]
    return float(reached[-1]["dice"]) if reached else float("nan")

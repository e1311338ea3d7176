"""Clicks in, mask out: the click model applied window by window, with its guarantees.

:class:`ClickSegmenter` turns the clicks on one object (loaded-grid voxel indices) into a
mask on the loaded grid. Clicks are applied in order; click ``i`` re-predicts only the
window of the working grid around it, from every click inside that window, and

* a positive click's voxel is in the result, a negative click's voxel is not (set after
  the network, on the loaded grid);
* voxels of the loaded grid outside the window of the new click keep their previous value.

:meth:`ClickSegmenter.segment` with all clicks at once replays them one by one, so the
result of a request with clicks ``1..n`` equals that of ``1..n-1`` followed by click
``n``. MONAI Label sends every click of the object with each request; when the previous
request's clicks are all among them, only the new ones run (:class:`ClickState`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

from volumes.interactive.model import ClickNet, click_maps, crop_window, guidance_json, window_slices
from volumes.interactive.session import VolumeFeatures

__all__ = ["ClickSegmenter", "ClickState", "Click"]

Click = tuple[tuple[int, int, int], bool]  # (loaded-grid index, positive)


@dataclass
class ClickState:
    """What one object's clicks produced so far (per volume and label)."""

    clicks: list[Click] = field(default_factory=list)
    mask: np.ndarray | None = None  # loaded grid, bool
    grid_prob: torch.Tensor | None = None  # working grid, float


class ClickSegmenter:
    """Applies a :class:`ClickNet` to a volume's features, click by click.

    Args:
        model: the click model (``eval`` mode is set here).
        window: ``(W, W, Wz)`` on the working grid; ``W`` a multiple of the patch size.
        device: where the model runs.
    """

    def __init__(self, model: ClickNet, window: Sequence[int] = (112, 112, 32), device: str | torch.device = "cpu"):
        self.model = model.eval().to(device)
        self.window = tuple(int(w) for w in window)
        self.device = torch.device(device)

    def window_of(self, vf: VolumeFeatures, grid_point: Sequence[int]) -> list[tuple[int, int]]:
        return window_slices(grid_point, vf.grid.grid_shape, self.window, vf.grid.patch_size)

    @torch.inference_mode()
    def window_probability(self, vf: VolumeFeatures, window: Sequence[tuple[int, int]],
                           foreground: np.ndarray, background: np.ndarray) -> torch.Tensor:
        """The model's probability on ``window`` (cropped to the grid) from working-grid clicks."""
        p = vf.grid.patch_size
        image = crop_window(vf.image.float(), window, value=float(vf.image.min()))
        feats = crop_window(vf.features.float(), window, scale=(p, p, 1)) if self.model.use_features else None
        starts = np.array([w[0] for w in window])
        stops = np.array([w[1] for w in window])

        def inside(points: np.ndarray) -> list:
            keep = [(q - starts).tolist() for q in points if np.all(q >= starts) and np.all(q < stops)]
            return keep

        maps = click_maps(image.shape[1:], guidance_json(inside(foreground), inside(background)), self.model.sigma)
        logits = self.model(None if feats is None else feats[None].to(self.device), image[None].to(self.device),
                            torch.from_numpy(maps)[None].to(self.device))
        prob = torch.sigmoid(logits.float())[0, 0].cpu()
        h, w, d = vf.grid.grid_shape
        return prob[: min(h, stops[0]) - starts[0], : min(w, stops[1]) - starts[1], : min(d, stops[2]) - starts[2]]

    def add_click(self, vf: VolumeFeatures, state: ClickState, click: Click) -> ClickState:
        """Apply one more click to ``state`` (in place) and return it."""
        shape = vf.grid.shape
        if state.mask is None:
            state.mask = np.zeros(shape, bool)
            state.grid_prob = torch.zeros(vf.grid.grid_shape)
        point = tuple(int(v) for v in click[0])
        if any(not 0 <= v < n for v, n in zip(point, shape)):
            raise ValueError(f"click {list(point)} is outside the volume of shape {list(shape)}")
        state.clicks.append((point, bool(click[1])))
        fg = vf.grid.to_grid([c for c, pos in state.clicks if pos]) if any(p for _, p in state.clicks) else np.zeros((0, 3), int)
        bg = vf.grid.to_grid([c for c, pos in state.clicks if not pos]) if any(not p for _, p in state.clicks) else np.zeros((0, 3), int)
        centre = vf.grid.to_grid([point])[0]
        window = self.window_of(vf, centre)
        h, w, d = vf.grid.grid_shape
        clipped = [(a, min(b, n)) for (a, b), n in zip(window, (h, w, d))]
        prob = self.window_probability(vf, window, fg, bg)
        state.grid_prob[clipped[0][0]:clipped[0][1], clipped[1][0]:clipped[1][1], clipped[2][0]:clipped[2][1]] = prob
        box = vf.grid.box_of(clipped)
        if all(b > a for a, b in box):
            values = vf.grid.sample(state.grid_prob, box) > 0.5
            state.mask[box[0][0]:box[0][1], box[1][0]:box[1][1], box[2][0]:box[2][1]] = values.numpy()
        for c, positive in state.clicks:  # every click's own voxel, as the user asked
            state.mask[c] = positive
        return state

    def segment(self, vf: VolumeFeatures, foreground: Sequence[Sequence[int]], background: Sequence[Sequence[int]] = (),
                state: ClickState | None = None, order: Sequence[bool] | None = None) -> tuple[np.ndarray, ClickState, dict[str, Any]]:
        """Mask for the clicks (positive first, then negative, unless ``order`` interleaves them).

        With a ``state`` whose clicks are all among these, only the others run, after them
        (a client that sends its positive and negative clicks as two lists still gets the
        order in which they came).
        """
        clicks = _ordered(foreground, background, order)
        if not any(pos for _, pos in clicks):
            raise ValueError("at least one positive (foreground) click is needed")
        start = time.perf_counter()
        if state is None or not state.clicks or not set(state.clicks) <= set(clicks):
            state = ClickState()
        done = set(state.clicks)
        new = [c for c in clicks if c not in done]
        for click in new:
            self.add_click(vf, state, click)
        assert state.mask is not None
        return state.mask.copy(), state, {"clicks_run": len(new), "head_s": time.perf_counter() - start}


def _ordered(foreground: Sequence[Sequence[int]], background: Sequence[Sequence[int]],
             order: Sequence[bool] | None) -> list[Click]:
    fg = [tuple(int(v) for v in p) for p in foreground]
    bg = [tuple(int(v) for v in p) for p in background]
    if order is None:
        return [(p, True) for p in fg] + [(p, False) for p in bg]
    if sum(order) != len(fg) or len(order) - sum(order) != len(bg):
        raise ValueError(f"order has {sum(order)} positive and {len(order) - sum(order)} negative entries; "
                         f"got {len(fg)} and {len(bg)} clicks")
    fi, bi = iter(fg), iter(bg)
    return [(next(fi), True) if pos else (next(bi), False) for pos in order]

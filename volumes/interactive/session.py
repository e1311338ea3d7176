"""Feature sessions: the encoder runs once per volume, every later click costs only a head.

:func:`encode_volume` prepares a loaded volume on its :class:`~volumes.interactive.grid.WorkGrid`
and keeps the encoder's patch grids (every requested layer, concatenated, fp16) and the
prepared intensities (fp16). :class:`FeatureStore` holds them in memory, least recently
used first out, within a byte budget, keyed by ``(input hash, model key)``: the SHA-256
of the input file(s) and the encoder's fingerprint plus the preparation, so an edited
file or another encoder never reuses stale features.

Memory per volume at 112 px with a 4-block ViT-S/14 (4 x 384 channels on an 8 x 8 grid):
``1536 * 64 * 2`` bytes per slice for the features and ``3 * 112 * 112 * 2`` for the
intensities, about 0.27 MB per slice: 33 MB for a 123-slice working grid.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from volumes.interactive.grid import WorkGrid

__all__ = ["VolumeFeatures", "FeatureStore", "encode_volume"]


@dataclass
class VolumeFeatures:
    """One volume on its working grid.

    Attributes:
        grid: the mapping between the loaded and the working grid.
        image: prepared intensities ``[3, H, W, D]`` (fp16).
        features: patch features ``[C, H / p, W / p, D]`` (fp16), the encoder's distinct layers concatenated.
        label: the working-grid label ``[H, W, D]`` when one was given (training, simulation).
        encode_s: seconds the encoder took.
    """

    grid: WorkGrid
    image: torch.Tensor
    features: torch.Tensor
    label: torch.Tensor | None = None
    encode_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        total = self.image.numel() * self.image.element_size() + self.features.numel() * self.features.element_size()
        return total + (0 if self.label is None else self.label.numel() * self.label.element_size())


def encode_volume(encoder: Any, volume: torch.Tensor, spacing: tuple[float, float, float], *, size: int = 112,
                  preset: str = "ct_abdomen_windows", label: torch.Tensor | None = None, resample_z: bool = True,
                  device: str | torch.device = "cpu") -> VolumeFeatures:
    """Prepare ``volume [1, X, Y, Z]`` (HU, RAS) and encode every working-grid slice once."""
    grid = WorkGrid(tuple(int(s) for s in volume.shape[1:]), tuple(float(s) for s in spacing), size=size,
                    patch_size=encoder.patch_size, resample_z=resample_z)
    image, grid_label = grid.prepare(volume, preset, label)
    start = time.perf_counter()
    slices = image.permute(3, 0, 1, 2).to(device)  # [D, 3, H, W]
    parts = []
    # each distinct block once (a shallow encoder repeats its last block in the default layers)
    distinct = [encoder.layers.index(i) for i in dict.fromkeys(encoder.layers)]
    with torch.inference_mode():
        for chunk in encoder.iter_chunks(slices, with_grids=True):
            grids = [chunk.patch_grids[i] for i in distinct]
            parts.append(torch.cat(grids, dim=1).to("cpu", torch.float16))  # [n, C, h, w]
    features = torch.cat(parts).permute(1, 2, 3, 0).contiguous()  # [C, h, w, D]
    return VolumeFeatures(grid=grid, image=image.to(torch.float16), features=features, label=grid_label,
                          encode_s=time.perf_counter() - start)


class FeatureStore:
    """An in-memory LRU of :class:`VolumeFeatures` within ``budget_bytes`` (thread-safe).

    ``get_or_compute(key, compute)`` returns ``(features, hit)``. A volume larger than the
    whole budget is still returned, but not kept.
    """

    def __init__(self, budget_bytes: int = 2 * 1024 ** 3):
        self.budget_bytes = int(budget_bytes)
        self._items: OrderedDict[Any, VolumeFeatures] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @property
    def nbytes(self) -> int:
        return sum(item.nbytes for item in self._items.values())

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: Any) -> bool:
        return key in self._items

    def get(self, key: Any) -> VolumeFeatures | None:
        with self._lock:
            item = self._items.get(key)
            if item is not None:
                self._items.move_to_end(key)
            return item

    def put(self, key: Any, item: VolumeFeatures) -> None:
        with self._lock:
            self._items[key] = item
            self._items.move_to_end(key)
            while self._items and self.nbytes > self.budget_bytes:
                self._items.popitem(last=False)

    def get_or_compute(self, key: Any, compute: Callable[[], VolumeFeatures]) -> tuple[VolumeFeatures, bool]:
        item = self.get(key)
        if item is not None:
            self.hits += 1
            return item, True
        self.misses += 1
        item = compute()
        self.put(key, item)
        return item, False

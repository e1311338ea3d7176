"""A click model folder, loaded: the session the MONAI Label app, the CLI and the bundle share.

A click model folder holds everything a server needs, no code::

    encoder.safetensors      the slice encoder (timm state dict; the random one written here when none is given)
    click_model.safetensors  the click network (ClickNet)
    click_model.json         its settings: network, training, and the encoder and preparation ("interactive")
    deepgrow3d.safetensors   (optional) the DeepGrow 3D baseline: the same network without features
    labels/<name>.safetensors + .json   few-shot labels saved by users (FewShotHead)
    tensorboard/             the training curves

:class:`InteractiveModel` loads such a folder and keeps a :class:`~volumes.interactive.FeatureStore`,
so the encoder runs once per volume, and the click state of the objects being clicked on
(:data:`MAX_OBJECT_STATES`, least recently used dropped first).
:mod:`volumes.interactive.workflow` trains a folder and runs the click protocol on it.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from volumes.interactive.fewshot import FewShotHead, keep_connected
from volumes.interactive.segmenter import ClickSegmenter, ClickState
from volumes.interactive.session import FeatureStore, VolumeFeatures, encode_volume
from volumes.interactive.training import load_click_model

__all__ = ["CLICK_MODEL", "DEEPGROW", "ENCODER_FILE", "MAX_OBJECT_STATES", "InteractiveConfig", "InteractiveModel",
           "fewshot_mask", "file_to_ras", "load_case", "load_encoder"]

CLICK_MODEL = "click_model.safetensors"
DEEPGROW = "deepgrow3d.safetensors"
ENCODER_FILE = "encoder.safetensors"
#: click states kept for incremental clicks (one per object a client is clicking on), least recently used dropped
MAX_OBJECT_STATES = 32


@dataclass
class InteractiveConfig:
    """The encoder and the preparation of a click model (saved in ``click_model.json`` as ``interactive``)."""

    encoder: str = "vit_small_patch14_dinov2"
    encoder_weights: str | None = None
    encoder_model_kwargs: dict[str, Any] = field(default_factory=lambda: {"depth": 4})
    size: int = 112
    preset: str = "ct_abdomen_windows"
    resample_z: bool = True


def load_encoder(config: InteractiveConfig, root: Path | None = None, seed: int = 0):
    """The frozen slice encoder of ``config`` (weights relative to ``root``)."""
    from volumes.encoders import SliceEncoder

    weights = config.encoder_weights
    if weights is not None and root is not None and not Path(weights).is_absolute():
        weights = str(root / weights)
    torch.manual_seed(seed)
    return SliceEncoder(config.encoder, weights=weights, model_kwargs=config.encoder_model_kwargs).eval()


def load_case(image: str | Path, label: str | Path | None = None) -> tuple[torch.Tensor, tuple[float, float, float], torch.Tensor | None, Any]:
    """A volume (RAS, HU) with its spacing and optional label on the same grid, and the loaded MetaTensor."""
    from volumes.arrays import spacing_mm
    from volumes.data.io import load_volume

    volume = load_volume(image)
    spacing = tuple(float(s) for s in spacing_mm(volume.affine))
    lab = None
    if label is not None:
        lab_volume = load_volume(label, dtype=None, mode="nearest")
        if tuple(lab_volume.shape[1:]) != tuple(volume.shape[1:]):
            raise ValueError(f"{label}: label shape {tuple(lab_volume.shape[1:])} differs from the image's "
                             f"{tuple(volume.shape[1:])} ({image})")
        lab = torch.as_tensor(np.asarray(lab_volume[0])).round().to(torch.int64)
    return torch.as_tensor(np.asarray(volume)).float(), spacing, lab, volume  # type: ignore[return-value]


def file_to_ras(points: Sequence[Sequence[int]], original_affine: Any, affine: Any, shape: Sequence[int]) -> list[tuple[int, int, int]]:
    """Voxel indices of the file as stored (what 3D Slicer and MONAI Label send) -> indices of the RAS-loaded grid.

    Raises:
        ValueError: a point outside the volume (the message names it and the shape).
    """
    original_affine, affine = np.asarray(original_affine, float), np.asarray(affine, float)
    to_ras = np.linalg.inv(affine) @ original_affine
    out = []
    for p in points:
        q = to_ras @ np.array([*map(float, p), 1.0])
        idx = tuple(int(round(v)) for v in q[:3])
        if any(not 0 <= v < n for v, n in zip(idx, shape)):
            raise ValueError(f"click {list(p)} is outside the image (RAS index {list(idx)}, shape {list(shape)})")
        out.append(idx)
    return out


class InteractiveModel:
    """A click model folder, loaded: encoder, click network, feature store, per-object click states.

    Args:
        root: the folder (``click_model.safetensors`` and its JSON inside).
        model_file: another network of the folder, e.g. ``deepgrow3d.safetensors``.
        budget_bytes: memory for cached volume features (LRU).
        device: where the encoder and the network run.
    """

    def __init__(self, root: str | Path, *, model_file: str = CLICK_MODEL, budget_bytes: int = 2 * 1024 ** 3,
                 device: str | torch.device = "cpu"):
        self.root = Path(root)
        model, settings = load_click_model(self.root / model_file)
        self.settings = settings
        self.config = InteractiveConfig(**settings["interactive"])
        self.window = tuple(settings["training"]["window"])
        self.device = torch.device(device)
        self.encoder = load_encoder(self.config, self.root).to(self.device)
        self.fingerprint = self.encoder.fingerprint()
        self.segmenter = ClickSegmenter(model, self.window, device=self.device)
        self.store = FeatureStore(budget_bytes)
        self._states: OrderedDict[Any, ClickState] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def model_key(self) -> str:
        c = self.config
        return f"{self.fingerprint[:16]}:{c.size}:{c.preset}:{int(c.resample_z)}"

    def encode(self, volume: torch.Tensor, spacing: Sequence[float], label: torch.Tensor | None = None) -> VolumeFeatures:
        """Encode a volume ``[1, X, Y, Z]`` (RAS, HU) on this model's working grid (no store)."""
        c = self.config
        return encode_volume(self.encoder, volume, tuple(spacing), size=c.size, preset=c.preset, label=label,
                             resample_z=c.resample_z, device=self.device)

    def features(self, volume: torch.Tensor, spacing: Sequence[float], key: str) -> tuple[VolumeFeatures, bool]:
        """The volume's features, from the store when this (input, model) was encoded before.

        ``key`` must name the input's content (:func:`volumes.data.io.source_sha256`), not its
        path: an edited file must never get stale features. The stored features carry no label
        (several labels may belong to one image): :meth:`label_grid` puts one on the grid.
        """
        return self.store.get_or_compute((key, self.model_key), lambda: self.encode(volume, spacing))

    def label_grid(self, vf: VolumeFeatures, volume: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        """``label`` (loaded grid) on ``vf``'s working grid, as :func:`encode_volume` prepares a label."""
        return vf.grid.prepare(volume, self.config.preset, label)[1]

    def click(self, vf: VolumeFeatures, foreground: Sequence[Sequence[int]], background: Sequence[Sequence[int]] = (),
              *, key: Any = None, order: Sequence[bool] | None = None) -> tuple[np.ndarray, dict[str, Any]]:
        """Mask (loaded grid) of the object the clicks mean; ``key`` names the object for incremental clicks."""
        with self._lock:
            state = self._states.pop(key, None) if key is not None else None
        mask, state, info = self.segmenter.segment(vf, foreground, background, state=state, order=order)
        if key is not None:
            with self._lock:
                self._states[key] = state
                while len(self._states) > MAX_OBJECT_STATES:
                    self._states.popitem(last=False)
        return mask, info

    # ------------------------------------------------------------ few-shot labels
    def labels_dir(self) -> Path:
        return self.root / "labels"

    def saved_labels(self) -> list[str]:
        return sorted(p.stem for p in self.labels_dir().glob("*.json")) if self.labels_dir().is_dir() else []

    def fewshot(self, vf: VolumeFeatures, annotation: np.ndarray, background: np.ndarray | None = None,
                clicks: Sequence[tuple[Sequence[int], bool]] = (),
                ) -> tuple[np.ndarray, FewShotHead, dict[str, Any]]:
        """Fit a head on painted slices (loaded grid, bool) and segment the volume with it.

        ``clicks`` correct it: ``(loaded-grid voxel, positive)`` pairs, each refitting the head with
        the click's neighbourhood as samples of its kind (:meth:`FewShotHead.add_click`); a positive
        click also keeps the component it lands in.
        """
        start = time.perf_counter()
        fg_grid = _to_working(vf, annotation)
        bg_grid = None if background is None else _to_working(vf, background)
        head = FewShotHead().fit_slices(vf, fg_grid, bg_grid)
        for point, positive in clicks:
            grid_point = vf.grid.to_grid([point])[0]
            head = head.add_click(vf, grid_point, positive)
            if positive:
                fg_grid = fg_grid.copy()
                fg_grid[tuple(int(v) for v in grid_point)] = True
        # folded: the saved head's arithmetic, so saving and applying it again draws this very mask
        head = head.folded()
        head.seeds = fg_grid
        fit_s = time.perf_counter() - start
        mask = fewshot_mask(vf, head, fg_grid)
        return mask, head, {"fit_s": fit_s, "head_s": time.perf_counter() - start}

    def save_label(self, head: FewShotHead, name: str, fitted_on: dict[str, Any] | None = None) -> Path:
        """Keep ``head`` as a label of the model (with the painted voxels it was fitted on, when known)."""
        if not name or any(ch in name for ch in "/\\.") or name != name.strip():
            raise ValueError(f"label name {name!r}: use letters, digits, '_' or '-'")
        self.labels_dir().mkdir(parents=True, exist_ok=True)
        grid = {"size": self.config.size, "preset": self.config.preset, "resample_z": self.config.resample_z}
        return head.save(self.labels_dir() / name, name=name, encoder_fingerprint=self.fingerprint, grid=grid,
                         seeds=head.seeds, fitted_on=fitted_on)

    def load_label(self, name: str) -> FewShotHead:
        path = self.labels_dir() / f"{name}.safetensors"
        if not path.is_file():
            raise ValueError(f"no saved label {name!r} in {self.labels_dir()} (saved: {self.saved_labels()})")
        return FewShotHead.load(path, self.fingerprint)


def _to_working(vf: VolumeFeatures, mask: np.ndarray) -> np.ndarray:
    """A loaded-grid mask on the working grid: in-plane nearest, each painted slice onto its nearest working slice.

    Merging thin slices must not lose a painted one: working slices get the union of the loaded
    slices that map to them.
    """
    grid = vf.grid
    (h, w), _, pad = grid.geometry
    out = np.zeros(grid.grid_shape, bool)
    painted = np.flatnonzero(np.asarray(mask).reshape(-1, mask.shape[-1]).any(axis=0))
    if len(painted) == 0:
        return out
    targets = grid.to_grid([(0, 0, int(z)) for z in painted])[:, 2]
    slices = torch.from_numpy(np.asarray(mask, np.float32)[..., painted]).permute(2, 0, 1)[:, None]  # [n, 1, X, Y]
    resized = torch.nn.functional.interpolate(slices, size=(h, w), mode="nearest-exact")[:, 0].numpy() > 0.5
    for z, plane in zip(targets, resized):
        out[pad[0][0]:pad[0][0] + h, pad[1][0]:pad[1][0] + w, z] |= plane
    return out


def fewshot_mask(vf: VolumeFeatures, head: FewShotHead, seeds_grid: np.ndarray) -> np.ndarray:
    """The head's mask on the loaded grid: probability > 0.5, components holding painted voxels."""
    prob = head.probability(vf)
    grid_mask = keep_connected(prob.numpy() > 0.5, seeds_grid)
    return vf.grid.sample(torch.from_numpy(grid_mask.astype(np.float32))).numpy() > 0.5

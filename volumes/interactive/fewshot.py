"""A new label from one to three annotated slices: a logistic head on the frozen patch features.

The user paints a structure on a few slices. Every voxel of those slices is a sample:
its patch features (the encoder's grids, bilinearly upsampled to the slice), its three
prepared intensities and their squares (so a linear head can draw an intensity band, an
organ between fat and bone, not only a threshold); inside the painted structure positive, elsewhere on those slices
negative. A logistic regression (L-BFGS, L2, classes balanced) is fitted in seconds and
segments the whole volume; since it is linear, its logits are computed on the patch grid
and upsampled, which is exact and cheap. The component(s) holding the painted voxels
are kept.

Clicks correct it: :meth:`FewShotHead.add_click` adds the click's neighbourhood
(radius 1.5 working voxels, on its slice) as positive or negative samples with a high
weight and refits the head.

:meth:`FewShotHead.save` writes the head as a new label of the model (safetensors and
JSON, no code), :meth:`FewShotHead.load` reads it back (refusing another encoder).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from volumes.interactive.session import VolumeFeatures

__all__ = ["FewShotHead", "annotated_slices", "keep_connected"]


def annotated_slices(label: np.ndarray) -> list[int]:
    """Slice indices (last axis) that hold any painted voxel."""
    return [int(z) for z in np.flatnonzero(np.asarray(label).reshape(-1, label.shape[-1]).any(axis=0))]


def keep_connected(mask: np.ndarray, seeds: np.ndarray) -> np.ndarray:
    """The components of ``mask`` (26-connected) that hold a voxel of ``seeds``; ``mask`` if none does."""
    labels, n = ndimage.label(mask, structure=np.ones((3, 3, 3)))
    if n == 0:
        return mask
    keep = np.unique(labels[seeds & mask])
    keep = keep[keep > 0]
    return np.isin(labels, keep) if keep.size else mask


class FewShotHead:
    """Logistic regression on (patch features, intensities, squared intensities) of a volume's working grid.

    Args:
        l2: L2 penalty on the weights (features are standardised first).
        iterations: L-BFGS iterations.
        negatives: at most this many negative voxels per fit (random, seeded).
    """

    def __init__(self, l2: float = 1e-3, iterations: int = 60, negatives: int = 40000, seed: int = 0):
        self.l2, self.iterations, self.negatives, self.seed = float(l2), int(iterations), int(negatives), int(seed)
        self.weight: torch.Tensor | None = None  # [C + 6]
        self.bias: float = 0.0
        self.mean: torch.Tensor | None = None
        self.std: torch.Tensor | None = None
        self.meta: dict[str, Any] = {}
        self.seeds: np.ndarray | None = None  # a saved head: the painted voxels it was fitted on (working grid)
        self._samples: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    # ------------------------------------------------------------------ samples
    @staticmethod
    def voxel_features(vf: VolumeFeatures, z: int) -> torch.Tensor:
        """``[H, W, C + 6]`` features of working-grid slice ``z``: patch features, intensities, their squares."""
        h, w, _ = vf.grid.grid_shape
        grid = vf.features[..., z].float()[None]  # [1, C, h', w']
        up = F.interpolate(grid, size=(h, w), mode="bilinear", align_corners=False)[0]
        image = vf.image[..., z].float()
        return torch.cat([up, image, image * image], dim=0).permute(1, 2, 0)

    def samples_from_slices(self, vf: VolumeFeatures, label: np.ndarray, background: np.ndarray | None = None,
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Samples of a working-grid ``label`` ``[H, W, D]`` (bool): painted slices, or scribbles with ``background``."""
        rng = np.random.default_rng(self.seed)
        xs, ys = [], []
        slices = annotated_slices(label if background is None else (label | background))
        if not slices:
            raise ValueError("the annotation has no painted voxel: paint the structure on one to three slices")
        for z in slices:
            feats = self.voxel_features(vf, z)
            pos = torch.from_numpy(label[..., z])
            neg = ~pos if background is None else torch.from_numpy(background[..., z])
            xs += [feats[pos], feats[neg]]
            ys += [torch.ones(int(pos.sum())), torch.zeros(int(neg.sum()))]
        x, y = torch.cat(xs), torch.cat(ys)
        if int(y.sum()) == 0:
            raise ValueError("the annotation has no voxel of the structure (only background)")
        negatives = torch.nonzero(y == 0)[:, 0]
        if negatives.numel() > self.negatives:
            drop = torch.from_numpy(rng.choice(negatives.numel(), negatives.numel() - self.negatives, replace=False))
            keep = torch.ones(len(y), dtype=torch.bool)
            keep[negatives[drop]] = False
            x, y = x[keep], y[keep]
        return x, y, torch.ones(len(y))

    # ------------------------------------------------------------------ fit
    def fit(self, x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor) -> "FewShotHead":
        self._samples = (x, y, weight)
        self.mean, self.std = x.mean(0), x.std(0).clamp_min(1e-3)
        z = (x - self.mean) / self.std
        pos = float((y * weight).sum())
        neg = float(((1 - y) * weight).sum())
        balance = torch.where(y > 0, 0.5 / max(pos, 1e-6), 0.5 / max(neg, 1e-6)) * weight
        w = torch.zeros(x.shape[1], requires_grad=True)
        b = torch.zeros(1, requires_grad=True)
        optimiser = torch.optim.LBFGS([w, b], max_iter=self.iterations, line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            optimiser.zero_grad()
            loss = (F.binary_cross_entropy_with_logits(z @ w + b, y, reduction="none") * balance).sum()
            loss = loss + self.l2 * (w * w).sum()
            loss.backward()
            return loss

        optimiser.step(closure)
        self.weight, self.bias = w.detach(), float(b.detach())
        return self

    def fit_slices(self, vf: VolumeFeatures, label: np.ndarray, background: np.ndarray | None = None) -> "FewShotHead":
        return self.fit(*self.samples_from_slices(vf, label, background))

    def add_click(self, vf: VolumeFeatures, grid_point: Sequence[int], positive: bool, weight: float = 20.0,
                  radius: float = 1.5) -> "FewShotHead":
        """Refit with the click's neighbourhood on its slice as samples of its kind."""
        if self._samples is None:
            raise RuntimeError("fit the head on annotated slices before adding clicks")
        x0, y0, z0 = (int(v) for v in grid_point)
        feats = self.voxel_features(vf, z0)
        h, w, _ = vf.grid.grid_shape
        yy, xx = np.mgrid[:h, :w]
        near = torch.from_numpy((yy - x0) ** 2 + (xx - y0) ** 2 <= radius ** 2)
        x, y, wt = self._samples
        n = int(near.sum())
        return self.fit(torch.cat([x, feats[near]]), torch.cat([y, torch.full((n,), float(positive))]),
                        torch.cat([wt, torch.full((n,), weight)]))

    # ------------------------------------------------------------------ predict
    def _split(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
        """Weights on the raw inputs: (patch features, intensities, squared intensities), bias."""
        assert self.weight is not None and self.mean is not None and self.std is not None
        scaled = self.weight / self.std
        bias = self.bias - float((self.mean * scaled).sum())
        return scaled[:-6], scaled[-6:-3], scaled[-3:], bias

    @torch.inference_mode()
    def probability(self, vf: VolumeFeatures, window: Sequence[tuple[int, int]] | None = None) -> torch.Tensor:
        """Working-grid probability ``[H, W, D]`` (or of ``window``)."""
        w_feat, w_img, w_sq, bias = self._split()
        h, w, d = vf.grid.grid_shape
        (x0, x1), (y0, y1), (z0, z1) = window or [(0, h), (0, w), (0, d)]
        feats = vf.features[..., z0:z1].float()  # [C, h', w', dz]
        patch_logits = torch.einsum("c,cxyz->zxy", w_feat, feats)[:, None]  # [dz, 1, h', w']
        up = F.interpolate(patch_logits, size=(h, w), mode="bilinear", align_corners=False)[:, 0].permute(1, 2, 0)
        image = vf.image[..., z0:z1].float()
        logits = up + torch.einsum("c,cxyz->xyz", w_img, image) + torch.einsum("c,cxyz->xyz", w_sq, image * image) + bias
        return torch.sigmoid(logits[x0:x1, y0:y1])

    def to_dict(self) -> dict[str, Any]:
        w_feat, w_img, w_sq, bias = self._split()
        return {"feature_weight": w_feat, "image_weight": w_img, "image_squared_weight": w_sq, "bias": torch.tensor([bias])}

    def folded(self) -> "FewShotHead":
        """The same head with the standardisation folded into its weights: what :meth:`save` writes and
        :meth:`load` reads, so a mask drawn with it is the mask a saved head draws again, voxel for voxel."""
        return FewShotHead._from_tensors(self.to_dict(), dict(self.meta))

    def save(self, path: str | Path, *, name: str, encoder_fingerprint: str, grid: dict[str, Any],
             seeds: np.ndarray | None = None, fitted_on: dict[str, Any] | None = None) -> Path:
        """Write the head as a label of the model: ``<path>.safetensors`` + ``<path>.json``.

        ``seeds`` (the painted voxels on the working grid) and ``fitted_on`` (the image's
        ``source_sha256`` and ``modality``) let the label draw the same mask again on that image
        (the components holding painted voxels) and say when it is used on another modality.
        """
        from safetensors.torch import save_file

        from volumes.atomic import atomic_path

        path = Path(path)
        tensors = {k: v.contiguous() for k, v in self.to_dict().items()}
        if seeds is not None:
            seeds = np.asarray(seeds, bool)
            tensors["seeds_packed"] = torch.from_numpy(np.packbits(seeds.reshape(-1)))
            tensors["seeds_shape"] = torch.tensor(seeds.shape, dtype=torch.int64)
        with atomic_path(path.with_suffix(".safetensors"), suffix=".safetensors") as tmp:
            save_file(tensors, str(tmp))
        meta = {"name": name, "encoder_fingerprint": encoder_fingerprint, "grid": grid, "kind": "fewshot-logistic",
                **({"fitted_on": fitted_on} if fitted_on else {})}
        with atomic_path(path.with_suffix(".json"), suffix=".json") as tmp:
            Path(tmp).write_text(json.dumps(meta, indent=1) + "\n")
        return path.with_suffix(".safetensors")

    @classmethod
    def load(cls, path: str | Path, encoder_fingerprint: str | None = None) -> "FewShotHead":
        from safetensors.torch import load_file

        path = Path(path)
        meta = json.loads(path.with_suffix(".json").read_text())
        if encoder_fingerprint is not None and meta["encoder_fingerprint"] != encoder_fingerprint:
            raise ValueError(f"{path}: the head {meta['name']!r} was fitted on another encoder's features "
                             f"({meta['encoder_fingerprint'][:12]}, this one is {encoder_fingerprint[:12]}); fit it again")
        return cls._from_tensors(load_file(str(path.with_suffix(".safetensors"))), meta)

    @classmethod
    def _from_tensors(cls, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> "FewShotHead":
        head = cls()
        squared = tensors.get("image_squared_weight", torch.zeros_like(tensors["image_weight"]))  # older heads: none
        weight = torch.cat([tensors["feature_weight"], tensors["image_weight"], squared])
        head.weight, head.bias = weight, float(tensors["bias"][0])
        head.mean, head.std = torch.zeros_like(weight), torch.ones_like(weight)
        head.meta = meta
        head.seeds = None
        if "seeds_packed" in tensors:
            shape = tuple(int(n) for n in tensors["seeds_shape"])
            bits = np.unpackbits(tensors["seeds_packed"].numpy())[: int(np.prod(shape))]
            head.seeds = bits.reshape(shape).astype(bool)
        return head

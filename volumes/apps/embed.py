"""Embed every slice of every case with a SliceEncoder and store the results.

One ``.npz`` per case under ``OUT/embeddings/``: ``cls`` ``[D, E]``, ``patch_mean``
``[D, E]``, ``registers`` ``[D, R, E]`` and ``slice_mm`` ``[D]`` (the slice positions
along the slicing axis in mm, from the first slice), plus ``OUT/embeddings.jsonl``
with one line per case. Files are written under a temporary name and renamed, so
an interrupted run never leaves a half-written embedding behind.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from volumes.atomic import atomic_write_bytes
from volumes.data.discovery import Case
from volumes.errors import VolumesError


@dataclass
class EmbedConfig:
    """Everything that decides what an embedding is (and so belongs in a cache key)."""

    encoder: str = "vit_small_patch14_dinov2"
    weights: str | None = None
    pretrained: bool = False
    preset: str = "soft_tissue"
    axis: str = "axial"
    channel_mode: str = "repeat"
    size: int | None = 224
    chunk_size: int = 32
    device: str = "auto"


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when present, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class CaseEmbedder:
    """Loads, prepares and encodes cases one at a time with one encoder."""

    def __init__(self, config: EmbedConfig):
        from volumes.encoders import SliceEncoder
        from volumes.transforms import preprocessing

        self.config = config
        self.device = resolve_device(config.device)
        self.encoder = SliceEncoder(
            config.encoder, pretrained=config.pretrained, weights=config.weights, chunk_size=config.chunk_size
        ).to(self.device)
        self.prepare = preprocessing(
            ("image",),
            preset=config.preset,
            axis=config.axis,
            channel_mode=config.channel_mode,
            patch_size=self.encoder.patch_size,
            size=config.size,
        )

    def load(self, case: Case) -> torch.Tensor:
        """Case -> prepared volume ``[3, H, W, D]`` (slicing axis last)."""
        from volumes.data.io import load_volume

        kwargs = {"series_uid": case.extra["series_uid"]} if "series_uid" in case.extra else {}
        image = load_volume(case.image, **kwargs)
        return self.prepare({"image": image})["image"]

    def encode(self, volume: torch.Tensor) -> dict[str, np.ndarray]:
        """Prepared volume ``[3, H, W, D]`` -> per-slice arrays (see the module docstring)."""
        slices = volume.as_tensor().permute(3, 0, 1, 2) if hasattr(volume, "as_tensor") else volume.permute(3, 0, 1, 2)
        features = self.encoder(slices.to(self.device, non_blocking=True).float(), with_grids=False)
        spacing = float(np.linalg.norm(np.asarray(volume.affine)[:3, 2])) if hasattr(volume, "affine") else 1.0
        return {
            "cls": features.cls.cpu().numpy(),
            "patch_mean": features.patch_mean.cpu().numpy(),
            "registers": features.registers.cpu().numpy(),
            "slice_mm": (np.arange(slices.shape[0]) * spacing).astype(np.float32),
        }


def embed_cases(cases: Sequence[Case], out_dir: str | Path, config: EmbedConfig, *, progress: bool = True) -> list[dict]:
    """Embed ``cases`` into ``out_dir``; returns one summary row per case (also in embeddings.jsonl).

    A case that cannot be read is reported in its row (``error``) and skipped; the
    other cases go on.
    """
    from tqdm.auto import tqdm

    out_dir = Path(out_dir)
    embedder = CaseEmbedder(config)
    rows: list[dict] = []
    for case in tqdm(cases, desc="embedding", unit="case", disable=not progress):
        row: dict = {"case_id": case.case_id, "image": str(case.image)}
        try:
            start = time.perf_counter()
            volume = embedder.load(case)
            loaded = time.perf_counter()
            arrays = embedder.encode(volume)
            encoded = time.perf_counter()
        except VolumesError as exc:
            rows.append({**row, "error": str(exc)})
            continue
        target = out_dir / "embeddings" / f"{case.case_id}.npz"
        atomic_write_bytes(target, lambda stream: np.savez(stream, **arrays))
        rows.append(
            {
                **row,
                "embedding": str(target.relative_to(out_dir)),
                "slices": int(arrays["cls"].shape[0]),
                "dim": int(arrays["cls"].shape[1]),
                "input_shape": list(volume.shape),
                "seconds_load": round(loaded - start, 3),
                "seconds_encode": round(encoded - loaded, 3),
            }
        )
    manifest = "\n".join(json.dumps(r) for r in rows) + "\n"
    atomic_write_bytes(out_dir / "embeddings.jsonl", lambda stream: stream.write(manifest.encode()))
    atomic_write_bytes(
        out_dir / "embed_config.json",
        lambda stream: stream.write(json.dumps({**asdict(config), "weights_id": embedder.encoder.weights_id}, indent=2).encode()),
    )
    return rows


def summarize(rows: Sequence[dict], out_dir: str | Path) -> str:
    """A few human lines about an embedding run, with a content sanity check.

    Neighbouring slices of one volume should embed closer to each other than distant
    slices or slices of other volumes; a broken pipeline (constant input, wrong axis)
    shows here.
    """
    out_dir = Path(out_dir)
    good = [r for r in rows if "error" not in r]
    lines = [f"embedded {len(good)}/{len(rows)} cases into {out_dir / 'embeddings'}"]
    if not good:
        return "\n".join(lines)
    slices = sum(r["slices"] for r in good)
    encode_s = sum(r["seconds_encode"] for r in good)
    lines.append(
        f"{slices} slices, {good[0]['dim']}-d CLS embeddings, {slices / max(encode_s, 1e-9):.1f} slices/s in the encoder, "
        f"{sum(r['seconds_load'] for r in good):.1f} s loading + preprocessing"
    )
    clouds = [np.load(out_dir / r["embedding"])["cls"] for r in good]
    lines.append(_similarity_line(clouds))
    for r in rows:
        if "error" in r:
            lines.append(f"FAILED {r['case_id']}: {r['error']}")
    return "\n".join(lines)


def _similarity_line(clouds: Sequence[np.ndarray], gap: int = 10, seed: int = 0) -> str:
    """Centred cosine similarity of slice embeddings ``[D, E]`` per case: near, far and across cases.

    Centring removes the direction every slice shares (large in ViT class tokens),
    so the numbers show what the embeddings say about content.
    """
    mean = np.concatenate(clouds).mean(axis=0)
    unit = [(c - mean) / np.maximum(np.linalg.norm(c - mean, axis=1, keepdims=True), 1e-12) for c in clouds]
    near = np.mean([np.sum(u[1:] * u[:-1], axis=1).mean() for u in unit if len(u) > 1])
    far = [np.sum(u[gap:] * u[:-gap], axis=1).mean() for u in unit if len(u) > gap]
    rng = np.random.default_rng(seed)
    pairs = [(i, j) for i in range(len(unit)) for j in range(len(unit)) if i != j]
    across = [
        np.sum(unit[i][rng.integers(len(unit[i]), size=64)] * unit[j][rng.integers(len(unit[j]), size=64)], axis=1).mean()
        for i, j in pairs
    ]
    text = f"centred cosine similarity of slice embeddings: neighbouring slices {near:.2f}"
    if far:
        text += f", {gap} slices apart {np.mean(far):.2f}"
    if across:
        text += f", random slices of different cases {np.mean(across):.2f}"
    return text

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
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from volumes.atomic import atomic_write_bytes
from volumes.data.discovery import Case
from volumes.encoders.config import EncoderConfig
from volumes.errors import volumes_error_in


def embed_cases(cases: Sequence[Case], out_dir: str | Path, encoder: EncoderConfig, preprocessing: Mapping[str, Any],
                *, device: str = "auto", cache_dir: str | Path | None = None, progress: bool = True) -> list[dict]:
    """Embed ``cases`` into ``out_dir``; returns one summary row per case (also in embeddings.jsonl).

    Through :class:`volumes.embedding.SliceEmbedder` with :class:`~volumes.embedding.TokenFeatures`
    (and the embedding cache when ``cache_dir`` is given). ``preprocessing``: keyword
    arguments of :func:`volumes.transforms.preprocessing` (``preset``, ``axis``,
    ``channel_mode``, ``size``). A case that cannot be read is reported in its row
    (``error``) and skipped; the other cases go on.
    """
    from monai.transforms import Compose
    from tqdm.auto import tqdm

    from volumes.data.io import LoadVolumed
    from volumes.devices import resolve_device
    from volumes.embedding import SliceEmbedder, TokenFeatures
    from volumes.transforms import preprocessing as prepare

    out_dir = Path(out_dir)
    model = encoder.build(mode="frozen").to(resolve_device(device))
    transform = Compose([LoadVolumed("image"), prepare(("image",), patch_size=model.patch_size, **preprocessing)])
    embedder = SliceEmbedder(TokenFeatures(model), transform, preprocessing, cache_dir=cache_dir,
                             device=next(model.parameters()).device, progress=False)
    rows: list[dict] = []
    for case in tqdm(cases, desc="embedding", unit="case", disable=not progress):
        item = case.to_dict()
        row: dict = {"case_id": case.case_id, "image": str(case.image)}
        try:
            start = time.perf_counter()
            arrays = embedder.arrays_of(item)
            seconds = time.perf_counter() - start
        except Exception as exc:  # a case that cannot be read is reported; the others go on
            cause = volumes_error_in(exc)
            if cause is None:
                raise
            rows.append({**row, "error": str(cause)})
            continue
        target = out_dir / "embeddings" / f"{case.case_id}.npz"
        atomic_write_bytes(target, lambda stream: np.savez(stream, **arrays))
        rows.append({**row, "embedding": str(target.relative_to(out_dir)), "slices": int(arrays["cls"].shape[0]),
                     "dim": int(arrays["cls"].shape[1]), "seconds": round(seconds, 3)})
    manifest = "\n".join(json.dumps(r) for r in rows) + "\n"
    atomic_write_bytes(out_dir / "embeddings.jsonl", lambda stream: stream.write(manifest.encode()))
    config = {"encoder": encoder.name, "weights_id": model.weights_id, "encoder_config": encoder.to_dict(),
              "preprocessing": dict(preprocessing), "device": str(embedder.device)}
    atomic_write_bytes(out_dir / "embed_config.json", lambda stream: stream.write(json.dumps(config, indent=2).encode()))
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
    seconds = sum(r["seconds"] for r in good)
    lines.append(f"{slices} slices, {good[0]['dim']}-d CLS embeddings, {slices / max(seconds, 1e-9):.1f} slices/s "
                 "(loading, preprocessing and encoding)")
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

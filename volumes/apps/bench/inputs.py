"""What the sections of ``volumes bench`` share: section names, the synthetic CTs, the bundles and their weights."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Sequence

SECTIONS = ("a", "b", "c", "d", "e", "f")
SECTION_TITLES = {
    "a": "Encoder efficiency", "b": "Pipeline overhead", "c": "Memory", "d": "Embedding cache",
    "e": "3D peers", "f": "CUDA",
}
BUNDLE_KEYS = ("seg", "cls")  # volumes.apps.bench_infer's names of the two bundles


def bench_infer_module():
    """:mod:`volumes.apps.bench_infer` (bundle paths, random weights, the memory children), imported on first use."""
    from volumes.apps import bench_infer

    return bench_infer


def parse_volume(text: str) -> tuple[int, int, int]:
    """``"512x512x200"`` -> ``(512, 512, 200)``; the generator makes square slices, so X must equal Y."""
    parts = text.lower().replace("*", "x").split("x")
    try:
        dims = tuple(int(p) for p in parts)
    except ValueError:
        dims = ()
    if len(dims) != 3 or min(dims) < 1 or dims[0] != dims[1]:
        raise argparse.ArgumentTypeError(f"{text!r}: expected SIZExSIZExSLICES with square slices, e.g. 512x512x200")
    if dims[2] < 2:
        raise argparse.ArgumentTypeError(f"{text!r}: at least 2 slices (the runner rejects single-slice volumes)")
    return dims  # type: ignore[return-value]


def synthetic_ct(folder: Path, dims: Sequence[int], seed: int = 0) -> Path:
    """Phantom ``seed`` streamed to a ``dims`` CT (:mod:`volumes.data.phantoms.streaming`), cached in ``folder``."""
    from volumes.data.phantoms.streaming import cached_ct

    size, _, slices = dims
    return cached_ct(folder, size, slices, seed, say=lambda line: print(line, flush=True))


def bundle_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """``--set`` style overrides of the bundles' inference configs from ``--model-kwargs`` / ``--bundle-size``."""
    overrides: dict[str, Any] = {}
    if args.model_kwargs:
        overrides["encoder_model_kwargs"] = dict(args.model_kwargs)
    if args.bundle_size:
        overrides["preprocessing_config#size"] = int(args.bundle_size)
    return overrides


def bundle_weights(args: argparse.Namespace, keys: Sequence[str]) -> dict[str, Path]:
    """Random-initialised checkpoints (seed 0) of the bundles with this run's overrides."""
    bi = bench_infer_module()
    overrides = bundle_overrides(args)
    tag = "default" if not overrides else _short_hash(json.dumps(overrides, sort_keys=True))
    paths = bi.write_weights(Path(args.out) / "weights" / tag, list(keys), overrides)
    return dict(zip(keys, paths))


def _short_hash(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode()).hexdigest()[:10]


def _load_bundle(args: argparse.Namespace, key: str, weights: Path, device):
    from volumes.inference import load_bundle

    return load_bundle(bench_infer_module().bundle_path(key), device=device, weights=weights,
                       overrides=bundle_overrides(args))

"""Section d of ``volumes bench``: classification through a fresh embedding cache, cold then warm."""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from volumes.apps.bench.inputs import _load_bundle, bundle_weights, synthetic_ct
from volumes.apps.bench.timing import _median, _TimedCall, synchronize
from volumes.devices import resolve_device


def bench_cache(args: argparse.Namespace, device=None) -> dict[str, Any]:
    """Classify ``--cache-cases`` distinct CTs twice through a fresh embedding cache: cold, then warm.

    The classification bundle's network with a :class:`~volumes.embedding.SliceEmbedder`
    (the bundle's preprocessing, a temporary cache folder): per case, hash the file for its
    source key; cold: load and prepare the volume, hash its voxels for the content key,
    encode and store both entries; warm: read the source entry. Then the aggregator's
    logits and slice importance. Repeated with a new cache folder each time;
    a first untimed pass warms the file system and the encoder.
    """
    import torch

    from volumes.embedding import SliceEmbedder

    device = device or resolve_device(args.device)
    dims = args.cache_volume or args.volume
    volumes = [synthetic_ct(Path(args.out) / "volumes", dims, seed=i) for i in range(args.cache_cases)]
    items = [{"image": str(path), "case_id": f"ct{i}"} for i, path in enumerate(volumes)]
    model = _load_bundle(args, "cls", bundle_weights(args, ["cls"])["cls"], device)
    network = model.predictor.network

    def classify_all(embedder) -> float:
        seconds = 0.0
        for item in items:
            out = embedder.embed_item(item)
            synchronize(device)
            start = time.perf_counter()
            with torch.inference_mode():
                x = out["embedding"][None].to(device)
                logits, importance = network.aggregator.forward_with_importance(x, None, out["positions"][None].to(device))
                torch.softmax(logits.float(), dim=-1).cpu(), importance.cpu()
            synchronize(device)
            seconds += time.perf_counter() - start
        return seconds

    def run(cache_dir: Path) -> dict[str, Any]:
        embedder = SliceEmbedder(network, model.predictor.transform, model.settings["preprocessing"],
                                 cache_dir=cache_dir, device=device, progress=False)
        embedder.transform = prepare = _TimedCall(embedder.transform, device)
        embedder.cache_key_of = key = _TimedCall(embedder.cache_key_of, device)
        embedder.source_key_of = source = _TimedCall(embedder.source_key_of, device)
        embedder._compute = encode = _TimedCall(embedder._compute, device)
        synchronize(device)
        start = time.perf_counter()
        classify = classify_all(embedder)
        total = time.perf_counter() - start
        stages = {"source_hash": source.seconds, "load_preprocess": prepare.seconds, "voxel_hash": key.seconds,
                  "encode": encode.seconds, "classify": classify}
        stages["cache_io"] = max(0.0, total - sum(stages.values()))
        return {"total_s": total, "stages_s": stages, "hits": embedder.cache.stats.get("hits"),
                "misses": embedder.cache.stats.get("misses")}

    cold, warm = [], []
    with tempfile.TemporaryDirectory(prefix="volumes-bench-cache-") as tmp:
        for index in range(args.warmup + args.repeats):
            cache_dir = Path(tmp) / f"run{index}"
            first, second = run(cache_dir), run(cache_dir)
            shutil.rmtree(cache_dir, ignore_errors=True)
            if index >= args.warmup:
                cold.append(first)
                warm.append(second)

    def summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
        stages = sorted({s for r in runs for s in r["stages_s"]})
        return {"total_s": _median([r["total_s"] for r in runs]), "times_s": [round(r["total_s"], 4) for r in runs],
                "stages_s": {s: _median([r["stages_s"][s] for r in runs]) for s in stages},
                "hits": runs[-1]["hits"], "misses": runs[-1]["misses"]}

    cold_s, warm_s = summary(cold), summary(warm)
    return {"cases": args.cache_cases, "volume": "x".join(map(str, dims)), "encoder": network.encoder.name,
            "encoder_depth": network.encoder.depth, "aggregator": model.settings.get("aggregator"),
            "device": str(device), "cold": cold_s, "warm": warm_s, "speedup": cold_s["total_s"] / warm_s["total_s"]}

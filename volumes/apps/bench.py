"""``python -m volumes bench``: speed and memory of slice encoding and of the pipeline around it.

    python -m volumes bench                                   # every section, default sizes
    python -m volumes bench --sections a b --slices 64 --size 224 --threads 16
    python -m volumes bench --sections f --encoder vit_base_patch14_dinov2 --size 518 --slices 128

Every comparison is measured side by side in one run: variants of one comparison are
warmed up, then timed in rotating order, ``--repeats`` times each (``time.perf_counter``,
``torch.cuda.synchronize`` around every call on CUDA); the median is reported.

Sections (each a function below returning a dict of measured numbers):

a. :func:`bench_encoder` - :class:`~volumes.encoders.SliceEncoder` on ``--slices`` slices
   against timm's own ``forward_features`` on the identical batch, dtype and threads (and
   against timm on the same chunks, which separates chunking from the wrapper), the
   features' agreement, FLOPs per slice (``torch.utils.flop_counter.FlopCounterMode`` on
   one forward; the analytic ViT count beside it) and the achieved FLOP/s against a
   square matmul timed in the same run.
b. :func:`bench_pipeline` - one bundle at a time over a synthetic CT of ``--volume``
   (the generator of ``volumes.apps.bench_infer``) with :class:`volumes.inference.BatchInference`,
   the code ``volumes infer`` runs; wall time against the encoder alone on the same
   prepared slices, split into hash / load / preprocess / encode / decode or aggregate /
   invert / write / figure / other (merged tables and report).
c. :func:`bench_memory` - ``volumes.apps.bench_infer``'s child-process measurement of peak
   RSS against the RSS after the models are built, for 64 / 256 / 768 slices of 512 x 512.
d. :func:`bench_cache` - classification of a few distinct CTs through the embedding cache
   (:class:`volumes.classification.SliceEmbedder` on a fresh cache folder): first run
   (cold: encodes and stores) against the second (warm: reads).
e. :func:`bench_peers` - the segmentation bundle against MONAI SwinUNETR (feature size 48)
   and a MONAI 3D UNet with ``sliding_window_inference`` (96^3 windows) on one synthetic CT,
   each in its own process: time and peak-memory growth. On CPU the CT is generated
   smaller (``--peer-volume``) so the 3D networks finish in minutes.
f. :func:`bench_accelerator` - CUDA only: fp32, TF32, bf16 autocast with and without SDPA,
   SDPA's flash kernel, bf16 weights, ``torch.compile`` and CUDA graphs
   (``mode="reduce-overhead"``), and the SliceEncoder; slices/s, TFLOP/s and MFU against
   ``--peak-tflops`` or the dense bf16 peak of a known GPU.

Writes ``OUT/bench.json`` and ``OUT/bench.md`` (atomically, after every section) and
prints the markdown. This module imports torch only when a benchmark runs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

from volumes.devices import resolve_device
from volumes.paths import CHECKOUT
from volumes.reporting import available_cores, markdown_table, write_json_and_markdown

SECTIONS = ("a", "b", "c", "d", "e", "f")
SECTION_TITLES = {
    "a": "Encoder efficiency", "b": "Pipeline overhead", "c": "Memory", "d": "Embedding cache",
    "e": "3D peers", "f": "CUDA",
}
BUNDLE_KEYS = ("seg", "cls")  # volumes.bench_infer's names of the two bundles
CHILD_MARKER = "VOLUMES_BENCH_RESULT "
MIB = 2**20
GOALS = {"encoder_vs_timm": 0.95, "pipeline_ratio": 1.3, "cache_speedup": 10.0, "mfu": 0.40}
# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) by a substring of torch.cuda.get_device_name();
# the first match wins, so the more specific names come first.
KNOWN_PEAKS_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM5 (e.g. "NVIDIA H100 80GB HBM3")
    ("H200", 989.0),
    ("A100", 312.0),
    ("L40S", 362.0),
)


# ============================================================================ helpers
def bench_infer_module():
    """:mod:`volumes.apps.bench_infer`: the synthetic CT generator, random weights and the memory children."""
    from volumes.apps import bench_infer

    return bench_infer


def synchronize(device) -> None:
    import torch

    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _stats(times: Sequence[float]) -> dict[str, Any]:
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
            "repeats": len(times), "times_s": [round(t, 6) for t in times]}


def _error(exc: BaseException) -> str:
    """``Type: first line of the message``."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def compare(fns: Mapping[str, Callable[[], Any]], *, repeats: int, warmup: int = 1, device=None,
            warmups: Mapping[str, int] | None = None) -> dict[str, dict[str, Any]]:
    """Time several variants side by side: warm each up, then ``repeats`` rounds in rotating order.

    Returns per variant ``median_s``, ``min_s``, ``max_s``, ``times_s`` - or ``error`` when
    its warm-up raised (a ``torch.compile`` that fails, say); the others still run.
    """
    results: dict[str, dict[str, Any]] = {}
    live: dict[str, Callable[[], Any]] = {}
    for name, fn in fns.items():
        try:
            for _ in range((warmups or {}).get(name, warmup)):
                fn()
            synchronize(device)
            live[name] = fn
        except Exception as exc:  # a variant that cannot run is a result, not a crash
            results[name] = {"error": _error(exc)}
    names = list(live)
    times: dict[str, list[float]] = {name: [] for name in names}
    for index in range(max(1, repeats)):
        shift = index % len(names) if names else 0
        for name in names[shift:] + names[:shift]:  # no variant always runs first (caches, clocks)
            synchronize(device)
            start = time.perf_counter()
            live[name]()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    for name in names:
        results[name] = _stats(times[name])
    return {name: results[name] for name in fns}


def timed(fn: Callable[[], Any], *, repeats: int, warmup: int = 1, device=None) -> dict[str, Any]:
    """Warm-up, then the median of ``repeats`` calls of ``fn``."""
    return compare({"fn": fn}, repeats=repeats, warmup=warmup, device=device)["fn"]


def count_flops(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[int, dict[str, int]]:
    """FLOPs of one call (``torch.utils.flop_counter.FlopCounterMode``): total and per aten op.

    Counts matmuls, convolutions and attention (2 FLOPs per multiply-add); element-wise
    work (norms, activations) is not counted.
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        fn(*args, **kwargs)
    per_op = {str(op).removeprefix("aten."): int(n) for op, n in counter.get_flop_counts().get("Global", {}).items()}
    return int(counter.get_total_flops()), per_op


def vit_flops_formula(tokens: int, dim: int, depth: int, patches: int = 0, patch_size: int = 0,
                      channels: int = 3, mlp_hidden: int | None = None) -> int:
    """Matmul FLOPs of one image through a ViT: ``depth * (24 N D^2 + 4 N^2 D)`` with an MLP ratio of 4.

    Per block: qkv ``6ND^2``, projection ``2ND^2``, MLP ``4 N D H`` (``H = 4D``: ``16ND^2``),
    attention scores and weighted sum ``4N^2D``; plus the patch embedding
    ``2 * patches * (channels p^2) * D``. ``N`` counts every token (class and registers too).
    """
    hidden = 4 * dim if mlp_hidden is None else mlp_hidden
    block = 8 * tokens * dim * dim + 4 * tokens * dim * hidden + 4 * tokens * tokens * dim
    return depth * block + 2 * patches * channels * patch_size * patch_size * dim


def analytic_vit_flops(backbone, height: int, width: int) -> int | None:
    """:func:`vit_flops_formula` for a timm ViT at ``height x width`` (None for other MLPs)."""
    try:
        p = backbone.patch_embed.patch_size[0]
        patches = (height // p) * (width // p)
        dim = backbone.embed_dim
        total = 2 * patches * 3 * p * p * dim
        tokens = patches + backbone.num_prefix_tokens
        for block in backbone.blocks:
            fc1, fc2 = block.mlp.fc1, block.mlp.fc2  # SwiGLUPacked: fc1 -> 2H, fc2 H -> D
            mlp = 2 * tokens * dim * fc1.out_features + 2 * tokens * fc2.in_features * dim
            total += 8 * tokens * dim * dim + mlp + 4 * tokens * tokens * dim
        return total
    except AttributeError:
        return None


def gemm_peak(device, *, n: int = 2048, dtype=None, repeats: int = 5) -> dict[str, Any]:
    """FLOP/s of a square ``n x n`` matmul (``2 n^3`` FLOPs) on ``device``: the machine's matmul peak."""
    import torch

    dtype = dtype or torch.float32
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=generator).to(device, dtype)
    b = torch.randn(n, n, generator=generator).to(device, dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    with torch.inference_mode():
        result = timed(lambda: torch.matmul(a, b, out=out), repeats=repeats, device=device)
    result.update({"n": n, "dtype": str(dtype).removeprefix("torch."), "flop_per_s": 2 * n**3 / result["median_s"]})
    return result


def raw_timm(name: str, model_kwargs: Mapping[str, Any] | None = None, state_dict=None):
    """timm's own model as :class:`SliceEncoder` builds it (``num_classes=0``, ``dynamic_img_size``), unwrapped."""
    import timm

    model = timm.create_model(name, pretrained=False, num_classes=0, dynamic_img_size=True, **dict(model_kwargs or {}))
    if state_dict is not None:
        model.load_state_dict(state_dict)
    return model.eval()


@contextlib.contextmanager
def _attention(model, fused: bool) -> Iterator[None]:
    """Set timm's ``fused_attn`` (SDPA) on every attention module for one call, then restore it."""
    modules = [m for m in model.modules() if hasattr(m, "fused_attn")]
    before = [m.fused_attn for m in modules]
    for m in modules:
        m.fused_attn = fused
    try:
        yield
    finally:
        for m, value in zip(modules, before):
            m.fused_attn = value


@contextlib.contextmanager
def _tf32(enabled: bool) -> Iterator[None]:
    import torch

    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


class _StageTimer:
    """Forward hooks that add up the time spent inside one module (and the slices it saw)."""

    def __init__(self, module, device):
        self.device = device
        self.seconds = 0.0
        self.calls = 0
        self.items = 0
        self._start = 0.0
        self._handles = [module.register_forward_pre_hook(self._pre), module.register_forward_hook(self._post)]

    def _pre(self, module, args) -> None:
        synchronize(self.device)
        self.items += int(args[0].shape[0]) if args and hasattr(args[0], "shape") else 0
        self._start = time.perf_counter()

    def _post(self, module, args, output) -> None:
        synchronize(self.device)
        self.seconds += time.perf_counter() - self._start
        self.calls += 1

    def reset(self) -> None:
        self.seconds, self.calls, self.items = 0.0, 0, 0

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


class _TimedCall:
    """Wraps a callable attribute (a predictor's postprocessing, an embedder's step) and adds up its time."""

    def __init__(self, fn: Callable[..., Any], device=None):
        self.fn = fn
        self.device = device
        self.seconds = 0.0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        synchronize(self.device)
        start = time.perf_counter()
        try:
            return self.fn(*args, **kwargs)
        finally:
            synchronize(self.device)
            self.seconds += time.perf_counter() - start


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
    """A synthetic CT from ``volumes.apps.bench_infer`` (written once, then reused from ``folder``)."""
    bi = bench_infer_module()
    size, _, slices = dims
    if seed == 0:
        return bi.cached_ct(folder, size, slices)
    path = folder / f"ct_{size}x{size}x{slices}_seed{seed}_v{bi.GENERATOR_VERSION}.nii.gz"
    if not path.is_file():
        bi.write_ct(path, size, slices, seed=seed)
    return path


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


def _median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


# ============================================================================ a. encoder
def bench_encoder(args: argparse.Namespace, device=None) -> dict[str, Any]:
    """SliceEncoder vs timm's ``forward_features`` on the same ``--slices`` x 3 x ``--size`` batch.

    Variants, timed side by side under ``torch.inference_mode`` and the encoder's autocast:
    timm on the whole batch, timm on the encoder's chunks, the encoder without grids
    (class token, registers, mean patch token: what classification uses), timm's
    ``forward_intermediates`` at the encoder's layers and the encoder with grids (what
    segmentation uses). ``encoder_vs_timm`` = timm time / encoder time (1 = no overhead).
    """
    import torch

    from volumes.encoders import SliceEncoder

    device = device or resolve_device(args.device)
    n, size = args.slices, args.size
    encoder = SliceEncoder(args.encoder, chunk_size=args.chunk_size, autocast=args.autocast,
                           model_kwargs=args.model_kwargs).to(device).eval()
    timm_model = raw_timm(args.encoder, args.model_kwargs, encoder.backbone.state_dict()).to(device)
    x = torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)
    autocast = lambda: encoder._autocast_context(x.device)  # noqa: E731  (the encoder's own dtype choice)
    unique_layers = sorted(set(encoder.layers))

    def timm_batch():
        with torch.inference_mode(), autocast():
            return timm_model.forward_features(x)

    def timm_chunks():
        with torch.inference_mode(), autocast():
            return [timm_model.forward_features(part) for part in x.split(encoder.chunk_size)]

    def timm_intermediates():
        with torch.inference_mode(), autocast():
            return timm_model.forward_intermediates(x, indices=unique_layers, norm=encoder.norm_intermediates,
                                                    output_fmt="NCHW")

    variants = {
        "timm forward_features (one batch)": timm_batch,
        f"timm forward_features (chunks of {encoder.chunk_size})": timm_chunks,
        "SliceEncoder (no grids)": lambda: encoder(x, with_grids=False),
        "timm forward_intermediates (one batch)": timm_intermediates,
        "SliceEncoder (with grids)": lambda: encoder(x, with_grids=True),
    }
    times = compare(variants, repeats=args.repeats, warmup=args.warmup, device=device)

    # the same input through both: do they compute the same features?
    with torch.inference_mode():
        reference = timm_batch().float()
        ours = encoder(x, with_grids=False)
    prefix = encoder.num_prefix_tokens
    parity = {
        "max_abs_diff_cls": float((reference[:, 0] - ours.cls).abs().max()),
        "max_abs_diff_patch_mean": float((reference[:, prefix:].mean(dim=1) - ours.patch_mean).abs().max()),
    }
    flops, per_op = count_flops(timm_model.forward_features, x[:1])
    analytic = analytic_vit_flops(timm_model, size, size)
    gemm = gemm_peak(device, n=args.gemm_size or (8192 if device.type == "cuda" else 2048), repeats=args.repeats)
    timm_key, enc_key = "timm forward_features (one batch)", "SliceEncoder (no grids)"
    rows = {}
    for name, result in times.items():
        if "median_s" in result:
            rate = n * flops / result["median_s"]
            rows[name] = {**result, "slices_per_s": n / result["median_s"], "flop_per_s": rate,
                          "fraction_of_gemm_peak": rate / gemm["flop_per_s"],
                          "vs_timm_batch": times[timm_key].get("median_s", float("nan")) / result["median_s"]}
        else:
            rows[name] = result
    grids_ratio = (times["timm forward_intermediates (one batch)"].get("median_s", float("nan"))
                   / times["SliceEncoder (with grids)"].get("median_s", float("nan")))
    return {
        "encoder": args.encoder, "model_kwargs": args.model_kwargs, "slices": n, "size": size,
        "chunk_size": encoder.chunk_size, "dtype": "bfloat16" if _uses_bf16(encoder, device) else "float32",
        "device": str(device), "tokens_per_slice": (size // encoder.patch_size) ** 2 + prefix,
        "flops_per_slice": flops, "flops_per_slice_by_op": per_op, "flops_per_slice_analytic": analytic,
        "gemm": gemm, "variants": rows, "parity": parity,
        "encoder_vs_timm": rows[enc_key].get("vs_timm_batch"),
        "encoder_vs_timm_chunks": (times[f"timm forward_features (chunks of {encoder.chunk_size})"].get("median_s", float("nan"))
                                   / times[enc_key].get("median_s", float("nan"))),
        "grids_encoder_vs_timm": grids_ratio,
        "fraction_of_gemm_peak": rows[enc_key].get("fraction_of_gemm_peak"),
    }


def _uses_bf16(encoder, device) -> bool:
    return encoder.autocast == "bf16" or (encoder.autocast == "auto" and device.type == "cuda")


# ============================================================================ b. pipeline
def _predictions(output: Path) -> list[dict[str, Any]]:
    path = output / "predictions.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def _failure(output: Path) -> str:
    path = output / "failures.csv"
    return path.read_text().strip() if path.is_file() else "no predictions written"


def bench_pipeline(args: argparse.Namespace, device=None) -> dict[str, Any]:
    """End-to-end ``BatchInference`` of one synthetic CT per bundle against the encoder alone.

    One case per run, ``workers=0`` (stages run one after the other, so they add up),
    figures as ``volumes infer`` draws them unless ``--no-figures``. The encoder's forward
    hooks time ``encode`` inside the network; ``decode / aggregate`` is the rest of the
    network's time (decoder, 3D refinement and sliding-window stitching, or the slice
    aggregator); ``invert`` is the segmentation postprocessing (softmax, argmax, ``Invertd``
    back to the input grid); ``other`` is whatever the wall time holds beyond the stages
    (records, merged tables, the HTML report). The pure encoder time is the same encoder
    on the prepared volume's slices, each slice once.
    """
    import torch

    from volumes.encoders.slice_encoder import volume_to_slices
    from volumes.inference import BatchInference

    device = device or resolve_device(args.device)
    volume = synthetic_ct(Path(args.out) / "volumes", args.volume)
    weights = bundle_weights(args, args.bundles)
    result: dict[str, Any] = {"volume": "x".join(map(str, args.volume)), "volume_file": str(volume),
                              "figures": not args.no_figures, "device": str(device), "bundles": {}}
    for key in args.bundles:
        model = _load_bundle(args, key, weights[key], device)
        predictor = model.predictor
        network = predictor.network
        encoder = network.encoder
        seg = model.task == "segmentation"
        timer = _StageTimer(encoder, device)
        invert = None
        if seg:
            invert = predictor.postprocessing = _TimedCall(predictor.postprocessing, device)
        folder = Path(args.out) / "pipeline" / model.bundle_id
        runs = []
        try:
            for index in range(args.warmup + args.repeats):
                output = folder / "output"
                shutil.rmtree(output, ignore_errors=True)
                runner = BatchInference([model], output, workers=0, figures=not args.no_figures, progress=False)
                timer.reset()
                if invert is not None:
                    invert.seconds = 0.0
                synchronize(device)
                start = time.perf_counter()
                summary = runner.run([{"image": str(volume), "case_id": "ct"}])
                wall = time.perf_counter() - start
                rows = _predictions(output)
                if not summary.ok or not rows:
                    raise RuntimeError(f"{model.bundle_id}: the case failed: {_failure(output)}")
                if index < args.warmup:
                    continue
                stages = dict(rows[0]["timings_s"])
                infer = stages.pop("infer")
                stages["encode"] = timer.seconds
                stages["invert"] = invert.seconds if invert is not None else 0.0
                stages["decode" if seg else "aggregate"] = max(0.0, infer - timer.seconds - stages["invert"])
                stages["other"] = max(0.0, wall - sum(stages.values()))
                runs.append({"wall_s": wall, "stages_s": stages, "encoded_slices": timer.items,
                             "encoder_calls": timer.calls})
        finally:
            timer.remove()
            if invert is not None:
                predictor.postprocessing = invert.fn
        # the pure encoder: the prepared volume's own slices, once each, in the encoder's chunks
        prepared = predictor.prepare({"image": str(volume)})["image"]
        raw = prepared.as_tensor() if hasattr(prepared, "as_tensor") else prepared
        slices = volume_to_slices(raw.unsqueeze(0)).float().to(device)
        pure = timed(lambda: encoder(slices, with_grids=seg), repeats=args.repeats, warmup=args.warmup, device=device)
        # the whole network on the prepared volume (decoder, 3D refinement and slab stitching,
        # or the aggregator, included): what is left of the end-to-end time is the pipeline's
        batch = raw.unsqueeze(0).to(device)

        def network_only():
            with torch.inference_mode():
                return predictor.inferer(batch, network) if seg else network(batch)

        pure_network = timed(network_only, repeats=args.repeats, warmup=args.warmup, device=device)
        stage_names = sorted({s for run in runs for s in run["stages_s"]})
        median_stages = {s: _median([run["stages_s"].get(s, 0.0) for run in runs]) for s in stage_names}
        wall = _median([run["wall_s"] for run in runs])
        result["bundles"][key] = {
            "bundle": model.bundle_id, "task": model.task, "encoder": encoder.name,
            "encoder_depth": encoder.depth, "prepared_shape": list(raw.shape),
            "slices": int(slices.shape[0]), "slice_size": list(slices.shape[-2:]),
            "encoded_slices": runs[-1]["encoded_slices"], "encoder_calls": runs[-1]["encoder_calls"],
            "wall_s": wall, "wall_times_s": [round(r["wall_s"], 4) for r in runs], "stages_s": median_stages,
            "pure_encoder": pure, "ratio": wall / pure["median_s"],
            "pure_network": pure_network, "network_ratio": wall / pure_network["median_s"],
        }
        del model, predictor, network, encoder, slices, prepared, raw, batch
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return result


# ============================================================================ c. memory
def bench_memory(args: argparse.Namespace, device=None) -> dict[str, Any]:
    """Peak RSS per slice count: ``volumes.apps.bench_infer``'s child processes, one per count.

    Each child builds the bundles, runs ``volumes infer``'s batch on ``--memory-cases``
    copies of a ``--memory-size`` x ``--memory-size`` x N CT and reports its RSS after
    building (baseline) and its peak. ``slope`` is the least-squares growth of the peak
    per MiB of float32 volume across the counts: 1 would mean the peak grows by exactly
    one float32 copy of the volume per extra slice.
    """
    bi = bench_infer_module()
    device = device or resolve_device(args.device)
    settings = argparse.Namespace(size=args.memory_size, cases=args.memory_cases, bundles=list(args.bundles),
                                  workers=1, no_figures=args.no_figures, device=device.type, threads=args.threads)
    overrides = bundle_overrides(args)
    weights = bundle_weights(args, args.bundles)
    rows = [bi.run_size(settings, n, [weights[k] for k in args.bundles], overrides, Path(args.out))
            for n in args.memory_slices]
    measured = [r for r in rows if "growth_mib" in r]
    slope = None
    if len(measured) >= 2:
        xs = [r["volume_mib_float32"] for r in measured]
        ys = [r["peak_rss_mib"] for r in measured]
        mx, my = statistics.fmean(xs), statistics.fmean(ys)
        denominator = sum((x - mx) ** 2 for x in xs)
        slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / denominator if denominator else None
    return {"size": args.memory_size, "cases": args.memory_cases, "bundles": [bi.BUNDLE_NAMES[k] for k in args.bundles],
            "overrides": overrides, "rows": rows, "peak_per_volume_slope": slope,
            "table": bi.table(rows), "errors": bi.notes(rows)}


# ============================================================================ d. cache
def bench_cache(args: argparse.Namespace, device=None) -> dict[str, Any]:
    """Classify ``--cache-cases`` distinct CTs twice through a fresh embedding cache: cold, then warm.

    The classification bundle's network with a :class:`~volumes.classification.SliceEmbedder`
    (the bundle's preprocessing, a temporary cache folder): per case, hash the file for its
    source key; cold: load and prepare the volume, hash its voxels for the content key,
    encode and store both entries; warm: read the source entry. Then the aggregator's
    logits and slice importance. Repeated with a new cache folder each time;
    a first untimed pass warms the file system and the encoder.
    """
    import torch

    from volumes.classification import SliceEmbedder

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


# ============================================================================ e. 3D peers
PEERS = ("ours", "swinunetr", "unet3d")


def peer_volume(args: argparse.Namespace, device) -> tuple[tuple[int, int, int], str]:
    """The CT the 3D peers run on, and why: ``--peer-volume``, or ``--volume`` (smaller on CPU)."""
    if args.peer_volume:
        return args.peer_volume, "--peer-volume"
    size, _, slices = args.volume
    if device.type == "cuda" or size <= args.peer_cpu_size:
        return args.volume, "--volume"
    scale = args.peer_cpu_size / size
    dims = (args.peer_cpu_size, args.peer_cpu_size, max(2, round(slices * scale)))
    return dims, f"--volume scaled by {scale:.3f} on CPU (3D networks at full size take hours on a CPU)"


def bench_peers(args: argparse.Namespace, device=None) -> dict[str, Any]:
    """The segmentation bundle, MONAI SwinUNETR and a MONAI 3D UNet on one CT, each in its own process.

    Per model: RSS (or CUDA memory) after building it (baseline), load and preparation,
    then ``--warmup`` untimed and ``--repeats`` timed inferences to a uint8 label map
    (ours: the bundle's ``predict``, slab windows and ``Invertd`` included; peers:
    ``sliding_window_inference`` with ``--peer-roi``^3 windows, overlap 0.25, Gaussian
    blending, then argmax) and the peak. FLOPs per volume from one extra pass under
    ``FlopCounterMode``. Ratios are peer / ours.
    """
    device = device or resolve_device(args.device)
    dims, why = peer_volume(args, device)
    volume = synthetic_ct(Path(args.out) / "volumes", dims)
    weights = bundle_weights(args, ["seg"])["seg"]
    results: dict[str, Any] = {}
    for model in PEERS:
        spec = {"model": model, "volume": str(volume), "device": str(device.type), "threads": args.threads,
                "repeats": args.repeats, "warmup": args.warmup, "roi": args.peer_roi, "sw_batch": args.peer_sw_batch,
                "feature_size": args.peer_feature_size, "weights": str(weights), "overrides": bundle_overrides(args),
                "flops": not args.no_peer_flops}
        results[model] = run_child(spec, args.threads)
    ours = results["ours"]
    for model in PEERS[1:]:
        peer = results[model]
        if "infer_s" in peer and "infer_s" in ours:
            peer["time_vs_ours"] = peer["infer_s"] / ours["infer_s"]
            peer["memory_vs_ours"] = peer["growth_mib"] / ours["growth_mib"] if ours["growth_mib"] > 0 else None
    return {"volume": "x".join(map(str, dims)), "volume_source": why, "volume_file": str(volume),
            "roi": args.peer_roi, "sw_batch": args.peer_sw_batch, "feature_size": args.peer_feature_size,
            "device": str(device), "models": results}


def run_child(spec: dict[str, Any], threads: int) -> dict[str, Any]:
    """``python -m volumes.apps.bench --child SPEC``: one measurement in a fresh process (its own peak RSS)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(CHECKOUT), env.get("PYTHONPATH")]))
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "volumes.apps.bench", "--child", json.dumps(spec)], cwd=CHECKOUT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - start
    for line in proc.stdout.splitlines():
        if line.startswith(CHILD_MARKER):
            return {**json.loads(line[len(CHILD_MARKER):]), "child_wall_s": wall}
    how = f"killed by signal {-proc.returncode}" if proc.returncode < 0 else f"exit code {proc.returncode}"
    tail = (proc.stderr.strip().splitlines() or [""])[-1]
    return {"error": f"the child gave no result ({how}{'; out of memory?' if proc.returncode == -9 else ''}): {tail}",
            "child_wall_s": wall}


def _peer_network(spec: Mapping[str, Any]):
    from monai.networks.nets import UNet, SwinUNETR

    classes = 7  # background + the six organs of the segmentation bundle
    if spec["model"] == "swinunetr":
        return SwinUNETR(in_channels=1, out_channels=classes, feature_size=spec["feature_size"], spatial_dims=3)
    return UNet(spatial_dims=3, in_channels=1, out_channels=classes, channels=(16, 32, 64, 128, 256),
                strides=(2, 2, 2, 2), num_res_units=2)


def child_main(spec: dict[str, Any]) -> int:
    """The child of :func:`bench_peers`: builds one model, measures it, prints one JSON line."""
    import torch

    bi = bench_infer_module()
    torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    cuda = device.type == "cuda"
    torch.manual_seed(0)
    if spec["model"] == "ours":
        from volumes.inference import load_bundle

        bundle = load_bundle(bi.bundle_path("seg"), device=device, weights=spec["weights"], overrides=spec["overrides"])
        predictor = bundle.predictor
        network = predictor.network
        prepare = lambda: predictor.prepare({"image": spec["volume"]})  # noqa: E731
        infer = lambda data: predictor.predict(data)["label_map"]  # noqa: E731
    else:
        from monai.inferers import sliding_window_inference
        from monai.transforms import ScaleIntensityRange

        from volumes.data.io import load_volume

        network = _peer_network(spec).to(device).eval()
        scale = ScaleIntensityRange(a_min=-175, a_max=250, b_min=0.0, b_max=1.0, clip=True)
        prepare = lambda: {"image": scale(load_volume(spec["volume"]))}  # noqa: E731
        roi = (spec["roi"],) * 3

        def infer(data):
            with torch.inference_mode():
                x = data["image"].as_tensor().unsqueeze(0).to(device)
                logits = sliding_window_inference(x, roi, spec["sw_batch"], network, overlap=0.25, mode="gaussian")
                return logits.argmax(dim=1).to(torch.uint8).cpu()
    parameters = sum(p.numel() for p in network.parameters())
    synchronize(device)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
        baseline = torch.cuda.memory_allocated(device) / MIB
    baseline_rss = bi._rss_mib()
    start = time.perf_counter()
    data = prepare()
    prepare_s = time.perf_counter() - start
    shape = list(data["image"].shape)
    result = timed(lambda: infer(data), repeats=spec["repeats"], warmup=spec["warmup"], device=device)
    peak_rss = bi._peak_rss_mib()
    out: dict[str, Any] = {
        "model": spec["model"], "parameters": parameters, "input_shape": shape, "prepare_s": prepare_s,
        "infer_s": result["median_s"], "infer_times_s": result["times_s"], "baseline_rss_mib": baseline_rss,
        "peak_rss_mib": peak_rss, "threads": torch.get_num_threads(), "device": str(device),
    }
    out["growth_mib"] = (torch.cuda.max_memory_allocated(device) / MIB - baseline) if cuda else peak_rss - baseline_rss
    if spec.get("flops"):
        try:
            out["flops_per_volume"] = count_flops(infer, data)[0]
        except Exception as exc:
            out["flops_error"] = _error(exc)
    print(CHILD_MARKER + json.dumps(out), flush=True)
    return 0


# ============================================================================ f. accelerator
def known_peak_tflops(device_name: str) -> float | None:
    """Dense bf16 peak of a GPU named like ``torch.cuda.get_device_name()``, when known."""
    for needle, peak in KNOWN_PEAKS_TFLOPS:
        if needle.lower() in device_name.lower():
            return peak
    return None


def accelerator_variants(model, x, device, *, encoder=None, compile: bool = True,
                         cuda_graphs: bool = True) -> tuple[dict[str, Callable[[], Any]], dict[str, int]]:
    """The variants of section f as callables (and extra warm-up counts for the compiled ones).

    ``model`` is a timm ViT; every variant runs ``forward_features`` on ``x`` under
    ``torch.inference_mode``. Works on CPU too (without the TF32 and CUDA graph variants).
    """
    import copy

    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    cuda = torch.device(device).type == "cuda"
    bf16 = lambda: torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)  # noqa: E731

    def call(fn=model.forward_features, *, autocast=False, fused=True, backend=None, tf32=False, inputs=x):
        def run():
            with contextlib.ExitStack() as stack:
                stack.enter_context(torch.inference_mode())
                if cuda:
                    stack.enter_context(_tf32(tf32))
                if autocast:
                    stack.enter_context(bf16())
                if backend is not None:
                    stack.enter_context(sdpa_kernel(backend))
                stack.enter_context(_attention(model, fused))
                return fn(inputs)
        return run

    variants: dict[str, Callable[[], Any]] = {"fp32": call()}
    if cuda:
        variants["fp32 + TF32 matmuls"] = call(tf32=True)
    variants["bf16 autocast, explicit attention (no SDPA)"] = call(autocast=True, fused=False)
    variants["bf16 autocast + SDPA (auto kernel)"] = call(autocast=True)
    variants["bf16 autocast + SDPA flash kernel"] = call(autocast=True, backend=SDPBackend.FLASH_ATTENTION)
    model_bf16 = copy.deepcopy(model).to(torch.bfloat16)
    x_bf16 = x.to(torch.bfloat16)
    variants["bf16 weights + SDPA"] = lambda: _bf16_weights(model_bf16, x_bf16)
    warmups: dict[str, int] = {}
    if compile:
        compiled = torch.compile(model.forward_features, dynamic=False)
        variants["bf16 autocast + torch.compile"] = call(compiled, autocast=True)
        warmups["bf16 autocast + torch.compile"] = 3
        if cuda and cuda_graphs:
            graphed = torch.compile(model.forward_features, mode="reduce-overhead", dynamic=False)
            variants["bf16 autocast + torch.compile + CUDA graphs"] = call(graphed, autocast=True)
            warmups["bf16 autocast + torch.compile + CUDA graphs"] = 3
    if encoder is not None:
        variants[f"SliceEncoder (autocast {encoder.autocast}, no grids)"] = lambda: encoder(x, with_grids=False)
    return variants, warmups


def _bf16_weights(model, x):
    import torch

    with torch.inference_mode():
        return model.forward_features(x)


def bench_accelerator(args: argparse.Namespace, device=None) -> dict[str, Any]:
    """CUDA variants of ViT inference on ``--slices`` x ``--size``^2 slices; skipped without CUDA.

    MFU = achieved FLOP/s (FlopCounterMode FLOPs per slice x slices/s) / peak: ``--peak-tflops``
    or the dense bf16 peak of a known GPU (:data:`KNOWN_PEAKS_TFLOPS`). The measured bf16
    GEMM peak of the same run is reported beside it.
    """
    import torch

    device = device or resolve_device(args.device)
    if device.type != "cuda":
        return {"skipped": "no CUDA device"}
    from volumes.encoders import SliceEncoder

    name = torch.cuda.get_device_name(device)
    peak = args.peak_tflops or known_peak_tflops(name)
    encoder = SliceEncoder(args.encoder, chunk_size=max(args.chunk_size, args.slices), autocast="auto",
                           model_kwargs=args.model_kwargs).to(device).eval()
    model = raw_timm(args.encoder, args.model_kwargs, encoder.backbone.state_dict()).to(device)
    x = torch.randn(args.slices, 3, args.size, args.size, generator=torch.Generator().manual_seed(0)).to(device)
    flops, per_op = count_flops(model.forward_features, x[:1])
    variants, warmups = accelerator_variants(model, x, device, encoder=encoder, compile=not args.no_compile,
                                             cuda_graphs=not args.no_compile)
    times = compare(variants, repeats=args.repeats, warmup=args.warmup, device=device, warmups=warmups)
    rows = {}
    for variant, result in times.items():
        if "median_s" not in result:
            rows[variant] = result
            continue
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        variants[variant]()
        synchronize(device)
        rate = args.slices * flops / result["median_s"]
        rows[variant] = {**result, "slices_per_s": args.slices / result["median_s"], "flop_per_s": rate,
                         "mfu": rate / (peak * 1e12) if peak else None,
                         "peak_memory_mib": (torch.cuda.max_memory_allocated(device) - before) / MIB}
    gemm_bf16 = gemm_peak(device, n=args.gemm_size or 8192, dtype=torch.bfloat16, repeats=args.repeats)
    gemm_fp32 = gemm_peak(device, n=args.gemm_size or 8192, dtype=torch.float32, repeats=args.repeats)
    for row in rows.values():
        if "flop_per_s" in row:
            row["fraction_of_bf16_gemm"] = row["flop_per_s"] / gemm_bf16["flop_per_s"]
    best = max((r for r in rows.values() if "mfu" in r and r["mfu"] is not None), key=lambda r: r["mfu"], default=None)
    best_name = next((k for k, r in rows.items() if r is best), None)
    return {"gpu": name, "peak_tflops": peak, "peak_source": "--peak-tflops" if args.peak_tflops else
            ("known GPU table" if peak else "unknown GPU: pass --peak-tflops"),
            "encoder": args.encoder, "model_kwargs": args.model_kwargs, "slices": args.slices, "size": args.size,
            "flops_per_slice": flops, "flops_per_slice_by_op": per_op, "variants": rows,
            "gemm_bf16": gemm_bf16, "gemm_fp32": gemm_fp32, "best": best_name,
            "best_mfu": best["mfu"] if best else None}


# ============================================================================ report
SECTION_FUNCTIONS: dict[str, Callable[..., dict[str, Any]]] = {
    "a": bench_encoder, "b": bench_pipeline, "c": bench_memory, "d": bench_cache, "e": bench_peers,
    "f": bench_accelerator,
}


def _num(value: Any, fmt: str = "{:.3f}") -> str:
    if value is None or (isinstance(value, float) and value != value):
        return "-"
    return fmt.format(value)


def _rate(flop_per_s: float | None) -> str:
    if flop_per_s is None:
        return "-"
    return f"{flop_per_s / 1e12:.2f} TFLOP/s" if flop_per_s >= 1e12 else f"{flop_per_s / 1e9:.1f} GFLOP/s"


def _met(value: float | None, goal: float, higher: bool = True) -> str:
    if value is None or value != value:
        return "-"
    return "yes" if (value >= goal if higher else value <= goal) else "no"


def summary_rows(sections: Mapping[str, Any]) -> list[list[str]]:
    """One line per goal of the issue: what was measured, the goal, whether it is met."""
    rows: list[list[str]] = []
    a = sections.get("a")
    if a and "error" not in a:
        rows.append(["a. SliceEncoder throughput / timm forward_features", _num(a["encoder_vs_timm"], "{:.3f}x"),
                     ">= 0.95x", _met(a["encoder_vs_timm"], GOALS["encoder_vs_timm"])])
        rows.append(["a. SliceEncoder with grids / timm forward_intermediates", _num(a["grids_encoder_vs_timm"], "{:.3f}x"),
                     "-", "-"])
        rows.append(["a. encoder FLOP/s / measured GEMM peak", _num(a["fraction_of_gemm_peak"], "{:.1%}"), "-", "-"])
    b = sections.get("b")
    if b and "error" not in b:
        for entry in b["bundles"].values():
            rows.append([f"b. {entry['bundle']}: end to end / pure encoder", _num(entry["ratio"], "{:.2f}x"),
                         "<= 1.3x", _met(entry["ratio"], GOALS["pipeline_ratio"], higher=False)])
            if entry.get("network_ratio") is not None:
                rows.append([f"b. {entry['bundle']}: end to end / whole network", _num(entry["network_ratio"], "{:.2f}x"),
                             "-", "-"])
    c = sections.get("c")
    if c and "error" not in c:
        for row in c["rows"]:
            if "growth_per_volume" in row:
                rows.append([f"c. peak RSS growth / float32 volume, {row['slices']} slices",
                             _num(row["growth_per_volume"], "{:.2f}x"), "~1x", "-"])
        if c.get("peak_per_volume_slope") is not None:
            rows.append(["c. peak RSS slope per MiB of volume", _num(c["peak_per_volume_slope"], "{:.2f}"), "~1", "-"])
    d = sections.get("d")
    if d and "error" not in d:
        rows.append(["d. cached second run speed-up", _num(d["speedup"], "{:.2f}x"), ">= 10x",
                     _met(d["speedup"], GOALS["cache_speedup"])])
    e = sections.get("e")
    if e and "error" not in e:
        for name in PEERS[1:]:
            peer = e["models"].get(name, {})
            failed = peer.get("error") or e["models"].get("ours", {}).get("error")
            measured = (f"error: {failed}" if failed else
                        f"{_num(peer.get('time_vs_ours'), '{:.2f}x')}, {_num(peer.get('memory_vs_ours'), '{:.2f}x')}")
            rows.append([f"e. {name} / ours: time, memory", measured, "-", "-"])
    f = sections.get("f")
    if f and "error" not in f:
        if "skipped" in f:
            rows.append(["f. best MFU (CUDA)", f"skipped: {f['skipped']}", ">= 40% (ViT-B/14, 518 px, H100)", "-"])
        else:
            rows.append([f"f. best MFU: {f['best']}", _num(f["best_mfu"], "{:.1%}"), ">= 40% (ViT-B/14, 518 px, H100)",
                         _met(f["best_mfu"], GOALS["mfu"])])
    for key, section in sections.items():
        if section and "error" in section:
            rows.append([f"{key}. {SECTION_TITLES[key]}", f"error: {section['error']}", "-", "-"])
    return rows


def section_markdown(key: str, s: Mapping[str, Any]) -> list[str]:
    """The detail table of one section."""
    title = f"## {key}. {SECTION_TITLES[key]}"
    if "error" in s:
        return [title, "", f"error: {s['error']}"]
    if "skipped" in s:
        return [title, "", f"skipped: {s['skipped']}"]
    if key == "a":
        gemm = s["gemm"]
        lines = [title, "",
                 f"{s['encoder']} {s['model_kwargs'] or ''} on {s['slices']} slices of {s['size']} x {s['size']} "
                 f"({s['tokens_per_slice']} tokens), {s['dtype']}, {s['device']}, chunk size {s['chunk_size']}; "
                 f"{s['flops_per_slice'] / 1e9:.3f} GFLOP per slice counted "
                 f"(analytic {_num(s['flops_per_slice_analytic'] and s['flops_per_slice_analytic'] / 1e9)}); "
                 f"GEMM {gemm['n']}^2 {gemm['dtype']}: {_rate(gemm['flop_per_s'])}. Features vs timm: max |diff| "
                 f"class token {s['parity']['max_abs_diff_cls']:.2e}, mean patch token "
                 f"{s['parity']['max_abs_diff_patch_mean']:.2e}.", ""]
        rows = []
        for name, r in s["variants"].items():
            if "error" in r:
                rows.append([name, f"error: {r['error']}", "-", "-", "-", "-"])
            else:
                rows.append([name, f"{r['median_s']:.4f}", f"{r['slices_per_s']:.1f}", _rate(r["flop_per_s"]),
                             f"{r['fraction_of_gemm_peak']:.1%}", f"{r['vs_timm_batch']:.3f}x"])
        header = ["variant", "median s", "slices/s", "achieved", "of GEMM peak", "timm batch time / this"]
        return lines + [markdown_table(header, rows)]
    if key == "b":
        names = ["hash", "load", "preprocess", "encode", "decode", "aggregate", "invert", "write", "figure", "other"]
        rows = []
        for e in s["bundles"].values():
            stages = e["stages_s"]
            network = e.get("pure_network")
            rows.append([e["bundle"], f"{e['wall_s']:.3f}", f"{e['pure_encoder']['median_s']:.3f}", f"{e['ratio']:.2f}x",
                         f"{network['median_s']:.3f}" if network else "-",
                         f"{e['network_ratio']:.2f}x" if network else "-",
                         f"{e['encoded_slices']} / {e['slices']}",
                         *(f"{stages[n]:.3f}" if n in stages else "-" for n in names)])
        return [title, "",
                f"One {s['volume']} synthetic CT per run, `BatchInference` (workers 0, figures {s['figures']}), "
                f"{s['device']}; seconds, median of the repeats. pure encoder: the encoder on the prepared "
                "volume's slices, each once; whole network: the bundle's network (and, for segmentation, its "
                "slab inferer) on the prepared volume. encoded / slices: slices through the encoder against "
                "the volume's slices.", "",
                markdown_table(["bundle", "end to end s", "pure encoder s", "ratio", "whole network s",
                                "end to end / network", "encoded / slices", *names], rows)]
    if key == "c":
        lines = [title, "",
                 f"`volumes.apps.bench_infer` children: bundles {', '.join(s['bundles'])}, {s['cases']} case(s) of "
                 f"{s['size']} x {s['size']} x N; peak RSS slope per MiB of float32 volume: "
                 f"{_num(s['peak_per_volume_slope'], '{:.2f}')}.", "", s["table"]]
        return lines + ([""] + s["errors"] if s["errors"] else [])
    if key == "d":
        names = ["source_hash", "load_preprocess", "voxel_hash", "encode", "cache_io", "classify"]
        rows = [[run, f"{s[run]['total_s']:.3f}", *(f"{s[run]['stages_s'][n]:.3f}" for n in names),
                 f"{s[run]['hits']} / {s[run]['misses']}"] for run in ("cold", "warm")]
        return [title, "",
                f"{s['cases']} distinct {s['volume']} synthetic CTs classified twice through a fresh cache "
                f"({s['encoder']}, {s['encoder_depth']} blocks, {s['aggregator']} aggregator, {s['device']}); "
                f"speed-up {s['speedup']:.2f}x.", "",
                markdown_table(["run", "total s", *(n + " s" for n in names), "hits / misses"], rows)]
    if key == "e":
        rows = []
        for name, m in s["models"].items():
            if "error" in m:
                rows.append([name, f"error: {m['error']}", *["-"] * 7])
                continue
            flops = m.get("flops_per_volume")
            rows.append([name, "x".join(map(str, m["input_shape"])), f"{m['parameters'] / 1e6:.1f} M",
                         _num(flops and flops / 1e9, "{:.0f}"), f"{m['prepare_s']:.2f}", f"{m['infer_s']:.2f}",
                         f"{m['growth_mib']:.0f}", _num(m.get("time_vs_ours"), "{:.2f}x"),
                         _num(m.get("memory_vs_ours"), "{:.2f}x")])
        return [title, "",
                f"CT {s['volume']} ({s['volume_source']}), {s['device']}; peers: "
                f"{s['roi']}^3 windows, sw batch {s['sw_batch']}, SwinUNETR feature size {s['feature_size']}. "
                "Each model in its own process; growth = peak memory - memory after building the model.", "",
                markdown_table(["model", "input", "parameters", "GFLOP / volume", "prepare s", "infer s", "growth MiB",
                        "time vs ours", "memory vs ours"], rows)]
    if key == "f":
        rows = []
        for name, r in s["variants"].items():
            if "error" in r:
                rows.append([name, f"error: {r['error']}", *["-"] * 5])
            else:
                rows.append([name, f"{r['median_s']:.4f}", f"{r['slices_per_s']:.0f}", _rate(r["flop_per_s"]),
                             _num(r["mfu"], "{:.1%}"), f"{r['fraction_of_bf16_gemm']:.1%}",
                             f"{r['peak_memory_mib']:.0f}"])
        return [title, "",
                f"{s['gpu']}; {s['encoder']} on {s['slices']} slices of {s['size']}^2, "
                f"{s['flops_per_slice'] / 1e9:.1f} GFLOP per slice; peak {_num(s['peak_tflops'], '{:.0f}')} TFLOP/s "
                f"({s['peak_source']}); measured GEMM bf16 {_rate(s['gemm_bf16']['flop_per_s'])}, "
                f"fp32 {_rate(s['gemm_fp32']['flop_per_s'])}.", "",
                markdown_table(["variant", "median s", "slices/s", "achieved", "MFU", "of bf16 GEMM", "peak MiB"], rows)]
    return [title]


def machine_info(args: argparse.Namespace, device) -> dict[str, Any]:
    import monai
    import timm
    import torch

    from volumes.reporting import cpu_model

    info = {"cpu": cpu_model(), "cores": available_cores(), "python": platform.python_version(),
            "torch": torch.__version__, "timm": timm.__version__, "monai": monai.__version__,
            "threads": torch.get_num_threads(), "device": str(device)}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update({"gpu": props.name, "gpu_memory_gib": round(props.total_memory / 2**30, 1),
                     "cuda": torch.version.cuda})
    return info


def markdown(report: Mapping[str, Any]) -> str:
    m = report["machine"]
    gpu = f", GPU {m['gpu']} ({m['gpu_memory_gib']} GiB, CUDA {m['cuda']})" if "gpu" in m else ", no CUDA device"
    lines = [
        "# volumes bench", "",
        f"- machine: {m['cpu']} ({m['cores']} cores available){gpu}; device {m['device']}",
        f"- torch {m['torch']}, timm {m['timm']}, MONAI {m['monai']}, Python {m['python']}, {m['threads']} threads",
        f"- reproduce: `{report['command']}`",
        f"- timing: {report['settings']['warmup']} warm-up, median of {report['settings']['repeats']} repeats",
        "", "## Summary", "",
        markdown_table(["measurement", "measured", "goal", "met"], summary_rows(report["sections"]), align="lrll"),
    ]
    for key, section in report["sections"].items():
        lines += [""] + section_markdown(key, section)
    return "\n".join(lines) + "\n"


def reproduce_command(args: argparse.Namespace) -> str:
    """This run's command with every option spelled out."""
    argv = ["python", "-m", "volumes", "bench", "--sections", *args.sections, "--encoder", args.encoder,
            "--slices", str(args.slices), "--size", str(args.size), "--volume", "x".join(map(str, args.volume)),
            "--threads", str(args.threads), "--repeats", str(args.repeats), "--warmup", str(args.warmup),
            "--chunk-size", str(args.chunk_size), "--autocast", args.autocast, "--device", args.device,
            "--bundles", *args.bundles]
    if args.model_kwargs:
        argv += ["--model-kwargs", json.dumps(args.model_kwargs)]
    if args.bundle_size:
        argv += ["--bundle-size", str(args.bundle_size)]
    if args.gemm_size:
        argv += ["--gemm-size", str(args.gemm_size)]
    if "c" in args.sections:
        argv += ["--memory-slices", *map(str, args.memory_slices), "--memory-size", str(args.memory_size),
                 "--memory-cases", str(args.memory_cases)]
    if "d" in args.sections:
        argv += ["--cache-cases", str(args.cache_cases)]
        if args.cache_volume:
            argv += ["--cache-volume", "x".join(map(str, args.cache_volume))]
    if "e" in args.sections:
        argv += ["--peer-roi", str(args.peer_roi), "--peer-sw-batch", str(args.peer_sw_batch),
                 "--peer-feature-size", str(args.peer_feature_size), "--peer-cpu-size", str(args.peer_cpu_size)]
        if args.peer_volume:
            argv += ["--peer-volume", "x".join(map(str, args.peer_volume))]
        if args.no_peer_flops:
            argv.append("--no-peer-flops")
    if "f" in args.sections:
        if args.peak_tflops:
            argv += ["--peak-tflops", str(args.peak_tflops)]
        if args.no_compile:
            argv.append("--no-compile")
    if args.no_figures:
        argv.append("--no-figures")
    argv += ["--out", str(args.out)]
    return f"OMP_NUM_THREADS={args.threads} " + shlex.join(argv)


def write_report(out: Path, report: Mapping[str, Any]) -> str:
    text = markdown(report)
    write_json_and_markdown(out, "bench", report, text)
    return text


def bench_main(args: argparse.Namespace) -> int:
    """Run the chosen sections, writing ``bench.json`` / ``bench.md`` after each; print the markdown."""
    import torch

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    threads_before = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        device = resolve_device(args.device)
        report: dict[str, Any] = {
            "command": reproduce_command(args), "machine": machine_info(args, device),
            "settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items() if k != "func"},
            "sections": {},
        }
        report["settings"]["out"] = str(out)
        text = write_report(out, report)
        for key in args.sections:
            print(f"--- {key}. {SECTION_TITLES[key]}", flush=True)
            start = time.perf_counter()
            try:
                result = SECTION_FUNCTIONS[key](args, device)
            except Exception as exc:  # one failing section does not lose the others
                import traceback

                traceback.print_exc()
                result = {"error": _error(exc)}
            result["section_s"] = time.perf_counter() - start
            report["sections"][key] = result
            text = write_report(out, report)
        print()
        print(text)
        print(f"wrote {out / 'bench.json'} and {out / 'bench.md'}")
        return 1 if any("error" in s for s in report["sections"].values()) else 0
    finally:
        torch.set_num_threads(threads_before)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        sys.exit(child_main(json.loads(sys.argv[2])))
    sys.exit("usage: python -m volumes bench ... (this module's own entry point is for its child processes)")
